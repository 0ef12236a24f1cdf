"""Client-level DP on a site's update: clip the change to L2 norm C, add N(0, σ²C²). Pure torch.

What is privatised is the *change* the site made, Δ = result − reference, where the reference is
what its local training started from, derived by the filter (privacy/dp_reference.py): the seeded fresh adapter
(FLoRA: A₀ kaiming, B₀ = 0), the installed global adapter (FedIT, FedCDD, zero-pad: the site's
rank-r slice), the global layer values (selective layers). The reference is data-independent given
earlier releases, so publishing reference + clip(Δ) + noise is post-processing of a Gaussian
mechanism. Clipping the raw factors instead would spend the norm budget C on A₀, which carries no
information about the data (‖A₀‖ ≈ √(r/3) per module).

Accounting: one release per round the site trains, Gaussian noise std σC, no subsampling (q = 1).
Neighbouring datasets are any two datasets of the site (one record changed, or all of them): both
clipped changes lie in the C-ball, so the L2 sensitivity is 2C and the noise multiplier against it
is σ/2. ε composes over rounds with Opacus' RDP (or PRV) accountant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from flare_lora.privacy.ledger import epsilon


def check_client_dp(clip, sigma, delta, epsilon_max=None) -> None:
    """ValueError naming the first bad option."""
    def finite_positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf

    for key, value in (("clip", clip), ("sigma", sigma)):
        if not finite_positive(value):
            raise ValueError(f"client DP {key}: expected a finite number > 0, got {value!r}")
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
        raise ValueError(f"client DP delta: expected a number in (0, 1), got {delta!r}")
    if epsilon_max is not None and not finite_positive(epsilon_max):
        raise ValueError(f"client DP epsilon_max: expected a finite number > 0 or None, got {epsilon_max!r}")


def update_norm(update: Mapping[str, Tensor]) -> float:
    """Global L2 norm over every tensor of the update."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, Tensor], clip: float) -> dict[str, Tensor]:
    """The update scaled to global L2 norm <= clip (unchanged when already inside)."""
    factor = min(1.0, clip / (update_norm(update) + 1e-12))
    return {k: v * factor for k, v in update.items()}


def privatize(result: Mapping[str, Tensor], reference: Mapping[str, Tensor], clip: float, sigma: float,
              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """reference + clip(result − reference, C) + N(0, σ²C²) per entry, in float32, keys of ``result``,
    on the result's device (the noise too, drawn with ``generator``, which must live there).

    Every key of ``result`` needs a reference tensor of the same shape (ValueError otherwise).
    """
    missing = sorted(k for k in result if k not in reference)
    mismatched = sorted(k for k in result if k in reference and tuple(reference[k].shape) != tuple(result[k].shape))
    if missing or mismatched:
        raise ValueError(f"update reference does not match the update: missing {missing[:3]}, "
                         f"shape mismatches {mismatched[:3]}")
    start = {k: reference[k].to(result[k].device, torch.float32) for k in result}
    clipped = clip_update({k: result[k].float() - start[k] for k in result}, clip)
    return {
        k: start[k] + d + torch.randn(d.shape, generator=generator, device=d.device) * (sigma * clip)
        for k, d in clipped.items()
    }


def release(sigma: float, rounds: int = 1) -> tuple[float, float, int]:
    """``rounds`` releases with noise σC as accountant history (σ/2 against sensitivity 2C, q = 1, steps)."""
    return sigma / 2, 1.0, rounds


def client_epsilon(sigma: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """ε after ``rounds`` releases with noise σC."""
    return epsilon([release(sigma, rounds)], delta, accountant) if rounds else 0.0
