"""Server halves of encrypted aggregation for the LoRA, selective-layer and one-shot jobs (no FLARE import).

The controllers call these when ``he`` is on. They hold the server's context, which has no
secret key (checked when opened), so they can vet an update's layout, combine ciphertexts with
public weights and ship or persist them, but never read a value. What they need from a site in
clear: its declared rank/alpha and example count (the weights), and the layout of its tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import msgpack
from torch import Tensor

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, InvalidUpdate, validate_lora_update
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


class LoraHE:
    """Encrypted rounds of the multi-round LoRA job (flora, fedit, zero_pad)."""

    def __init__(self, ckks: Ckks, method: str):
        check_he_method(method)
        if ckks.private:
            raise HEContextError("the server's HE context holds the secret key; refusing")
        self.ckks = ckks
        self.method = method
        self.kind, self.pad = HE_METHODS[method]
        self.scaling = 1.0  # what the final adapter is applied with (FedIT: the sites' common alpha/rank)
        self.layout: tuple[str, dict] | None = None  # sums: (site, layout) every update of the round must match

    def describe(self) -> dict:
        return {"context_id": self.ckks.context_id, "server_has_secret_key": self.ckks.private,
                "kind": self.kind, **self.ckks.parameters}

    def plan(self, ranks: Sequence[int], final: Mapping | None = None) -> dict:
        """What the sites of a task must do: how to pack, to which rank to zero-pad."""
        self.layout = None  # a new task: its updates set the round's layout
        return {"context_id": self.ckks.context_id, "grouping": "lora", "bound": VALUE_BOUND,
                "pad_rank": max(ranks) if self.pad and ranks else None,
                "scale_b": self.method == "zero_pad", "final": dict(final) if final else None}

    def vet(self, params, rank: int, pad_rank: int | None, site: str = "") -> tuple[EncryptedUpdate, dict[str, Tensor]]:
        """(the loaded update, zero stubs of its declared shapes at ``rank``) for ``check_update``.

        Sums add slot by slot: every update of a round must have the layout of the first one.
        """
        update = EncryptedUpdate.from_wire(_encrypted_params(params), self.ckks, fresh=True)
        if self.kind == "sum" and self.layout is not None:
            first, groups = self.layout
            if set(update.groups) != set(groups) or not all(same_slots(update.groups[g][0], groups[g]) for g in groups):
                raise InvalidUpdate(f"tensors (keys/shapes) differ from {first}'s this round: ciphertexts add slot by "
                                    f"slot, so every site needs the same modules (and padded ranks)")
        if set(update.groups) != {"A", "B"}:
            raise InvalidUpdate(f"expected the LoRA groups A and B, got {sorted(update.groups)}")
        for name, (segments, _) in update.groups.items():
            for s in segments:
                if group_of(s.key, "lora") != name:
                    raise InvalidUpdate(f"{s.key}: packed in group {name!r}")
        stubs = shape_stubs(update)
        if pad_rank is not None:
            ranks = {t.shape[0] if k.endswith(LORA_A_SUFFIX) else t.shape[1] for k, t in stubs.items()}
            if ranks != {pad_rank}:
                raise InvalidUpdate(f"factors zero-padded to rank(s) {sorted(ranks)}, the round pads to {pad_rank}")
            stubs = trim_lora(stubs, rank)
        if self.kind == "sum" and self.layout is None:
            self.layout = (site or "the first update", {g: layout for g, (layout, _) in update.groups.items()})
        return update, stubs

    def aggregate(self, updates: Sequence) -> EncryptedGlobal:
        """``updates``: SiteUpdates whose ``state`` is an EncryptedUpdate."""
        enc = [u.state for u in updates]
        n = [u.num_examples for u in updates]
        s = [u.scaling for u in updates]
        if self.method == "flora":
            return stack(self.ckks, enc, n, s)
        if self.method == "zero_pad":
            return zero_pad(self.ckks, enc, n, rank=max(u.rank for u in updates))
        if len(set(s)) != 1:
            raise ValueError(f"fedit needs one alpha/rank across sites, got {sorted(set(s))}")
        self.scaling = s[0]
        return fedit(self.ckks, enc, n)

    def payload(self, rounds: Sequence[EncryptedGlobal], merged: int) -> dict:
        if self.kind == "stack":
            wire = rounds_payload(self.ckks, {r: rounds[r] for r in range(merged, len(rounds))})
        else:
            wire = state_payload(self.ckks, rounds[-1] if rounds else None)
        return {HE_KEY: wire}

    def persist(self, out_dir: str, rounds: Sequence[EncryptedGlobal]) -> list[str]:
        """Each round's global as ciphertexts (msgpack of its wire form): the server's copy of the model."""
        folder = os.path.join(out_dir, PERSIST_DIRNAME)
        os.makedirs(folder, exist_ok=True)
        names = []
        for r, global_ in enumerate(rounds):
            name = f"round_{r}.msgpack"
            if not os.path.exists(os.path.join(folder, name)):
                save_wire(os.path.join(folder, name), global_.to_wire(self.ckks))
            names.append(os.path.join(PERSIST_DIRNAME, name))
        return names


class LayerHE:
    """Encrypted per-layer global of the selective-layer job: layer groups, averaged per layer."""

    def __init__(self, ckks: Ckks):
        if ckks.private:
            raise HEContextError("the server's HE context holds the secret key; refusing")
        self.ckks = ckks
        self.global_ = EncryptedUpdate({}, ckks.context_id)  # groups "layer.<i>", each with its factor

    def describe(self) -> dict:
        return {"context_id": self.ckks.context_id, "server_has_secret_key": self.ckks.private, **self.ckks.parameters}

    def plan(self, final: Mapping | None = None) -> dict:
        return {"context_id": self.ckks.context_id, "grouping": "layer", "bound": VALUE_BOUND, "pad_rank": None,
                "scale_b": False, "final": dict(final) if final else None}

    def vet(self, params) -> tuple[EncryptedUpdate, dict[str, Tensor]]:
        update = EncryptedUpdate.from_wire(_encrypted_params(params), self.ckks, fresh=True)
        layers_of(update)  # every group holds exactly its own layer's tensors
        return update, shape_stubs(update)

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

    def persist(self, out_dir: str) -> str:
        os.makedirs(os.path.join(out_dir, PERSIST_DIRNAME), exist_ok=True)
        name = os.path.join(PERSIST_DIRNAME, "layers.msgpack")
        save_wire(os.path.join(out_dir, name), self.global_.to_wire(self.ckks))
        return name


class OneShotHE:
    """Encrypted arrival-order folding of the one-shot job (flora: stacking; fedit, full: average).

    ``fold`` vets one arrival (layout through the plaintext checks, on shape stubs) and adds its
    ciphertexts; ``result`` is the encrypted global of the sites folded so far.
    """

    def __init__(self, ckks: Ckks, method: str):
        if method not in ("flora", "fedit", "full"):
            raise ValueError(f"he: one-shot method {method!r} cannot aggregate ciphertexts")
        if ckks.private:
            raise HEContextError("the server's HE context holds the secret key; refusing")
        self.ckks = ckks
        self.method = method
        self._fold = EncryptedOnlineStack(ckks) if method == "flora" else EncryptedOnlineAverage(ckks)
        self.scaling: float | None = None  # fedit: the one alpha/rank every site must share

    @property
    def sites(self) -> list[str]:
        return self._fold.sites

    def describe(self) -> dict:
        return {"context_id": self.ckks.context_id, "server_has_secret_key": self.ckks.private, **self.ckks.parameters}

    def plan(self, final: Mapping | None = None) -> dict:
        return {"context_id": self.ckks.context_id, "grouping": "all" if self.method == "full" else "lora",
                "bound": VALUE_BOUND, "pad_rank": None, "scale_b": False, "final": dict(final) if final else None}

    def final_spec(self, base_model: str) -> dict:
        if self.method == "full":
            return {"writer": "full"}
        return {"writer": "adapter", "scaling": self.scaling or 1.0, "base_model": base_model}

    def fold(self, site: str, params, num_examples, rank, alpha) -> None:
        update = EncryptedUpdate.from_wire(_encrypted_params(params), self.ckks, fresh=True)
        stubs = shape_stubs(update)
        if self.method == "full":
            if set(update.groups) != {"all"}:
                raise InvalidUpdate(f"expected one group 'all', got {sorted(update.groups)}")
            self._fold.add(update, num_examples, site)
            return
        if not isinstance(rank, int) or rank <= 0 or not alpha > 0:
            raise InvalidUpdate(f"declared rank / alpha must be positive, got {rank!r} / {alpha!r}")
        validate_lora_update(stubs, rank=rank)
        if self.method == "flora":
            self._fold.add(update, num_examples, alpha / rank, site)
            return
        if self.scaling is not None and abs(alpha / rank - self.scaling) > 1e-12:
            raise InvalidUpdate(f"fedit needs one alpha/rank across sites: {alpha / rank} vs {self.scaling}")
        self._fold.add(update, num_examples, site)
        self.scaling = alpha / rank

    def payload(self) -> dict:
        global_ = self._fold.result()
        if self.method == "flora":  # as one stacked round, the form the sites' FLoRA install takes
            return {HE_KEY: rounds_payload(self.ckks, {0: global_})}
        return {HE_KEY: state_payload(self.ckks, global_)}

    def persist(self, out_dir: str) -> str:
        os.makedirs(os.path.join(out_dir, PERSIST_DIRNAME), exist_ok=True)
        name = os.path.join(PERSIST_DIRNAME, "global.msgpack")
        save_wire(os.path.join(out_dir, name), self._fold.result().to_wire(self.ckks))
        return name
