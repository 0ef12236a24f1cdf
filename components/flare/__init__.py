"""FLARE glue: controller, recipe, client script. Thin; calls flare_lora.components.algorithms."""
