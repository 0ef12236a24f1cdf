"""The strategy interface every aggregation method implements, and what a site contributes.

A strategy has a server half (vet-time rules, aggregation, what each site is sent, the final
model, arrival-order folding for the one-shot job) and a client half (installing what the server
sent into the site's model). Both are plain torch + peft, no nvflare: the whole protocol can be
simulated in-process (benchmarks do) and the FLARE glue stays thin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from flare_lora.components.algorithms.lora_state import InvalidUpdate, lora_module_shapes, validate_lora_update


@dataclass
class SiteUpdate:
    """One site's accepted contribution to a round."""

    site: str
    state: dict[str, Tensor]
    num_examples: int
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class Fold(Protocol):
    """Arrival-order folding of the one-shot job: the aggregate of the sites added so far."""

    sites: list[str]

    def add(self, update: SiteUpdate) -> None: ...  # a bad update raises and leaves the fold as it was

    def result(self) -> tuple[dict[str, Tensor], float | None]: ...  # (state, scaling; None: full weights)


@runtime_checkable
class Strategy(Protocol):
    name: str
    lora: bool  # updates are LoRA factors (else full weights)
    site_specific_init: bool  # True: each site starts each round from its own random A

    def check(self, update: SiteUpdate, accepted: Sequence[SiteUpdate]) -> None:
        """The method's own rule for one more update next to those accepted (raises InvalidUpdate)."""

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        """The round's global from its vetted updates."""

    def payload(self, rounds: Sequence[Mapping[str, Tensor]], merged_rounds: int) -> dict[str, Tensor]:
        """What a site that installed ``merged_rounds`` rounds is sent."""

    def final(self, rounds: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], float | None]:
        """The model to export and the scaling it is applied with."""

    def install(self, model, params: Mapping[str, Tensor], merged_rounds: int, seed: int) -> int:
        """Client half: install the payload; returns the new merged round count."""

    def fold(self) -> Fold:
        """A fresh one-shot fold."""


def pack_rounds(rounds: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Flatten {round: stacked state} into one params dict (FLARE ships flat dicts of tensors)."""
    return {f"r{r}/{k}": v for r, state in rounds.items() for k, v in state.items()}


def unpack_rounds(params: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Inverse of pack_rounds, ordered by round."""
    rounds: dict[int, dict[str, Tensor]] = {}
    for key, value in params.items():
        head, sep, rest = key.partition("/")
        if not sep or not head.startswith("r") or not head[1:].isdigit():
            raise InvalidUpdate(f"global payload key {key!r}: expected 'r<round>/<lora key>'")
        rounds.setdefault(int(head[1:]), {})[rest] = value
    return dict(sorted(rounds.items()))


def check_update(update: SiteUpdate, known_shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Reject a malformed LoRA site update before it can touch the aggregate (raises InvalidUpdate).

    ``known_shapes`` ({prefix: (out, in)}) are the module shapes already accepted in this job: a
    module seen before must keep its shape; new modules (another site's target set) are allowed.
    """
    if not isinstance(update.rank, int) or isinstance(update.rank, bool) or update.rank <= 0:
        raise InvalidUpdate(f"declared rank must be a positive int, got {update.rank!r}")
    if not isinstance(update.alpha, float | int) or not update.alpha > 0:
        raise InvalidUpdate(f"declared alpha must be > 0, got {update.alpha!r}")
    check_examples(update.num_examples)
    validate_lora_update(update.state, rank=update.rank)
    for prefix, shape in lora_module_shapes(update.state).items():
        if known_shapes and prefix in known_shapes and tuple(known_shapes[prefix]) != shape:
            raise InvalidUpdate(f"module {prefix!r}: expected (out, in) = {tuple(known_shapes[prefix])}, got {shape}")


def check_examples(num_examples) -> None:
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise InvalidUpdate(f"declared num_examples must be a positive int, got {num_examples!r}")


def check_one_scaling(update: SiteUpdate, accepted: Sequence[SiteUpdate], method: str) -> None:
    """Methods that average A's and B's elementwise need one alpha/rank across sites."""
    for other in accepted:
        if abs(other.scaling - update.scaling) > 1e-12:
            raise InvalidUpdate(f"{method} needs one alpha/rank across sites: {update.scaling} vs "
                                f"{other.scaling} at {other.site}")
