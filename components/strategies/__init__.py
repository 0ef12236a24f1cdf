"""Aggregation strategies: one interface (``Strategy``), one registry (``get_method``).

``get_method("flora")`` and friends return the server and client halves of a method; the FLARE
controllers, the HE aggregators (privacy/he_server.py) and the benchmarks all go through them.
"""

from flare_lora.components.strategies.base import (
    SiteUpdate,
    Strategy,
    check_examples,
    check_update,
    pack_rounds,
    unpack_rounds,
)
from flare_lora.components.strategies.full import FullParameters
from flare_lora.components.strategies.lora import FedCDD, FedCDDOptions, FedIT, FLoRA, ZeroPad
from flare_lora.components.strategies.shared_a import SharedA
from flare_lora.components.strategies.registry import METHODS, ONE_SHOT_METHODS, REGISTRY, get_method

__all__ = [
    "METHODS", "ONE_SHOT_METHODS", "REGISTRY", "FLoRA", "FedCDD", "FedCDDOptions", "FedIT", "FullParameters",
    "SharedA", "SiteUpdate", "Strategy", "ZeroPad", "check_examples", "check_update", "get_method", "pack_rounds",
    "unpack_rounds",
]
