"""Write a global LoRA state as a standard PEFT adapter directory.

The server never loads the base model, yet users must get an artefact that
``PeftModel.from_pretrained(base, dir)`` loads. Stacked adapters have a different rank per module,
so the config carries ``rank_pattern`` and ``alpha_pattern`` (alpha = scaling · rank per module).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor

from flare_lora.components.algorithms.layer_average import relative_key
from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, module_prefixes
from flare_lora.components.algorithms.merge import BASE_PREFIX


def save_adapter(out_dir: str, state: Mapping[str, Tensor], scaling: float, base_model: str = "") -> str:
    """Save ``state`` (PEFT LoRA keys, applied with ``scaling``) as a PEFT adapter in ``out_dir``."""
    prefixes = module_prefixes(state)
    if not prefixes:
        raise ValueError("cannot save an empty LoRA adapter")
    paths = {p: p[len(BASE_PREFIX) :] if p.startswith(BASE_PREFIX) else p for p in prefixes}
    ranks = {paths[p]: int(state[p + LORA_A_SUFFIX].shape[0]) for p in prefixes}
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=default_rank,
        lora_alpha=scaling * default_rank,
        target_modules=sorted({path.rsplit(".", 1)[-1] for path in paths.values()}),
        rank_pattern={path: r for path, r in ranks.items() if r != default_rank},
        alpha_pattern={path: scaling * r for path, r in ranks.items() if r != default_rank},
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def save_merged_model(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Base + adapter merged into a plain HF model dir (``AutoModelForCausalLM.from_pretrained``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def save_full_model(base_dir: str, weights_path: str, out_dir: str) -> str:
    """The base model with some or all weights replaced from a safetensors file, as a plain HF
    model dir (full-parameter and full-layer fine-tuning results)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    result = base.load_state_dict(load_file(weights_path), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{weights_path} does not fit the model {base_dir}: {result.unexpected_keys[:3]}")
    base.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def save_tensors(path: str, state: Mapping[str, Tensor]) -> str:
    """A safetensors file written atomically (readers never see half a file)."""
    save_file({k: v.contiguous() for k, v in state.items()}, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


def save_global_layers(out: str, state: Mapping[str, Tensor], mode: str, num_layers: int, scaling: float,
                       base_model: str) -> dict:
    """Selective-layer global. lora: a PEFT adapter (layers never trained get zero factors: no
    change); full: ``layers.safetensors`` holding the trained layers' weights under their base-model names."""
    if mode == "full":
        save_tensors(os.path.join(out, "layers.safetensors"), state)
        return {"layers_file": "layers.safetensors"}
    full = dict(state)
    template = {relative_key(k): v.shape for k, v in state.items()}
    for layer in range(num_layers):
        for rel, shape in template.items():
            full.setdefault(rel.replace(".*.", f".{layer}.", 1), torch.zeros(shape))
    save_adapter(os.path.join(out, "adapter"), full, scaling, base_model)
    return {"adapter": "adapter"}


def write_model(out: str, state: Mapping[str, Tensor], spec: Mapping) -> dict:
    """The final model as ``spec`` says (the server's plain path and an HE site write the same):
    writer "adapter" (scaling, base_model), "layers" (mode, num_layers, scaling, base_model) or
    "full" (full weights). Returns the results-log entries naming what was written."""
    os.makedirs(out, exist_ok=True)
    writer = spec.get("writer")
    if writer == "full":
        save_tensors(os.path.join(out, "global.safetensors"), state)
        return {"full_weights": "global.safetensors"}
    if writer == "layers":
        return save_global_layers(out, state, spec["mode"], spec["num_layers"], spec["scaling"],
                                  spec.get("base_model", ""))
    if writer == "adapter":
        save_adapter(os.path.join(out, "adapter"), state, spec["scaling"], spec.get("base_model", ""))
        return {"adapter": "adapter"}
    raise ValueError(f"writer: expected 'adapter', 'layers' or 'full', got {writer!r}")
