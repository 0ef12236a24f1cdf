"""Factor averaging baselines: FedIT (homogeneous ranks) and HetLoRA-style zero-padding.

Both average A's and B's separately, so B_g A_g is not the weighted sum of the sites' updates:
they are the baselines that FLoRA stacking is compared against.
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
def fedit(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted mean of every A and every B over all sites (FedIT).

    Every site must have the same keys and shapes. The official FLoRA repo's FedIT keeps only
    client 0's factors; here all sites contribute.
    """
    p = normalize_weights(weights, len(states))
    reference = states[0]
    for k, state in enumerate(states[1:], start=1):
        if state.keys() != reference.keys():
            diff = sorted(set(state) ^ set(reference))
            raise ValueError(f"site {k}: key {diff[0]!r} differs from site 0's key set")
        for key, t in state.items():
            if t.shape != reference[key].shape:
                raise ValueError(
                    f"site {k}: {key} expected shape {tuple(reference[key].shape)}, "
                    f"got {tuple(t.shape)}"
                )
    dtype = common_float_dtype(states)
    out: dict[str, Tensor] = {}
    for key in reference:
        acc = torch.mul(reference[key].to(dtype), p[0])
        for p_k, state in zip(p[1:], states[1:], strict=True):
            acc.add_(state[key].to(dtype), alpha=p_k)
        out[key] = acc
    return out


@torch.no_grad()
def zero_pad(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    scalings: Sequence[float],
) -> dict[str, Tensor]:
    """HetLoRA-style aggregation: zero-pad every site to the module's largest rank, then average.

    Per module, A_g = Σ p_k pad(A_k) with zero rows to (r_max, in) and B_g = Σ p_k pad(s_k B_k)
    with zero columns to (out, r_max), p normalised over the sites that adapt the module (else a
    module one site adapts would be scaled by p² through A and B); the global pair is applied with
    scaling 1. A site of rank r_k and scaling s_k installs A_g[:r_k] and B_g[:, :r_k] / s_k,
    truncating the rest. Unlike stacking, B_g A_g != Σ p_k s_k B_k A_k in general (cross terms
    p_j p_k s_k B_k A_j appear).
    """
    if len(scalings) != len(states):
        raise ValueError(f"got {len(scalings)} scalings for {len(states)} sites")
    normalize_weights(weights, len(states))  # rejects negative, all-zero or mis-sized weights
    dtype = common_float_dtype(states)
    out: dict[str, Tensor] = {}
    for prefix, members in group_modules(states).items():
        p = dict(zip([k for k, _, _ in members], _member_weights(weights, members), strict=True))
        a0, b0 = members[0][1], members[0][2]
        r_max = max(a.shape[0] for _, a, _ in members)
        a_g = torch.zeros(r_max, a0.shape[1], dtype=dtype, device=a0.device)
        b_g = torch.zeros(b0.shape[0], r_max, dtype=dtype, device=b0.device)
        for k, a, b in members:
            a_g[: a.shape[0]].add_(a.to(dtype), alpha=p[k])
            b_g[:, : b.shape[1]].add_(b.to(dtype), alpha=p[k] * float(scalings[k]))
        out[prefix + LORA_A_SUFFIX] = a_g
        out[prefix + LORA_B_SUFFIX] = b_g
    return out


def _member_weights(weights: Sequence[float], members) -> list[float]:
    """The weights of a module's sites normalised among them (uniform when all of them are 0)."""
    own = [float(weights[k]) for k, _, _ in members]
    return normalize_weights(own if sum(own) > 0 else [1.0] * len(own), len(own))
