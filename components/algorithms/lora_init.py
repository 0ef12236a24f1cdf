"""A fresh LoRA adapter as a pure function of (seed, module name, shape).

PEFT initialises A kaiming-uniform and B with zeros. Drawing each module's A from its own generator
(seeded by the job's seed and the module's name) instead of one generator run through the modules
in turn makes the init independent of module order and of which modules exist: the client-level DP
filter recomputes a site's fresh adapter from the seed it handed out without loading the model
(privacy/dp_reference.py), and two sites adapting different module sets still share every module's A.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX


def module_seed(seed: int, prefix: str) -> int:
    """A 63-bit seed for one module, from the job's seed and the module's name."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}|{prefix}".encode()).digest()[:8], "big") >> 1


def fresh_lora_a(seed: int, prefix: str, shape: tuple[int, int]) -> Tensor:
    """Module ``prefix``'s initial A (rank, in), float32, as PEFT draws it (kaiming-uniform, a=√5)."""
    generator = torch.Generator().manual_seed(module_seed(seed, prefix))
    return nn.init.kaiming_uniform_(torch.empty(tuple(shape)), a=math.sqrt(5), generator=generator)


def fresh_factor(seed: int, key: str, shape: tuple[int, ...]) -> Tensor | None:
    """The initial value of a LoRA state-dict entry (A drawn, B zero); None for a non-LoRA key."""
    if key.endswith(LORA_A_SUFFIX):
        return fresh_lora_a(seed, key[: -len(LORA_A_SUFFIX)], shape)
    if key.endswith(LORA_B_SUFFIX):
        return torch.zeros(tuple(shape))
    return None
