"""FLARE glue: controller, recipe, client script. Thin; calls components.algorithms."""
