"""One registry of aggregation strategies, with typed per-method options."""

from __future__ import annotations

import dataclasses

from flare_lora.components.strategies.base import Strategy
from flare_lora.components.strategies.full import FullParameters
from flare_lora.components.strategies.lora import (
    FedCDD,
    FedCDDOptions,
    FedIT,
    FLoRA,
    FLoRAOptions,
    HLoRA,
    HLoRAOptions,
    ZeroPad,
)
from flare_lora.components.strategies.shared_a import SharedA

# name -> (strategy class, its options dataclass or None)
REGISTRY: dict[str, tuple[type, type | None]] = {
    "flora": (FLoRA, FLoRAOptions),
    "shared_a": (SharedA, None),
    "fedit": (FedIT, None),
    "zero_pad": (ZeroPad, None),
    "hlora": (HLoRA, HLoRAOptions),
    "fedcdd": (FedCDD, FedCDDOptions),
    "full": (FullParameters, None),
}
METHODS = ("flora", "shared_a", "fedit", "zero_pad", "hlora", "fedcdd")  # LoRA methods of the multi-round job
ONE_SHOT_METHODS = ("flora", "shared_a", "fedit", "full")  # those with an arrival-order fold


def get_method(name: str, **options) -> Strategy:
    """The strategy for a method name (ValueError listing the choices).

    ``options`` build the method's options dataclass; an unknown option, or an option of a method
    that takes none, is a ValueError naming it and the accepted ones.
    """
    if name not in REGISTRY:
        raise ValueError(f"method: expected one of {list(REGISTRY)}, got {name!r}")
    cls, options_cls = REGISTRY[name]
    accepted = [f.name for f in dataclasses.fields(options_cls)] if options_cls else []
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {name!r}: unknown option {unknown[0]!r}; expected one of {accepted}")
    return cls(options_cls(**options)) if options_cls else cls()
