"""Full-parameter fine-tuning of a small model, no LoRA (the one-shot job's ``full`` mode)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from flare_lora.components.strategies.base import SiteUpdate
from flare_lora.components.strategies.lora import AverageFold
from flare_lora.components.training.lora import load_full_state


class FullParameters:
    """Sites upload every trainable weight; the server takes their weighted average."""

    name = "full"
    lora = False
    site_specific_init = False
    shared_a = False

    def check(self, update: SiteUpdate, accepted: Sequence[SiteUpdate]) -> None:
        """Any site: the average fixes the parameter set at the first arrival."""

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        fold = self.fold()
        for u in updates:
            fold.add(u)
        return fold.result()[0]

    @staticmethod
    def commit(rounds: Sequence[Mapping[str, Tensor]]) -> None:
        """Nothing to do after a round is stored."""

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

    def fold(self) -> AverageFold:
        return AverageFold(self)
