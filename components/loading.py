"""``flare_lora.load(results_dir)``: a finished job's model and tokenizer in one call.

Reads the results folder a run wrote (metrics.json names the model, run_config.json the base) and
returns the base model with the trained weights applied: a PEFT model for LoRA jobs, the base with
the trained layers or all weights replaced for selective ``full`` and one-shot ``full`` jobs.
"""

from __future__ import annotations

import json
import os

import torch

from flare_lora.components.cli.results import MODEL_FILES
from flare_lora.components.training.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model_dir



def load(results_dir: str, *, dtype: torch.dtype = torch.float32, base_model: str | None = None):
    """(model, tokenizer) of the job whose results are in ``results_dir``, in eval mode.

    base_model: the base to apply the weights to, where the one the run used is not on this machine
    (default: run_config.json's model, or the adapter config's base)."""
    if not os.path.isfile(os.path.join(results_dir, "metrics.json")):
        raise FileNotFoundError(f"{results_dir}: no metrics.json; expected a flare-lora results folder")
    with open(os.path.join(results_dir, "metrics.json"), encoding="utf-8") as f:
        log = json.load(f)
    # the fixed names the server writes, whatever metrics.json says; a link is not followed
    found = [(key, os.path.join(results_dir, name)) for key, name in MODEL_FILES.items()
             if os.path.exists(os.path.join(results_dir, name)) and not os.path.islink(os.path.join(results_dir, name))]
    if not found:
        raise FileNotFoundError(f"{results_dir}: holds no trained model (adapter/, layers.safetensors or "
                                f"global.safetensors){'; the job failed: ' + log['error'] if log.get('error') else ''}")
    key, path = found[0]
    model, tokenizer = load_model_and_tokenizer(resolve_model_dir(base_model or _run_model(results_dir, path)), dtype=dtype)
    if key == "adapter":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, path).eval(), tokenizer
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(path), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit the base model: unexpected keys {result.unexpected_keys[:3]}")
    return model, tokenizer


def _run_model(results_dir: str, model_path: str) -> str | None:
    """The run's base model: the adapter config's when it exists here, else run_config.json's
    (None: the embedded default)."""
    config = os.path.join(model_path, "adapter_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        if base and os.path.isdir(base):
            return base
    try:
        with open(os.path.join(results_dir, "run_config.json"), encoding="utf-8") as f:
            model = json.load(f).get("model")
    except (OSError, ValueError):
        model = None
    return None if model in (None, DEFAULT_MODEL) else model
