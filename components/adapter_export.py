"""Write a global LoRA state as a standard PEFT adapter directory.

The server never loads the base model, yet users must get an artefact that
``PeftModel.from_pretrained(base, dir)`` loads. Stacked adapters have a different rank per module,
so the config carries ``rank_pattern`` and ``alpha_pattern`` (alpha = scaling · rank per module).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor

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
