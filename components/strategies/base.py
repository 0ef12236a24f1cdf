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

from flare_lora.components.algorithms.lora_state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    InvalidUpdate,
    lora_module_shapes,
    product_norms,
    targeted,
    validate_lora_update,
)


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
    shared_a: bool  # True: sites train only B on the round's shared A and upload B

    def check(self, update: SiteUpdate, accepted: Sequence[SiteUpdate]) -> None:
        """The method's own rule for one more update next to those accepted (raises InvalidUpdate)."""

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        """The round's global from its vetted updates."""

    def commit(self, rounds: Sequence[Mapping[str, Tensor]]) -> dict | None:
        """After the server stored a round (multi-round job): a report for its record, or None."""

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


def unpack_rounds(params: Mapping[str, Tensor], tag: str = "r") -> dict[int, dict[str, Tensor]]:
    """Inverse of pack_rounds, ordered by round (``tag`` "g": a bounded FLoRA global's keys)."""
    rounds: dict[int, dict[str, Tensor]] = {}
    for key, value in params.items():
        head, sep, rest = key.partition("/")
        if not sep or not head.startswith(tag) or not head[1:].isdigit():
            raise InvalidUpdate(f"global payload key {key!r}: expected '{tag}<round>/<lora key>'")
        rounds.setdefault(int(head[1:]), {})[rest] = value
    return dict(sorted(rounds.items()))


DEFAULT_MAX_EXAMPLES = 1_000_000
DEFAULT_MAX_UPDATE_NORM = 100.0


@dataclass(frozen=True)
class UpdateLimits:
    """What the server accepts from a site beyond a well-formed update (docs/production.md).

    module_shapes: {prefix: (out, in)}: the modules the job's target_modules adapt on the base
        model (``components/training/module_shapes.py``, read when the job is built); any other
        module, or another shape, is rejected. None (the job was built without the base model's
        config): a site's modules must match its own target_modules and keep the shapes accepted
        before in the job.
    max_examples: the largest num_examples a site may declare (its weight in the aggregate).
    max_update_norm: X, the largest ||s * B @ A||_F of one module of a LoRA update and of the
        round's aggregate; ||A||_F and ||s * B||_F up to √X (0: no bound).
    """

    module_shapes: Mapping[str, tuple[int, int]] | None = None
    max_examples: int = DEFAULT_MAX_EXAMPLES
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM


def pinned_shapes(module_shapes) -> dict[str, tuple[int, int]] | None:
    """A job config's [[prefix, out, in], ...] as UpdateLimits.module_shapes (ValueError naming the
    entry). A list, not {prefix: shape}: FLARE's config loading turns dotted keys into nested dicts."""
    if module_shapes is None:
        return None
    if not isinstance(module_shapes, Sequence) or isinstance(module_shapes, str) or not module_shapes:
        raise ValueError(f"module_shapes: expected [[module prefix, out, in], ...], got {module_shapes!r}")
    pinned = {}
    for entry in module_shapes:
        if not isinstance(entry, Sequence) or len(entry) != 3 or not isinstance(entry[0], str) \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry[1:]):
            raise ValueError(f"module_shapes: expected [module prefix, out, in] with positive ints, got {entry!r}")
        pinned[entry[0]] = (entry[1], entry[2])
    return pinned


def check_limits(max_examples, max_update_norm) -> None:
    """Config errors for the two numeric limits (key, expected vs got)."""
    if not isinstance(max_examples, int) or isinstance(max_examples, bool) or max_examples < 1:
        raise ValueError(f"max_examples: expected an integer >= 1, got {max_examples!r}")
    if isinstance(max_update_norm, bool) or not isinstance(max_update_norm, float | int) \
            or not 0 <= max_update_norm < float("inf"):
        raise ValueError(f"max_update_norm: expected a finite number >= 0 (0: no bound), got {max_update_norm!r}")


def check_update(update: SiteUpdate, limits: UpdateLimits = UpdateLimits(), *,
                 learned: Mapping[str, tuple[int, int]] | None = None, targets: Sequence[str] | None = None) -> None:
    """Reject a malformed or out-of-bounds LoRA site update before it can touch the aggregate
    (raises InvalidUpdate naming the key). ``learned``: the shapes accepted so far in the job, used
    when ``limits.module_shapes`` is None; ``targets``: the site's declared target_modules."""
    if not isinstance(update.rank, int) or isinstance(update.rank, bool) or update.rank <= 0:
        raise InvalidUpdate(f"declared rank must be a positive int, got {update.rank!r}")
    if isinstance(update.alpha, bool) or not isinstance(update.alpha, float | int) \
            or not 0 < update.alpha < float("inf"):
        raise InvalidUpdate(f"declared alpha must be a finite number > 0, got {update.alpha!r}")
    check_examples(update.num_examples, limits.max_examples)
    validate_lora_update(update.state, rank=update.rank, expected_shapes=limits.module_shapes)
    modules = lora_module_shapes(update.state)
    for prefix, shape in modules.items():
        if targets is not None and not targeted(prefix, targets):
            raise InvalidUpdate(f"module {prefix!r}: not one of the site's target_modules {list(targets)}")
        if learned and prefix in learned and tuple(learned[prefix]) != shape:
            raise InvalidUpdate(f"module {prefix!r}: expected (out, in) = {tuple(learned[prefix])}, got {shape}")
    if limits.module_shapes is not None and targets is not None:  # every module it adapts, not a subset
        missing = sorted(p for p in limits.module_shapes if targeted(p, targets) and p not in modules)
        if missing:
            raise InvalidUpdate(f"modules {missing[:3]} ({len(missing)} in all) of the site's target_modules "
                                "are missing: a site sends every module it adapts")
    if limits.max_update_norm:
        check_update_norms(update.state, update.scaling, limits.max_update_norm, factors=True)


def check_update_norms(state: Mapping[str, Tensor], scaling: float, bound: float, factors: bool = False) -> None:
    """||s*B@A||_F <= bound for every module, and with ``factors`` ||A||_F and ||s*B||_F <= √bound:
    the product alone can be kept small by a huge A and a tiny B, which methods that average A's
    and B's separately turn into a large global. With both factor caps every aggregate (weighted
    sums, padding, stacking) keeps ||s*B@A||_F <= bound (InvalidUpdate naming the module)."""
    for prefix, norm in product_norms(state, scaling).items():
        a, b = state[prefix + LORA_A_SUFFIX], state[prefix + LORA_B_SUFFIX]
        checks = [("||s*B@A||_F", norm, bound)]
        if factors and 0 not in a.stride() and 0 not in b.stride():  # HE shape stubs carry no values
            checks += [("||A||_F", float(a.double().norm()), bound ** 0.5),
                       ("||s*B||_F", abs(float(scaling)) * float(b.double().norm()), bound ** 0.5)]
        for what, value, limit in checks:
            if not value <= limit:
                raise InvalidUpdate(f"module {prefix!r}: {what} = {value:.4g} exceeds "
                                    f"{'√' if limit != bound else ''}max_update_norm={limit:.4g}")


def check_examples(num_examples, max_examples: int = DEFAULT_MAX_EXAMPLES) -> None:
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise InvalidUpdate(f"declared num_examples must be a positive int, got {num_examples!r}")
    if num_examples > max_examples:
        raise InvalidUpdate(f"declared num_examples={num_examples} exceeds max_examples={max_examples}")


def check_one_scaling(update: SiteUpdate, accepted: Sequence[SiteUpdate], method: str) -> None:
    """Methods that average A's and B's elementwise need one alpha/rank across sites."""
    for other in accepted:
        if abs(other.scaling - update.scaling) > 1e-12:
            raise InvalidUpdate(f"{method} needs one alpha/rank across sites: {update.scaling} vs "
                                f"{other.scaling} at {other.site}")
