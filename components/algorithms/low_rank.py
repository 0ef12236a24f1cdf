"""Re-projecting a low-rank update B·A to a smaller rank without forming the dense matrix.

B (out, R) and A (R, in) give B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ from two thin QRs (B = Q_B R_B, Aᵀ = Q_A R_A),
so the SVD of the small R×R core gives the singular values of B·A and its best rank-k
approximation (Eckart–Young): memory and time O((out + in)·R²), never out × in. The Frobenius
error of keeping k is the tail √(Σ_{i≥k} σ_i²). Used by the bounded FLoRA global and by hlora.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, module_prefixes

SPLITS = ("balanced", "a")  # √σ on both factors, or σ in A with an orthonormal B (NVFlare's hlora)


def check_target(rank: int | None, energy: float | None) -> None:
    """Exactly one of rank (an int >= 1) and energy (in (0, 1]) (ValueError naming the key)."""
    if (rank is None) == (energy is None):
        raise ValueError(f"give one of rank and energy, got rank={rank!r}, energy={energy!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, float | int) or not 0 < energy <= 1):
        raise ValueError(f"energy: expected a number in (0, 1], got {energy!r}")


@torch.no_grad()
def project(b: Tensor, a: Tensor, rank: int | None = None, energy: float | None = None,
            split: str = "balanced") -> tuple[Tensor, Tensor, Tensor]:
    """(B_k, A_k, σ): the best approximation of B·A of rank ``rank``, or of the smallest rank that
    keeps a share ``energy`` of Σσ²; float32 factors (computed in float64), and all of B·A's
    singular values σ (descending, float64). Zero singular values are not kept (beyond one
    component, so that no module has rank 0)."""
    check_target(rank, energy)
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    if rank is not None:
        k = min(rank, int((s > 0).sum()))
    else:
        share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(torch.finfo(torch.float64).tiny)
        k = min(int((share < energy - 1e-12).sum()) + 1, int((s > 0).sum()))
    k = max(k, 1)  # a module keeps one (then zero) component: PEFT has no rank-0 adapter
    left, right = q_b @ u[:, :k], vh[:k] @ q_a.T
    if split == "balanced":
        root = s[:k].sqrt()
        return (left * root).float(), (root[:, None] * right).float(), s
    if split == "a":
        return left.float(), (s[:k, None] * right).float(), s
    raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def tail_error(s: Tensor, kept: int) -> tuple[float, float]:
    """(‖B·A − B_k·A_k‖_F, that relative to ‖B·A‖_F) from the singular values."""
    total = float((s**2).sum().sqrt())
    err = float((s[kept:] ** 2).sum().sqrt())
    return err, (err / total if total > 0 else 0.0)


def truncate_lora(state: Mapping[str, Tensor], rank: int | None = None, energy: float | None = None,
                  split: str = "balanced") -> tuple[dict[str, Tensor], dict]:
    """Every module of a scaling-1 LoRA state re-projected; returns (the new state, a report:
    {"rank": largest rank kept, "error": ‖ΔW − ΔW_k‖_F over all modules, "relative": that over ‖ΔW‖_F,
    "max_relative": the worst module's relative error})."""
    out, sq_err, sq_total, worst, kept = {}, 0.0, 0.0, 0.0, 0
    for prefix in module_prefixes(state):
        b, a = state[prefix + LORA_B_SUFFIX], state[prefix + LORA_A_SUFFIX]
        b_k, a_k, s = project(b, a, rank, energy, split)
        err, rel = tail_error(s, a_k.shape[0])
        out[prefix + LORA_A_SUFFIX], out[prefix + LORA_B_SUFFIX] = a_k, b_k
        sq_err, sq_total = sq_err + err**2, sq_total + float((s**2).sum())
        worst, kept = max(worst, rel), max(kept, a_k.shape[0])
    total = sq_total**0.5
    return out, {"rank": kept, "error": sq_err**0.5, "relative": (sq_err**0.5 / total) if total > 0 else 0.0,
                 "max_relative": worst}
