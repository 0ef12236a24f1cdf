"""Plaintext aggregators: what a server workflow aggregates with when HE is off.

Each job's workflow talks to one aggregator interface; privacy/he_server.py has the encrypted
aggregators with the same methods, so turning HE on swaps the object, not the workflow's code:

- rounds (multi-round LoRA job): ``plan``, ``vet``, ``aggregate``, ``payload``, ``save``
- layers (selective-layer job): ``plan``, ``vet``, ``aggregate``, ``payload``, ``save``
- fold (one-shot job): ``plan``, ``vet``, ``add``, ``sites``, ``payload``, ``save``

``vet`` returns (the tensors the plaintext checks run on, what is aggregated); for plaintext both
are the site's tensors, for HE shape stubs and ciphertexts. ``plan`` is what the task meta
carries for the sites (None: nothing). ``save`` writes what the server may keep and returns the
results-log entries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from torch import Tensor

from flare_lora.components.adapter_export import save_tensors, write_model
from flare_lora.components.algorithms.layer_average import average_layers, layer_of
from flare_lora.components.algorithms.lora_state import InvalidUpdate
from flare_lora.components.strategies.base import SiteUpdate, Strategy
from flare_lora.components.strategies.lora import FLoRA


def plain_params(params) -> dict[str, Tensor]:
    """A result's params as {str: Tensor}; anything else is the site's fault, not the server's."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidUpdate(f"params: expected a dict of tensors, got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InvalidUpdate(f"params: expected str keys and tensors, got {type(key).__name__} -> "
                                f"{type(value).__name__}")
    return dict(params)


class PlainRounds:
    """The multi-round LoRA global: one aggregated state per round."""

    encrypted = False

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def describe(self) -> dict | None:
        return None

    def plan(self, ranks: Sequence[int], final: Mapping | None = None) -> dict | None:
        return None

    def vet(self, params, rank, site: str, accepted=()) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        state = plain_params(params)
        return state, state

    def aggregate(self, updates: Sequence[SiteUpdate]) -> dict[str, Tensor]:
        return self.strategy.aggregate(updates)

    def payload(self, rounds: Sequence, merged: int, final: bool = False) -> dict:
        return self.strategy.payload(rounds, merged)

    def save(self, out: str, rounds: Sequence, final: bool, spec: Mapping) -> dict:
        if not final or not rounds:
            return {}
        state, scaling = self.strategy.final(rounds)
        return write_model(out, state, {**spec, "scaling": scaling}) if state else {}


class PlainLayers:
    """The selective-layer global: the latest average of every layer trained so far."""

    encrypted = False

    def __init__(self):
        self.state: dict[str, Tensor] = {}

    def describe(self) -> dict | None:
        return None

    def plan(self, final: Mapping | None = None) -> dict | None:
        return None

    def vet(self, params) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        state = plain_params(params)
        return state, state

    def aggregate(self, states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> list[int]:
        new = average_layers(states, weights)
        self.state.update({k: v.contiguous() for k, v in new.items()})
        return sorted({layer_of(k) for k in new})

    def payload(self, layers) -> dict[str, Tensor]:
        return {k: v for k, v in self.state.items() if layer_of(k) in set(layers)}

    def save(self, out: str, final: bool, spec: Mapping) -> dict:
        return write_model(out, self.state, spec) if final and self.state else {}


class PlainFold:
    """The one-shot global: the strategy's arrival-order fold of the sites' results."""

    encrypted = False

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.fold = strategy.fold()

    @property
    def sites(self) -> list[str]:
        return self.fold.sites

    def describe(self) -> dict | None:
        return None

    def plan(self, final: Mapping | None = None) -> dict | None:
        return None

    def vet(self, params, rank, site: str, accepted=()) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        state = plain_params(params)
        return state, state

    def add(self, update: SiteUpdate) -> None:
        self.fold.add(update)

    def result(self) -> tuple[dict[str, Tensor], float | None]:
        return self.fold.result()

    def payload(self) -> dict[str, Tensor]:
        """The global as the sites' install takes it (FLoRA, shared-A: one round)."""
        state, _ = self.result()
        return self.strategy.payload([state], 0) if isinstance(self.strategy, FLoRA) else state

    def save(self, out: str, final: bool, spec: Mapping) -> dict:
        """The intermediate global after every arrival; the loadable model at the end."""
        state, scaling = self.result()
        save_tensors(os.path.join(out, "global.safetensors"), state)
        if not final:
            return {}
        if scaling is None:
            return {"full_weights": "global.safetensors"}
        return write_model(out, state, {**spec, "writer": "adapter", "scaling": scaling})
