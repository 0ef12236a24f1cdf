"""Attach, re-initialise, export and import the LoRA adapter, and expose the base weights.

State dicts use PEFT's key layout (see docs/design.md), which is what every aggregation rule in
``components.algorithms`` consumes.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from components.training.config import ConfigError, SiteConfig


def add_lora(model: nn.Module, cfg: SiteConfig, site: str = "") -> PeftModel:
    """Wrap ``model`` with a LoRA adapter (only its factors trainable), initialised from cfg.seed.

    Target names are checked first: PEFT's own error for a typo does not list what exists.
    """
    paths = [name for name, _ in model.named_modules()]
    for target in cfg.target_modules:
        if not any(path == target or path.endswith("." + target) for path in paths):
            linear = (name for name, module in model.named_modules() if isinstance(module, nn.Linear))
            available = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(
                f"site {site!r}: key 'target_modules': expected names of linear modules "
                f"{available}, got {target!r}"
            )
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(model, config)
    reset_lora(peft_model, cfg.seed)
    return peft_model


def reset_lora(peft_model: PeftModel, seed: int) -> None:
    """Fresh adapter as PEFT initialises it (A kaiming-uniform, B zero), reproducibly from seed.

    FLoRA trains a new LoRA every round on the merged base; a private generator keeps the
    global RNG untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    nn.init.kaiming_uniform_(module.lora_A[name].weight, a=math.sqrt(5), generator=generator)
                    nn.init.zeros_(module.lora_B[name].weight)


def lora_state(peft_model: PeftModel) -> dict[str, Tensor]:
    """The adapter's factors in PEFT key layout, as detached float32 CPU copies."""
    state = get_peft_model_state_dict(peft_model)
    return {key: value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}


def load_lora_state(peft_model: PeftModel, state: dict[str, Tensor]) -> None:
    """Load adapter factors, requiring exactly the model's keys and shapes."""
    expected = get_peft_model_state_dict(peft_model)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(state[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if expected[key].shape != state[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"LoRA state does not fit the model: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}, shape mismatches {_few(mismatched)}"
        )
    set_peft_model_state_dict(peft_model, state)


def _few(items: list[str], shown: int = 3) -> str:
    """A readable excerpt: a 30-layer model has 120 LoRA keys."""
    return f"{items[:shown]}" + (f" and {len(items) - shown} more" if len(items) > shown else "")


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The base model's live parameters keyed by their path in the base model.

    PEFT moves a wrapped layer's weight to ``<path>.base_layer.weight``; it is returned as
    ``<path>.weight``, the key ``merge_lora_into`` derives from a LoRA prefix. In-place updates
    of the returned tensors change the model.
    """
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    weights = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        weights[".".join(part for part in parts if part != "base_layer")] = param
    return weights
