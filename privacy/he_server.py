"""Encrypted aggregators for the LoRA, selective-layer and one-shot jobs (no FLARE import).

Same interface as the plaintext ones (flare_lora.components.strategies.aggregators): a workflow
with ``he`` on holds one of these instead. They hold the server's context, which has no secret
key (checked when opened), so they can vet an update's layout, combine ciphertexts with public
weights and ship or persist them, but never read a value. What they need from a site in clear:
its declared rank/alpha and example count (the weights), and the layout of its tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import msgpack
from torch import Tensor

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, InvalidUpdate
from flare_lora.components.strategies.base import SiteUpdate, Strategy
from flare_lora.privacy.he_aggregate import (
    HE_METHODS,
    VALUE_BOUND,
    EncryptedGlobal,
    EncryptedOnlineAverage,
    EncryptedOnlineStack,
    check_he_method,
    fedit,
    layer_average,
    layers_of,
    rounds_payload,
    same_slots,
    shape_stubs,
    stack,
    state_payload,
    zero_pad,
)
from flare_lora.privacy.he_context import Ckks, HEContextError, load_context
from flare_lora.privacy.he_packing import HE_KEY, EncryptedUpdate, group_of, trim_lora

PERSIST_DIRNAME = "he_global"  # under the server's results: the global model, as ciphertexts


def open_server_context(source: str, fl_ctx=None) -> Ckks:
    """The server's Ckks; HEContextError if missing or holding the secret key."""
    return Ckks(*load_context(source, "server", fl_ctx))


def _encrypted_params(params) -> Mapping:
    """The encrypted payload of a result's params; InvalidUpdate for anything else."""
    if not params:
        raise InvalidUpdate("empty update: no encrypted payload")
    if not isinstance(params, Mapping) or set(params) != {HE_KEY}:
        got = sorted(params)[:3] if isinstance(params, Mapping) else type(params).__name__
        raise InvalidUpdate(f"plaintext update while HE is on (expected only the encrypted payload {HE_KEY!r}, "
                            f"got {got}): refusing it")
    return params[HE_KEY]


def save_wire(path: str, wire: Mapping) -> str:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(wire, use_bin_type=True))
    os.replace(tmp, path)
    return path


def load_wire(path: str) -> dict:
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


MODEL_AT_SITES = "flare_lora/ in each site's run directory"  # where the plaintext final model is


def _private_refused(ckks: Ckks) -> Ckks:
    if ckks.private:
        raise HEContextError("the server's HE context holds the secret key; refusing")
    return ckks


class _Encrypted:
    encrypted = True

    def __init__(self, ckks: Ckks):
        self.ckks = _private_refused(ckks)

    def describe(self) -> dict:
        return {"context_id": self.ckks.context_id, "server_has_secret_key": self.ckks.private, **self.ckks.parameters}

    def _plan(self, grouping: str, final: Mapping | None, pad_rank: int | None = None, scale_b: bool = False,
              shared_a: dict | None = None) -> dict:
        """What the sites of a task must do: how to pack, to which rank to zero-pad, what to write
        (shared-A's final task: how to redraw each round's A)."""
        return {"context_id": self.ckks.context_id, "grouping": grouping, "bound": VALUE_BOUND,
                "pad_rank": pad_rank, "scale_b": scale_b, "final": dict(final) if final else None,
                "shared_a": shared_a}

    def _load(self, params) -> tuple[dict[str, Tensor], EncryptedUpdate]:
        update = EncryptedUpdate.from_wire(_encrypted_params(params), self.ckks, fresh=True)
        return shape_stubs(update), update

    def _persist(self, out_dir: str, name: str, global_) -> str:
        os.makedirs(os.path.join(out_dir, PERSIST_DIRNAME), exist_ok=True)
        save_wire(os.path.join(out_dir, PERSIST_DIRNAME, name), global_.to_wire(self.ckks))
        return os.path.join(PERSIST_DIRNAME, name)


class EncryptedRounds(_Encrypted):
    """Encrypted rounds of the multi-round LoRA job (flora, shared_a, fedit, zero_pad).

    Sites merge FLoRA's and shared-A's rounds into their base, so a site is sent every round it
    lacks; shared-A sites send B only, zero-padded to the round's largest rank and times s_k, and
    the server adds them: a site decrypts only the aggregate B_g."""

    def __init__(self, strategy: Strategy, ckks: Ckks):
        check_he_method(strategy)
        super().__init__(ckks)
        self.strategy = strategy
        self.kind, self.pad = HE_METHODS[strategy.name]
        self.scaling = 1.0  # what the final adapter is applied with (FedIT: the sites' common alpha/rank)
        self.pad_rank: int | None = None  # the task's zero-padding rank

    def describe(self) -> dict:
        return {**super().describe(), "kind": self.kind}

    def plan(self, ranks: Sequence[int], final: Mapping | None = None) -> dict:
        self.pad_rank = max(ranks) if self.pad and ranks else None
        shared_a = {"key": self.strategy.key, "shapes": {p: list(v) for p, v in self.strategy.shapes.items()}} \
            if final and self.strategy.shared_a else None
        return self._plan("lora", {**final, "scaling": self.scaling} if final else None, self.pad_rank,
                          scale_b=self.strategy.name in ("zero_pad", "shared_a"), shared_a=shared_a)

    def vet(self, params, rank: int, site: str, accepted: Sequence[SiteUpdate] = ()) -> tuple[dict[str, Tensor], EncryptedUpdate]:
        """(zero stubs of the update's declared shapes at ``rank``, for the plaintext checks; the update).

        Sums add slot by slot: every update of a task must have the layout of the first one accepted
        (only an accepted update sets it: a rejected one must not shut the honest sites out).
        """
        stubs, update = self._load(params)
        if self.kind == "sum" and accepted:
            first, groups = accepted[0].site, {g: layout for g, (layout, _) in accepted[0].state.groups.items()}
            if set(update.groups) != set(groups) or not all(same_slots(update.groups[g][0], groups[g]) for g in groups):
                raise InvalidUpdate(f"tensors (keys/shapes) differ from {first}'s this round: ciphertexts add slot by "
                                    f"slot, so every site needs the same modules (and padded ranks)")
        groups = {"B"} if self.strategy.shared_a else {"A", "B"}
        if set(update.groups) != groups:
            raise InvalidUpdate(f"expected the LoRA group(s) {sorted(groups)}, got {sorted(update.groups)}")
        for name, (segments, _) in update.groups.items():
            for s in segments:
                if group_of(s.key, "lora") != name:
                    raise InvalidUpdate(f"{s.key}: packed in group {name!r}")
        if self.pad_rank is not None:
            ranks = {t.shape[0] if k.endswith(LORA_A_SUFFIX) else t.shape[1] for k, t in stubs.items()}
            if ranks != {self.pad_rank}:
                raise InvalidUpdate(f"factors zero-padded to rank(s) {sorted(ranks)}, the round pads to {self.pad_rank}")
            stubs = trim_lora(stubs, rank)
        return stubs, update

    def aggregate(self, updates: Sequence[SiteUpdate]) -> EncryptedGlobal:
        """``updates``: vetted SiteUpdates whose ``state`` is an EncryptedUpdate."""
        enc = [u.state for u in updates]
        n = [u.num_examples for u in updates]
        s = [u.scaling for u in updates]
        if self.strategy.name == "flora":
            return stack(self.ckks, enc, n, s)
        if self.strategy.name in ("zero_pad", "shared_a"):  # sums of padded factors, trimmed to the largest rank
            return zero_pad(self.ckks, enc, n, rank=max(u.rank for u in updates))
        self.scaling = s[0]  # one across the task: the strategy's check at vetting
        return fedit(self.ckks, enc, n)

    def payload(self, rounds: Sequence[EncryptedGlobal], merged: int, final: bool = False) -> dict:
        """Ciphertexts of the global a site lacks (the final task: all of it, so it can write the model)."""
        merged = 0 if final else merged
        if self.kind == "stack" or self.strategy.shared_a:  # rounds merged into the base: each one a site lacks
            wire = rounds_payload(self.ckks, {r: rounds[r] for r in range(merged, len(rounds))})
        else:
            wire = state_payload(self.ckks, rounds[-1] if rounds else None)
        return {HE_KEY: wire}

    def save(self, out_dir: str, rounds: Sequence[EncryptedGlobal], final: bool, spec: Mapping) -> dict:
        """Each round's global as ciphertexts (msgpack of its wire form): the server's copy of the model."""
        folder = os.path.join(out_dir, PERSIST_DIRNAME)
        names = [os.path.join(PERSIST_DIRNAME, f"round_{r}.msgpack") for r in range(len(rounds))]
        for r, name in enumerate(names):
            if not os.path.exists(os.path.join(out_dir, name)):
                os.makedirs(folder, exist_ok=True)
                save_wire(os.path.join(out_dir, name), rounds[r].to_wire(self.ckks))
        return {"he_persisted": names, **({"model_at_sites": MODEL_AT_SITES} if final else {})}


class EncryptedLayers(_Encrypted):
    """Encrypted per-layer global of the selective-layer job: layer groups, averaged per layer."""

    def __init__(self, ckks: Ckks):
        super().__init__(ckks)
        self.global_ = EncryptedUpdate({}, ckks.context_id)  # groups "layer.<i>", each with its factor

    def plan(self, final: Mapping | None = None) -> dict:
        return self._plan("layer", final)

    def vet(self, params) -> tuple[dict[str, Tensor], EncryptedUpdate]:
        stubs, update = self._load(params)
        layers_of(update)  # every group holds exactly its own layer's tensors
        return stubs, update

    def aggregate(self, updates: Sequence[EncryptedUpdate], weights: Sequence[float]) -> list[int]:
        """Average each layer over the sites that sent it into the global; the layers updated."""
        new = layer_average(self.ckks, updates, weights)
        self.global_.groups.update(new.groups)
        self.global_.factors.update(new.factors)
        return layers_of(new)

    def payload(self, layers) -> dict:
        """The global's groups of ``layers`` (the ones a site lacks)."""
        names = [f"layer.{l}" for l in sorted(layers) if f"layer.{l}" in self.global_.groups]
        chosen = EncryptedUpdate({n: self.global_.groups[n] for n in names}, self.ckks.context_id,
                                 {n: self.global_.factors[n] for n in names})
        global_ = EncryptedGlobal("sum", [chosen]) if names else None
        return {HE_KEY: state_payload(self.ckks, global_)}

    def save(self, out_dir: str, final: bool, spec: Mapping) -> dict:
        saved = {"he_persisted": self._persist(out_dir, "layers.msgpack", self.global_)} if self.global_.groups else {}
        return {**saved, **({"model_at_sites": MODEL_AT_SITES} if final else {})}


class EncryptedFold(_Encrypted):
    """Encrypted arrival-order folding of the one-shot job (flora: stacking; fedit, full: average)."""

    def __init__(self, strategy: Strategy, ckks: Ckks):
        if strategy.name not in ("flora", "fedit", "full"):
            raise ValueError(f"he: one-shot method {strategy.name!r} cannot aggregate ciphertexts")
        super().__init__(ckks)
        self.strategy = strategy
        self._fold = EncryptedOnlineStack(ckks) if strategy.name == "flora" else EncryptedOnlineAverage(ckks)
        self.scaling: float | None = None  # fedit: the one alpha/rank every site shares

    @property
    def sites(self) -> list[str]:
        return self._fold.sites

    def plan(self, final: Mapping | None = None) -> dict:
        if final and self.strategy.lora:
            final = {**final, "writer": "adapter", "scaling": self.scaling or 1.0}
        elif final:
            final = {"writer": "full"}
        return self._plan("lora" if self.strategy.lora else "all", final)

    def vet(self, params, rank, site: str) -> tuple[dict[str, Tensor], EncryptedUpdate]:
        stubs, update = self._load(params)
        if not self.strategy.lora and set(update.groups) != {"all"}:
            raise InvalidUpdate(f"expected one group 'all', got {sorted(update.groups)}")
        return stubs, update

    def add(self, update: SiteUpdate) -> None:
        """A vetted update whose ``state`` is an EncryptedUpdate."""
        if self.strategy.name == "flora":
            self._fold.add(update.state, update.num_examples, update.scaling, update.site)
            return
        self._fold.add(update.state, update.num_examples, update.site)
        if self.strategy.lora:
            self.scaling = update.scaling

    def payload(self) -> dict:
        global_ = self._fold.result()
        if self.strategy.name == "flora":  # as one stacked round, the form the sites' FLoRA install takes
            return {HE_KEY: rounds_payload(self.ckks, {0: global_})}
        return {HE_KEY: state_payload(self.ckks, global_)}

    def save(self, out_dir: str, final: bool, spec: Mapping) -> dict:
        saved = {"he_persisted": self._persist(out_dir, "global.msgpack", self._fold.result())}
        return {**saved, **({"model_at_sites": MODEL_AT_SITES} if final else {})}
