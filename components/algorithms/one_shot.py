"""One-shot aggregation: fold each site's result into the global model as it arrives.

With a single round there is nothing to synchronise, so the server aggregates asynchronously:
every arrival updates the global model at once, and a job can stop at a deadline with whoever
has reported. Two folds share one interface (``add``, ``result``, ``sites``):

- ``OnlineAverage``: running weighted average (FedIT-style LoRA factors, or full parameters).
  Sums are kept in float64, so the result does not depend on the arrival order (up to the final
  rounding to the input dtype).
- ``OnlineStack``: FLoRA stacking of the sites that arrived, always in site-name order, so the
  global factors themselves (not only their product) are the same for every arrival order.

``result()`` at any time is the aggregate of exactly the sites added so far, with weights
renormalised over them. A bad update raises ``InvalidUpdate`` and leaves the aggregate untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .lora_state import InvalidUpdate, check_tensor, lora_module_shapes, validate_lora_update
from .stacking import stack_lora


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise InvalidUpdate(f"weight must be a finite number > 0, got {weight!r}")
    return float(weight)


class OnlineAverage:
    """Running weighted average of same-shaped tensor dicts.

    The first accepted update fixes the parameter set (keys, shapes, dtype); later updates must
    match it exactly. ``expected`` ({key: shape}) fixes it up front instead.
    """

    def __init__(self, expected: Mapping[str, tuple[int, ...]] | None = None):
        self._shapes = {k: tuple(v) for k, v in expected.items()} if expected else None
        self._sum: dict[str, Tensor] = {}
        self._total = 0.0
        self._dtype: torch.dtype | None = None
        self.sites: list[str] = []

    def add(self, state: Mapping[str, Tensor], weight: float, site: str | None = None) -> None:
        weight = _check_weight(weight)
        name = site or f"#{len(self.sites)}"
        if name in self.sites:
            raise InvalidUpdate(f"{name!r} already contributed")
        self._check(state)
        if self._shapes is None:
            self._shapes = {k: tuple(v.shape) for k, v in state.items()}
        if self._dtype is None:
            self._dtype = next(iter(state.values())).dtype
        with torch.no_grad():
            for key, value in state.items():
                term = value.detach().to(torch.float64) * weight
                if key in self._sum:
                    self._sum[key] += term
                else:
                    self._sum[key] = term
        self._total += weight
        self.sites.append(name)

    def _check(self, state: Mapping[str, Tensor]) -> None:
        if not state:
            raise InvalidUpdate("empty update")
        for key, value in state.items():
            check_tensor(key, value)
        if self._shapes is None:
            return
        missing, extra = sorted(set(self._shapes) - set(state)), sorted(set(state) - set(self._shapes))
        if missing or extra:
            raise InvalidUpdate(
                f"parameter set differs from the aggregate's: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
            )
        for key, value in state.items():
            if tuple(value.shape) != self._shapes[key]:
                raise InvalidUpdate(f"{key!r}: expected shape {self._shapes[key]}, got {tuple(value.shape)}")

    def result(self) -> dict[str, Tensor]:
        if not self.sites:
            raise ValueError("no update added yet")
        return {k: (v / self._total).to(self._dtype) for k, v in self._sum.items()}


class OnlineStack:
    """FLoRA stacking of the arrived sites: B_g A_g = Σ p_k s_k B_k A_k over them.

    Keeps each site's factors (stacking is concatenation: the global holds every site's factors
    anyway) and stacks them in site-name order on ``result()``.
    """

    def __init__(self) -> None:
        self._updates: dict[str, tuple[Mapping[str, Tensor], float, float]] = {}
        self._shapes: dict[str, tuple[int, int]] = {}

    @property
    def sites(self) -> list[str]:
        return sorted(self._updates)

    def add(self, state: Mapping[str, Tensor], weight: float, scaling: float, site: str,
            rank: int | None = None) -> None:
        """``scaling`` is the site's s_k = alpha_k / r_k; ``rank``, when given, must match A and B."""
        weight = _check_weight(weight)
        if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
            raise InvalidUpdate(f"scaling must be a finite number > 0, got {scaling!r}")
        if site in self._updates:
            raise InvalidUpdate(f"{site!r} already contributed")
        validate_lora_update(state, rank=rank)
        shapes = lora_module_shapes(state)
        for prefix, shape in shapes.items():
            if prefix in self._shapes and self._shapes[prefix] != shape:
                raise InvalidUpdate(f"module {prefix!r}: expected (out, in) = {self._shapes[prefix]}, got {shape}")
        self._shapes.update(shapes)
        self._updates[site] = (dict(state), weight, float(scaling))

    def result(self) -> dict[str, Tensor]:
        """Stacked factors, applied with scaling 1."""
        if not self._updates:
            raise ValueError("no update added yet")
        ordered = [self._updates[s] for s in self.sites]
        return stack_lora([u[0] for u in ordered], [u[1] for u in ordered], [u[2] for u in ordered])
