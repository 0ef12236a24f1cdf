"""Aggregation methods as small strategy objects, one server half and one client half each.

The server half turns the round's accepted site updates into what every site must install next;
the client half installs it into the site's model. Both are plain torch + peft (no nvflare), so the
whole protocol can be simulated in-process (benchmarks do) and the FLARE glue stays thin.

Wire format of a global payload (``FLModel.params``): a flat dict of tensors. FLoRA sends every
stacked round the site has not merged yet, keyed ``"r<round>/<lora key>"``; FedIT, zero-pad and
FedCDD send the current global adapter under its plain LoRA keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from flare_lora.components.algorithms.averaging import fedit, zero_pad
from flare_lora.components.algorithms.consensus_divergence import DEFAULT_TEMPERATURE, check_options, fedcdd_aggregate
from flare_lora.components.algorithms.lora_state import (
    LORA_A_SUFFIX,
    InvalidUpdate,
    lora_module_shapes,
    validate_lora_update,
)
from flare_lora.components.algorithms.merge import merge_rounds_into
from flare_lora.components.algorithms.one_shot import OnlineAverage
from flare_lora.components.algorithms.stacking import concat_lora, stack_lora
from flare_lora.components.training.lora import base_weights, load_full_state, load_lora_state, reset_lora

METHODS = ("flora", "fedit", "zero_pad", "fedcdd")  # LoRA methods of the multi-round job
ONE_SHOT_METHODS = ("flora", "fedit", "full")  # how the one-shot job folds arrivals


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
    """Reject a malformed site update before it can touch the aggregate (raises InvalidUpdate).

    ``known_shapes`` ({prefix: (out, in)}) are the module shapes already accepted in this job: a
    module seen before must keep its shape; new modules (another site's target set) are allowed.
    """
    if not isinstance(update.rank, int) or isinstance(update.rank, bool) or update.rank <= 0:
        raise InvalidUpdate(f"declared rank must be a positive int, got {update.rank!r}")
    if not update.alpha > 0:
        raise InvalidUpdate(f"declared alpha must be > 0, got {update.alpha!r}")
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        raise InvalidUpdate(f"declared num_examples must be a positive int, got {update.num_examples!r}")
    validate_lora_update(update.state, rank=update.rank)
    for prefix, shape in lora_module_shapes(update.state).items():
        if known_shapes and prefix in known_shapes and tuple(known_shapes[prefix]) != shape:
            raise InvalidUpdate(f"module {prefix!r}: expected (out, in) = {tuple(known_shapes[prefix])}, got {shape}")


class FLoRA:
    """Exact stacking: the server keeps every round's stacked factors; sites merge them into W."""

    name = "flora"
    lora = True
    site_specific_init = True  # each site starts each round from its own random A

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        return stack_lora(
            [u.state for u in updates], [u.num_examples for u in updates], [u.scaling for u in updates]
        )

    @staticmethod
    def payload(rounds: Sequence[Mapping[str, Tensor]], merged_rounds: int) -> dict[str, Tensor]:
        """Every stacked round a site that merged ``merged_rounds`` rounds still lacks."""
        return pack_rounds({r: rounds[r] for r in range(merged_rounds, len(rounds))})

    @staticmethod
    def final(rounds: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], float]:
        """All rounds folded into one adapter, applied with scaling 1."""
        done = [r for r in rounds if r]
        return (concat_lora(done) if done else {}), 1.0

    @staticmethod
    def install(peft_model, params: Mapping[str, Tensor], merged_rounds: int, seed: int) -> int:
        """Merge the rounds a site lacks into its base weights, then start a fresh LoRA.

        New rounds must continue at ``merged_rounds``; every site adds the same factors in the same
        order, so all sites end with bit-identical base weights. Returns the new merged count.
        """
        # rounds the site already merged (its last report got lost) are skipped, not re-added
        rounds = {r: s for r, s in unpack_rounds(params).items() if r >= merged_rounds}
        expected = list(range(merged_rounds, merged_rounds + len(rounds)))
        if list(rounds) != expected:
            raise InvalidUpdate(f"catch-up rounds {list(rounds)} do not continue merged round count {merged_rounds}")
        merge_rounds_into(base_weights(peft_model), [s for s in rounds.values() if s])
        reset_lora(peft_model, seed)
        return merged_rounds + len(rounds)


class _Averaging:
    """Shared halves of the methods whose global is one adapter that sites keep training."""

    lora = True
    scaling = 1.0  # scaling the global adapter is applied with
    site_specific_init = False  # round 0: every site must start from the same adapter

    @staticmethod
    def payload(rounds: Sequence[Mapping[str, Tensor]], merged_rounds: int) -> dict[str, Tensor]:
        return dict(rounds[-1]) if rounds else {}

    def final(self, rounds: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], float]:
        return (dict(rounds[-1]) if rounds else {}), self.scaling

    def install(self, peft_model, params: Mapping[str, Tensor], merged_rounds: int, seed: int) -> int:
        """Load the global adapter (round 0: a seed-shared init, so every site starts equal)."""
        if params:
            load_lora_state(peft_model, self.local_state(params, peft_model))
        elif merged_rounds == 0:
            reset_lora(peft_model, seed)
        return merged_rounds + (1 if params else 0)


class FedIT(_Averaging):
    """Weighted mean of A's and of B's: inexact for the product; needs equal ranks and alphas."""

    name = "fedit"

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        scalings = {u.scaling for u in updates}
        if len(scalings) != 1:
            raise ValueError(f"fedit needs one alpha/rank across sites, got {sorted(scalings)}")
        self.scaling = scalings.pop()
        return fedit([u.state for u in updates], [u.num_examples for u in updates])

    @staticmethod
    def local_state(global_state: Mapping[str, Tensor], peft_model) -> dict[str, Tensor]:
        return dict(global_state)


class ZeroPad(_Averaging):
    """HetLoRA zero-padding to the largest rank; the global is applied with scaling 1."""

    name = "zero_pad"

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        return zero_pad(
            [u.state for u in updates], [u.num_examples for u in updates], [u.scaling for u in updates]
        )

    @staticmethod
    def local_state(global_state: Mapping[str, Tensor], peft_model) -> dict[str, Tensor]:
        """A site of rank r and scaling s installs A_g[:r] and B_g[:, :r] / s."""
        cfg = peft_model.peft_config["default"]
        rank, scaling = cfg.r, cfg.lora_alpha / cfg.r
        return {
            k: (v[:rank].clone() if k.endswith(LORA_A_SUFFIX) else v[:, :rank] / scaling)
            for k, v in global_state.items()
        }


class FedCDD(_Averaging):
    """Consensus-divergence decoupled aggregation (flare_lora.components.algorithms.consensus_divergence).

    Server: per LoRA matrix, consensus column magnitudes (weighted mean of the sites' column
    norms) times divergence directions (unit columns combined with duplicate-robust similarity
    weights). Sites keep training the global adapter, as with FedIT. The global is applied with
    scaling 1 (s_k folded into B); a site of rank r and scaling s installs A_g[:r] and
    B_g[:, :r] / s, as with zero-padding. target="factors" (default) needs one rank across sites;
    target="delta" works on ΔW_k = s_k B_k A_k and accepts heterogeneous ranks (the SVD orders
    the global's components, so a low-rank site installs the best rank-r part).

    Options (``get_method("fedcdd", **options)``): variant "full" | "consensus" (consensus
    magnitude, FedIT direction) | "divergence" (FedIT magnitude, divergence direction), and
    temperature, weighting, similarity, axis, target, rank of ``fedcdd_aggregate``.
    """

    name = "fedcdd"
    VARIANTS = {"full": (True, True), "consensus": (True, False), "divergence": (False, True)}

    def __init__(
        self,
        variant: str = "full",
        temperature: float = DEFAULT_TEMPERATURE,
        weighting: str = "uniform",
        similarity: str = "uniqueness",
        axis: str = "column",
        target: str = "factors",
        rank: int | None = None,
    ):
        if variant not in self.VARIANTS:
            raise ValueError(f"variant: expected one of {list(self.VARIANTS)}, got {variant!r}")
        check_options(temperature=temperature, weighting=weighting, similarity=similarity, axis=axis,
                      target=target, rank=rank)
        self.variant = variant
        self.options = dict(temperature=temperature, weighting=weighting, similarity=similarity, axis=axis,
                            target=target, rank=rank)

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        consensus, divergence = self.VARIANTS[self.variant]
        return fedcdd_aggregate(
            [u.state for u in updates],
            [u.num_examples for u in updates],
            scalings=[u.scaling for u in updates],
            consensus=consensus,
            divergence=divergence,
            **self.options,
        )

    local_state = staticmethod(ZeroPad.local_state)


class FullParameters:
    """Full-parameter fine-tuning of a small model, no LoRA: sites upload every trainable weight
    and the server takes their weighted average (the one-shot job's ``full`` mode)."""

    name = "full"
    lora = False
    site_specific_init = False

    @staticmethod
    def aggregate(updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        average = OnlineAverage()
        for u in updates:
            average.add(u.state, u.num_examples, u.site)
        return average.result()

    @staticmethod
    def payload(rounds: Sequence[Mapping[str, Tensor]], merged_rounds: int) -> dict[str, Tensor]:
        return dict(rounds[-1]) if rounds else {}

    @staticmethod
    def final(rounds: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], None]:
        return (dict(rounds[-1]) if rounds else {}), None

    @staticmethod
    def install(model, params: Mapping[str, Tensor], merged_rounds: int, seed: int) -> int:
        """Load the global weights (strict on the names sent: a typo is an error, not a no-op)."""
        if params:
            load_full_state(model, params)
        return merged_rounds + (1 if params else 0)


_TABLE = {"flora": FLoRA, "fedit": FedIT, "zero_pad": ZeroPad, "fedcdd": FedCDD, "full": FullParameters}


def get_method(name: str, **options):
    """The strategy object for a method name (ValueError listing the choices).

    ``options`` go to the strategy's constructor (only fedcdd takes any); an unknown option is a
    ValueError naming it.
    """
    if name not in _TABLE:
        raise ValueError(f"method: expected one of {list(_TABLE)}, got {name!r}")
    cls = _TABLE[name]
    if options:
        accepted = [] if cls.__init__ is object.__init__ else [
            p for p in inspect.signature(cls.__init__).parameters if p != "self"
        ]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"method {name!r}: unknown option {unknown[0]!r}; expected one of {accepted}")
    return cls(**options)
