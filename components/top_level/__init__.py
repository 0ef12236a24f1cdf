"""flare-lora: federated LoRA fine-tuning on NVIDIA FLARE (installed as the ``flare_lora`` package;
this folder is its top level, see pyproject.toml). ``flare_lora.load(results_dir)`` returns a
finished job's model and tokenizer."""


def load(results_dir: str, **kwargs):
    """A finished job's (model, tokenizer): see flare_lora.components.loading.load. Imported on
    call, so that importing any flare_lora module stays free of torch and transformers."""
    from flare_lora.components.loading import load as load_results

    return load_results(results_dir, **kwargs)


__all__ = ["load"]
