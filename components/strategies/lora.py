"""The LoRA strategies: FLoRA stacking (exact or bounded), FedIT, zero-padding (HetLoRA), NVIDIA
FLARE's hlora and FedCDD (nested shared-A, a FLoRA variant: shared_a.py).

Wire format of a global payload (``FLModel.params``): a flat dict of tensors. FLoRA sends every
stacked round the site has not merged yet, keyed ``"r<round>/<lora key>"`` (shared-A: their B's only); FedIT, zero-pad and
FedCDD send the current global adapter under its plain LoRA keys (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from peft import get_peft_model_state_dict
from torch import Tensor

from flare_lora.components.algorithms.averaging import fedit, zero_pad
from flare_lora.components.algorithms.consensus_divergence import (
    DEFAULT_TEMPERATURE,
    check_options,
    fedcdd_aggregate,
)
from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, InvalidUpdate, module_prefixes
from flare_lora.components.algorithms.low_rank import check_target, project, truncate_lora
from flare_lora.components.algorithms.merge import base_originals, float_masters, merge_rounds_into, set_global_into
from flare_lora.components.algorithms.one_shot import OnlineAverage, OnlineStack
from flare_lora.components.algorithms.stacking import concat_lora, stack_lora
from flare_lora.components.strategies.base import SiteUpdate, check_one_scaling, pack_rounds, unpack_rounds
from flare_lora.components.training.lora import (
    base_weights,
    check_linear_modules,
    load_lora_state,
    reset_lora,
)


@dataclass(frozen=True)
class FLoRAOptions:
    """The bounded global (both None: exact, the default): after every round the server re-projects
    G_t = G_{t-1} + S_t (S_t the round's stack) to ``rank``, or to the smallest rank keeping a share
    ``energy`` of its Σσ² (algorithms/low_rank.py); sites hold W0 + G_t, and the catch-up payload
    and the exported adapter are G_t."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self):
        if self.rank is not None or self.energy is not None:
            check_target(self.rank, self.energy)

    @property
    def bounded(self) -> bool:
        return self.rank is not None or self.energy is not None


class FLoRA:
    """Exact stacking: the server keeps every round's stacked factors; sites merge them into W.
    With a bounded global (FLoRAOptions) the server sends G_t instead (keys ``g<t>/``)."""

    name = "flora"
    lora = True
    site_specific_init = True  # each site starts each round from its own random A
    shared_a = False  # True: sites train B only, on the round's shared A

    def __init__(self, options: FLoRAOptions | None = None):
        self.options = options or FLoRAOptions()
        self._globals: list[dict[str, Tensor]] = []  # bounded: G_t after round t

    def check(self, update: SiteUpdate, accepted: Sequence[SiteUpdate]) -> None:
        """Stacking takes any mix of ranks and alphas."""

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        return stack_lora(
            [u.state for u in updates], [u.num_examples for u in updates], [u.scaling for u in updates]
        )

    def commit(self, rounds: Sequence[Mapping[str, Tensor]]) -> dict | None:
        """After the server stored a round: the bounded global of every new round, and the last
        one's truncation report ({"rank", "error", "relative", "max_relative"}); None when exact."""
        report = None
        while self.options.bounded and len(self._globals) < len(rounds):
            pieces = [p for p in (self._globals[-1] if self._globals else {}, rounds[len(self._globals)]) if p]
            state, report = truncate_lora(concat_lora(pieces), self.options.rank, self.options.energy) \
                if pieces else ({}, None)
            self._globals.append(state)
        return report

    def payload(self, rounds: Sequence[Mapping[str, Tensor]], merged_rounds: int) -> dict[str, Tensor]:
        """Every stacked round a site that merged ``merged_rounds`` rounds still lacks (bounded: the
        latest global G, whatever the site lacks)."""
        if self.options.bounded:
            last = len(rounds) - 1
            return {f"g{last}/{k}": v for k, v in self._globals[last].items()} if merged_rounds <= last else {}
        return pack_rounds({r: rounds[r] for r in range(merged_rounds, len(rounds))})

    def final(self, rounds: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], float]:
        """All rounds folded into one adapter (bounded: G of the last round), applied with scaling 1."""
        if self.options.bounded:
            return (dict(self._globals[len(rounds) - 1]) if rounds else {}), 1.0
        done = [r for r in rounds if r]
        return (concat_lora(done) if done else {}), 1.0

    def install(self, peft_model, params: Mapping[str, Tensor], merged_rounds: int, seed: int) -> int:
        """Merge the rounds a site lacks into its base weights, then start a fresh LoRA.

        New rounds must continue at ``merged_rounds``; every site adds the same factors in the same
        order, so all sites end with bit-identical base weights; a bf16/fp16 base is accumulated in
        float32 (merge.py), so it holds cast(W0 + Σ ΔW). A bounded global (``g<t>/`` keys) sets
        W = cast(W0 + G_t) instead. Returns the new merged count.
        """
        if params and all(k.startswith("g") for k in params):
            merged_rounds = self._set_global(peft_model, params, merged_rounds)
            reset_lora(peft_model, seed)
            return merged_rounds
        # rounds the site already merged (its last report got lost) are skipped, not re-added
        rounds = {r: s for r, s in unpack_rounds(params).items() if r >= merged_rounds}
        expected = list(range(merged_rounds, merged_rounds + len(rounds)))
        if list(rounds) != expected:
            raise InvalidUpdate(f"catch-up rounds {list(rounds)} do not continue merged round count {merged_rounds}")
        rounds = {r: self.received_round(peft_model, r, state) for r, state in rounds.items()}
        for state in rounds.values():
            if state:
                check_linear_modules(peft_model, state)
        merge_rounds_into(base_weights(peft_model), [s for s in rounds.values() if s], float_masters(peft_model))
        reset_lora(peft_model, seed)
        return merged_rounds + len(rounds)

    @staticmethod
    def _set_global(peft_model, params: Mapping[str, Tensor], merged_rounds: int) -> int:
        """W = cast(W0 + G_t) from a ``g<t>/`` payload; the new merged count t + 1."""
        rounds = unpack_rounds(params, tag="g")
        if len(rounds) != 1:
            raise InvalidUpdate(f"a bounded global payload holds one round, got rounds {list(rounds)}")
        (last, state), = rounds.items()
        if last + 1 <= merged_rounds:
            return merged_rounds  # installed already (its report got lost)
        check_linear_modules(peft_model, state)
        set_global_into(base_weights(peft_model), state, base_originals(peft_model))
        return last + 1

    @staticmethod
    def received_round(peft_model, rnd: int, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A round of the payload as the site merges it (stacking: as sent)."""
        return state

    def fold(self) -> StackFold:
        return StackFold()


class _Averaging:
    """Shared halves of the methods whose global is one adapter that sites keep training."""

    lora = True
    scaling = 1.0  # scaling the global adapter is applied with
    site_specific_init = False  # round 0: every site must start from the same adapter
    shared_a = False

    def check(self, update: SiteUpdate, accepted: Sequence[SiteUpdate]) -> None:
        """Any mix of ranks (the global is applied with scaling 1)."""

    @staticmethod
    def commit(rounds: Sequence[Mapping[str, Tensor]]) -> None:
        """Nothing to do after a round is stored."""

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

    def fold(self):
        raise ValueError(f"method {self.name!r}: no one-shot fold (one-shot methods: flora, fedit, full)")

    @staticmethod
    def local_state(global_state: Mapping[str, Tensor], peft_model) -> dict[str, Tensor]:
        """A site of rank r and scaling s installs A_g[:r] and B_g[:, :r] / s (s folded into B), for
        the modules it adapts itself (other sites may adapt more)."""
        cfg = peft_model.peft_config["default"]
        rank, scaling = cfg.r, cfg.lora_alpha / cfg.r
        own = get_peft_model_state_dict(peft_model).keys()
        return {
            k: (v[:rank].clone() if k.endswith(LORA_A_SUFFIX) else v[:, :rank] / scaling)
            for k, v in global_state.items() if k in own
        }


class FedIT(_Averaging):
    """Weighted mean of A's and of B's: inexact for the product; needs equal ranks and alphas."""

    name = "fedit"

    def check(self, update: SiteUpdate, accepted: Sequence[SiteUpdate]) -> None:
        check_one_scaling(update, accepted, self.name)

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        for i, update in enumerate(updates):
            self.check(update, updates[:i])
        self.scaling = updates[0].scaling
        return fedit([u.state for u in updates], [u.num_examples for u in updates])

    def fold(self) -> AverageFold:
        return AverageFold(self)

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


@dataclass(frozen=True)
class HLoRAOptions:
    """hlora's global rank (None: each module's largest site rank among the round's updates)."""

    rank: int | None = None

    def __post_init__(self):
        if self.rank is not None:
            check_target(self.rank, None)


class HLoRA(_Averaging):
    """NVIDIA FLARE's heterogeneous-rank baseline (examples/advanced/medgemma, HLoRA), rebuilt from its
    description: the weighted sum of the sites' adapters Σ p_k s_k B_k A_k (a stack, as FLoRA) is
    projected to a fixed global rank R by QR + SVD of the small core (B_g orthonormal, σ in A_g,
    zero-padded to R), and a site of rank r keeps the top r components (A_g[:r], B_g[:, :r] / s, as
    zero-padding installs). Sites keep training the global adapter, as with FedIT. Inexact twice:
    the rank-R projection drops the tail, a rank-r site the components past r. NVFlare's weighs
    B_k A_k without s_k (its sites share one α/r); here s_k is included."""

    name = "hlora"

    def __init__(self, options: HLoRAOptions | None = None):
        self.options = options or HLoRAOptions()

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        stacked = stack_lora([u.state for u in updates], [u.num_examples for u in updates],
                             [u.scaling for u in updates])
        out = {}
        for prefix in module_prefixes(stacked):
            a_key, b_key = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
            rank = self.options.rank or max(u.state[a_key].shape[0] for u in updates if a_key in u.state)
            b, a, _ = project(stacked[b_key], stacked[a_key], rank=rank, split="a")
            out[a_key] = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
            out[b_key] = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        return out


@dataclass(frozen=True)
class FedCDDOptions:
    """FedCDD's options (docs/fedcdd.md): the ablation variant and those of ``fedcdd_aggregate``."""

    variant: str = "full"  # "full" | "consensus" (consensus magnitude only) | "divergence" (direction only)
    temperature: float = DEFAULT_TEMPERATURE
    weighting: str = "uniform"
    similarity: str = "uniqueness"
    axis: str = "column"
    target: str = "factors"  # "factors" (one rank) | "delta" (ΔW = s B A re-factorised: any ranks)
    rank: int | None = None
    shrink: str = "cancellation"  # the consensus magnitude's guard: "cancellation" | "agreement" | "none"

    def __post_init__(self):
        if self.variant not in FedCDD.VARIANTS:
            raise ValueError(f"variant: expected one of {list(FedCDD.VARIANTS)}, got {self.variant!r}")
        check_options(**{k: v for k, v in asdict(self).items() if k != "variant"})


class FedCDD(_Averaging):
    """Consensus-divergence decoupled aggregation (flare_lora.components.algorithms.consensus_divergence).

    Server: per LoRA matrix, consensus column magnitudes (weighted mean of the sites' column
    norms) times divergence directions (unit columns combined with duplicate-robust similarity
    weights). Sites keep training the global adapter, as with FedIT. The global is applied with
    scaling 1 (s_k folded into B); a site installs A_g[:r] and B_g[:, :r] / s, as with
    zero-padding. target "factors" needs one rank across sites; "delta" takes any ranks.
    """

    name = "fedcdd"
    VARIANTS = {"full": (True, True), "consensus": (True, False), "divergence": (False, True)}

    def __init__(self, options: FedCDDOptions | None = None):
        self.options = options or FedCDDOptions()

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        consensus, divergence = self.VARIANTS[self.options.variant]
        kwargs = {k: v for k, v in asdict(self.options).items() if k != "variant"}
        return fedcdd_aggregate(
            [u.state for u in updates],
            [u.num_examples for u in updates],
            scalings=[u.scaling for u in updates],
            consensus=consensus,
            divergence=divergence,
            **kwargs,
        )


class StackFold:
    """One-shot FLoRA: incremental stacking in site-name order (any ranks), applied with scaling 1."""

    def __init__(self):
        self._stack = OnlineStack()

    @property
    def sites(self) -> list[str]:
        return self._stack.sites

    def add(self, update: SiteUpdate) -> None:
        self._stack.add(update.state, update.num_examples, update.scaling, update.site, rank=update.rank)

    def result(self) -> tuple[dict[str, Tensor], float]:
        return self._stack.result(), 1.0


class AverageFold:
    """One-shot running weighted average of what the sites send (FedIT factors, or full weights)."""

    def __init__(self, strategy):
        self.strategy = strategy
        self._average = OnlineAverage()
        self._accepted: list[SiteUpdate] = []

    @property
    def sites(self) -> list[str]:
        return self._average.sites

    def add(self, update: SiteUpdate) -> None:
        self.strategy.check(update, self._accepted)
        self._average.add(update.state, update.num_examples, update.site)
        self._accepted.append(update)

    def result(self) -> tuple[dict[str, Tensor], float | None]:
        if not self.strategy.lora:
            return self._average.result(), None
        return self._average.result(), (self._accepted[0].scaling if self._accepted else 1.0)
