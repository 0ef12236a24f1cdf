"""Gaussian-noise masking of a site update before upload (site side, pure torch).

FedCDD's second ingredient: each site keeps the top-ρ fraction of every tensor's entries by
importance and replaces (``mode="replace"``) or perturbs (``mode="perturb"``) the rest with
N(0, σ²) noise. The mask is redrawn every round from a seed derived from (seed, site, round), so a
run is reproducible and the noise differs per site and round.

Importance (per tensor, never across tensors: lora_A and lora_B live on different scales, a
global ranking would mask whole matrices):
- ``"entry"`` (default): |θ_ij|, i.e. the L2 norm of a single entry. Keeps exactly
  k = ceil(ρ · numel) entries (ties at the cut are broken by ``torch.topk``, deterministically).
- ``"column"``: the L2 norm of each column. Keeps the k = ceil(ρ · columns) columns with the
  largest norms, whole; every entry of the other columns is masked.

THIS IS NOT DIFFERENTIAL PRIVACY. The kept entries are uploaded exactly, the noise is not
calibrated to any sensitivity, and the positions of the kept entries (where the large values
are) remain recognisable. It is a compression-like perturbation studied for its effect on
quality; for a privacy guarantee use DP (clipping + calibrated noise) or secure aggregation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

MODES = ("replace", "perturb")
IMPORTANCES = ("entry", "column")


def check_mask_options(rho, sigma, mode: str = "replace", importance: str = "entry") -> None:
    """ValueError naming the key (as the job flags spell it) for a bad mask setting."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 < rho <= 1):
        raise ValueError(f"mask_rho: expected a number in (0, 1] (the fraction of entries kept), got {rho!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 <= sigma < math.inf):
        raise ValueError(f"mask_sigma: expected a finite number >= 0 (noise standard deviation), got {sigma!r}")
    if mode not in MODES:
        raise ValueError(f"mask_mode: expected one of {list(MODES)}, got {mode!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"mask_importance: expected one of {list(IMPORTANCES)}, got {importance!r}")


def mask_seed(seed: int, site: str, round_num: int) -> int:
    """A 63-bit seed from (job seed, site, round): stable across processes (no Python hash())."""
    digest = hashlib.sha256(f"flare-lora-mask:{seed}:{site}:{round_num}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def keep_mask(tensor: Tensor, rho: float, importance: str = "entry") -> Tensor:
    """Boolean tensor of tensor's shape: True where the entry is kept (the top-ρ by importance)."""
    check_mask_options(rho, 0.0, importance=importance)
    if importance == "column" and tensor.dim() >= 2:
        norms = torch.linalg.vector_norm(tensor.float().reshape(tensor.shape[0], -1), dim=0)
        k = math.ceil(rho * norms.numel())
        cols = torch.zeros(norms.numel(), dtype=torch.bool)
        cols[torch.topk(norms, k).indices] = True
        return cols.reshape(tensor.shape[1:]).expand(tensor.shape).clone()
    flat = tensor.detach().float().abs().flatten()
    k = math.ceil(rho * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    return keep.reshape(tensor.shape)


@torch.no_grad()
def mask_update(
    state: Mapping[str, Tensor],
    rho: float,
    sigma: float,
    generator: torch.Generator | None = None,
    *,
    mode: str = "replace",
    importance: str = "entry",
) -> dict[str, Tensor]:
    """A masked copy of ``state``: top-ρ entries per tensor kept, the rest replaced/perturbed.

    ``generator`` draws the noise (tensors visited in sorted key order, so the same seed gives
    the same result whatever the dict order); ``rho = 1`` returns an unchanged copy. Non-float
    tensors are copied unchanged. An all-zero tensor stays finite (ties among zeros: any k kept).
    """
    check_mask_options(rho, sigma, mode, importance)
    out: dict[str, Tensor] = {}
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, Tensor) or not t.is_floating_point() or rho >= 1:
            out[key] = t.clone() if isinstance(t, Tensor) else t
            continue
        keep = keep_mask(t, rho, importance)
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * sigma
        masked = noise if mode == "replace" else t + noise
        out[key] = torch.where(keep, t, masked)
    return {key: out[key] for key in state}  # caller's key order
