"""FLoRA stacking: exact aggregation of heterogeneous-rank LoRA updates.

Concatenating the sites' factors (A along ranks, B along columns) gives a global pair whose
product is exactly the weighted sum of the sites' updates, whatever their ranks: averaging A's and
B's separately (FedIT) does not have this property, because the mean of products is not the
product of means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .lora_state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    common_float_dtype,
    group_modules,
    normalize_weights,
)


@torch.no_grad()
def _stack(states: Sequence[Mapping[str, Tensor]], coefs: Sequence[float]) -> dict[str, Tensor]:
    """A_g = cat_k(c_k A_k) on dim 0 and B_g = cat_k(B_k) on dim 1, so B_g A_g = Σ c_k B_k A_k.

    Each output is allocated once and the sites' blocks are written straight into it: this is a
    memory-bound copy of the whole update, so scaled temporaries would add passes over the data.
    """
    dtype = common_float_dtype(states)
    out: dict[str, Tensor] = {}
    for prefix, members in group_modules(states).items():
        a0, b0 = members[0][1], members[0][2]
        rank = sum(a.shape[0] for _, a, _ in members)
        a_g = torch.empty(rank, a0.shape[1], dtype=dtype, device=a0.device)
        row = 0
        for k, a, _ in members:
            torch.mul(a.to(dtype), coefs[k], out=a_g[row : row + a.shape[0]])
            row += a.shape[0]
        # cat into a preallocated output writes each row of B_g once; copy_ into column slices
        # revisits every row once per site and was measured slower.
        b_g = torch.empty(b0.shape[0], rank, dtype=dtype, device=b0.device)
        torch.cat([b.to(dtype) for _, _, b in members], dim=1, out=b_g)
        out[prefix + LORA_A_SUFFIX] = a_g
        out[prefix + LORA_B_SUFFIX] = b_g
    return out


def stack_lora(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    scalings: Sequence[float],
) -> dict[str, Tensor]:
    """FLoRA global update: B_g @ A_g == Σ p_k s_k B_k A_k, to be applied with scaling 1.

    `weights` are example counts (normalised to p_k), `scalings` the sites' s_k = α_k / r_k. Sites
    may differ in rank and in the modules they adapt: a module's stacked rank is the sum of the
    ranks of the sites that have it, and a site without it contributes nothing.
    """
    if len(scalings) != len(states):
        raise ValueError(f"got {len(scalings)} scalings for {len(states)} sites")
    p = normalize_weights(weights, len(states))
    return _stack(states, [p_k * float(s_k) for p_k, s_k in zip(p, scalings, strict=True)])


def concat_lora(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """One adapter equal to the sum of the given ones (B_g A_g = Σ B_k A_k), no normalisation.

    Folds several rounds of stacked factors (each already applied with scaling 1) into one.
    """
    return _stack(states, [1.0] * len(states))
