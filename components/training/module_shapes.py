"""The modules a job's LoRA adapts, with their shapes, from the base model's config alone.

The server pins every site's update to these (strategies/base.py ``UpdateLimits``): a site cannot
add a module (its factors would be merged into whatever weight the name points to) nor fix a
module's shape for the others by answering first. The model is built on the meta device: no
weights are read or allocated, so this costs the same for a 70B model as for a tiny one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from flare_lora.components.algorithms.lora_state import targeted
from flare_lora.components.algorithms.merge import BASE_PREFIX
from flare_lora.components.training.models import resolve_model_dir


@functools.lru_cache(maxsize=16)  # a job builds its recipe (and a test many) from the same model
def _shapes(model: str | None, targets: tuple[str, ...]) -> tuple[tuple[str, tuple[int, int]], ...]:
    if model is not None and os.path.basename(model) == "config.json":
        config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(model)))
    else:
        config = AutoConfig.from_pretrained(resolve_model_dir(model))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    shapes = {BASE_PREFIX + name: (module.out_features, module.in_features)
              for name, module in base.named_modules()
              if isinstance(module, nn.Linear) and targeted(name, targets)}
    missing = sorted(t for t in targets if not any(targeted(p, [t]) or p == BASE_PREFIX + t for p in shapes))
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules: {missing[0]!r} names no linear module of the base model; "
                         f"expected some of {linear}")
    return tuple(shapes.items())


def target_module_shapes(model: str | None, target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{PEFT module prefix: (out, in)} of the base model's linear modules that ``target_modules``
    name (PEFT's rule: the module's path is the name or ends with ``.name``).

    ``model``: a model directory, a .gguf file, a config.json, or None for the embedded model.
    """
    return dict(_shapes(None if model is None else os.path.abspath(model), tuple(target_modules)))
