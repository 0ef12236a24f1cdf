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
from torch import Tensor

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX


def module_seed(seed: int, prefix: str) -> int:
    """A 63-bit seed for one module, from the job's seed and the module's name."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}|{prefix}".encode()).digest()[:8], "big") >> 1


def init_seed(job_id: str, rnd: int) -> int:
    """The 63-bit seed of round ``rnd``'s fresh adapters in job ``job_id``: the same at every site and
    at the server (shared-A's A, the client-level DP filter's reference)."""
    return int.from_bytes(hashlib.sha256(f"client-dp-init|{job_id}|{int(rnd)}".encode()).digest()[:8], "big") >> 1


def fresh_lora_a(seed: int, prefix: str, shape: tuple[int, int]) -> Tensor:
    """Module ``prefix``'s initial A (rank, in), float32, as PEFT draws it (kaiming-uniform, a=√5).

    Drawn one row at a time from the module's generator, so a rank-r A is the first r rows of every
    larger rank's A: zero-padding sites of different ranks start from slices of one matrix.
    """
    rank, fan_in = shape
    generator = torch.Generator().manual_seed(module_seed(seed, prefix))
    bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform with a=√5: gain √(1/3), bound √3·gain/√fan_in
    a = torch.empty(rank, fan_in)
    for row in a:
        row.uniform_(-bound, bound, generator=generator)
    return a


def fresh_factor(seed: int, key: str, shape: tuple[int, ...]) -> Tensor | None:
    """The initial value of a LoRA state-dict entry (A drawn, B zero); None for a non-LoRA key."""
    if key.endswith(LORA_A_SUFFIX):
        return fresh_lora_a(seed, key[: -len(LORA_A_SUFFIX)], shape)
    if key.endswith(LORA_B_SUFFIX):
        return torch.zeros(tuple(shape))
    return None
