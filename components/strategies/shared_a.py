"""Nested shared-A, a FLoRA variant whose global is a plain weighted sum of B's (algorithms/shared_a.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from flare_lora.components.algorithms.lora_init import init_seed
from flare_lora.components.algorithms.lora_state import LORA_B_SUFFIX, InvalidUpdate
from flare_lora.components.algorithms.shared_a import b_only, shared_a_sum, with_shared_a
from flare_lora.components.strategies.base import SiteUpdate, pack_rounds
from flare_lora.components.strategies.lora import FLoRA
from flare_lora.components.training.lora import linear_shapes


class SharedA(FLoRA):
    """Nested shared-A (algorithms/shared_a.py): every site of round t trains only B on the first r_k
    rows of one frozen A drawn from the round's shared seed (``init_seed(key, t)``); the server's
    global is a weighted sum of zero-padded B's, exact for mixed ranks, and under HE a plain sum of
    ciphertexts. Rounds are merged into the base as with FLoRA; only B's travel.

    ``key`` names the seeds: the server sets it (the id of the job that ran round 0, kept in its
    checkpoint) and sends it with every task, and a site takes it from there. ``shapes`` (server: the
    job's pinned module shapes) lets the server redraw each site's A to vet and export it.
    """

    name = "shared_a"
    site_specific_init = False
    shared_a = True
    TASK_KEY = "shared_a_key"  # task meta entry carrying ``key``

    def __init__(self):
        super().__init__()
        self.key = ""
        self.shapes: dict[str, tuple[int, int]] = {}

    def bind(self, key: str, module_shapes) -> None:
        """Server: the seeds' key and the job's pinned {prefix: (out, in)} (ValueError without them)."""
        if not module_shapes:
            raise ValueError("method 'shared_a': the server draws every site's A itself, so it needs the base "
                             "model's module shapes (module_shapes; give the job the model or --model-config)")
        self.key, self.shapes = key, {prefix: tuple(shape) for prefix, shape in module_shapes.items()}

    def round_seed(self, rnd: int) -> int:
        return init_seed(self.key, rnd)

    def expand(self, state: Mapping[str, Tensor], rnd: int, rank) -> dict[str, Tensor]:
        """Server: a site's B-only update of round ``rnd`` at its declared ``rank`` with its A (the
        server's own draw)."""
        return with_shared_a(state, self.round_seed(rnd), self.shapes, rank)

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        return shared_a_sum([u.state for u in updates], [u.num_examples for u in updates],
                            [u.scaling for u in updates])

    @staticmethod
    def payload(rounds: Sequence[Mapping[str, Tensor]], merged_rounds: int) -> dict[str, Tensor]:
        """The B_g of every round the site lacks (its A is redrawn at the site)."""
        return pack_rounds({r: b_only(rounds[r]) for r in range(merged_rounds, len(rounds))})

    def received_round(self, peft_model, rnd: int, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """B_g completed with round ``rnd``'s shared A at its rank, for any linear module of the base model
        (other sites may adapt modules this one does not)."""
        return with_shared_a(state, self.round_seed(rnd), linear_shapes(peft_model, [k[: -len(LORA_B_SUFFIX)] for k in state]))

    def fold(self) -> SharedAFold:
        return SharedAFold(self)


class SharedAFold:
    """One-shot shared-A: the updates folded so far (with the A the server drew), summed as a round
    (any ranks; the global is recomputed from them, exact whatever the arrival order)."""

    def __init__(self, strategy: SharedA):
        self.strategy = strategy
        self._updates: list[SiteUpdate] = []

    @property
    def sites(self) -> list[str]:
        return [u.site for u in self._updates]

    def add(self, update: SiteUpdate) -> None:
        if update.site in self.sites:
            raise InvalidUpdate(f"{update.site!r} already contributed")
        self.strategy.aggregate([*self._updates, update])  # raises on an update that does not sum, before it is kept
        self._updates.append(update)

    def result(self) -> tuple[dict[str, Tensor], float]:
        return (self.strategy.aggregate(self._updates) if self._updates else {}), 1.0
