"""flare-lora: federated LoRA fine-tuning on NVIDIA FLARE (installed as the ``flare_lora`` package;
this folder is its top level, see pyproject.toml). ``flare_lora.load(results_dir)`` returns a
finished job's model and tokenizer."""

from flare_lora.components.loading import load

__all__ = ["load"]
