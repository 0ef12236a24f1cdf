"""Aggregation on ciphertexts: weighted sums (shared-A, FedIT, zero-padding, per layer) and FLoRA stacking.

Every rule the plugin runs under HE is linear in the sites' updates, so the server computes it
on ciphertexts with public weights and never holds a secret key. A weighted mean Σ p_k x_k is
Σ m_k Enc(x_k) with integer weights m_k (the example counts themselves when they fit the CKKS
range) times the public factor 1/Σ m_k, which travels with the aggregate and is applied by the
site after decryption (``EncryptedUpdate.factors``). Stacking is concatenation: each site's block
is kept, and its A group carries the public factor p_k·s_k. Decrypting at a site gives what
``flare_lora.components.algorithms`` computes in the clear (tests/test_he.py: within 1e-4 relative).

FedCDD has no encrypted form: its consensus/divergence weights need norms, similarities and an SVD
of the updates, which CKKS cannot compute without the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flare_lora.components.algorithms.layer_average import layer_of
from flare_lora.components.algorithms.lora_state import InvalidUpdate, normalize_weights
from flare_lora.components.algorithms.stacking import concat_lora
from flare_lora.components.strategies.base import unpack_rounds
from flare_lora.privacy.he_packing import EncryptedUpdate, trim_lora

# method -> (global kind, zero-pad to the round's largest rank)
HE_METHODS = {"flora": ("stack", False), "shared_a": ("sum", True), "fedit": ("sum", False), "zero_pad": ("sum", True)}
VALUE_BOUND = 16.0  # |value| a site may encrypt (LoRA factors, small models' weights); sums are budgeted for it


def check_he_method(strategy) -> None:
    """Refuses a strategy (a configured one: its options count) whose aggregation is not linear."""
    method = strategy.name
    if method not in HE_METHODS:
        why = {"fedcdd": " (its aggregation needs norms, similarities and an SVD: nonlinear)",
               "hlora": " (its aggregation is an SVD: nonlinear)"}.get(method, "")
        raise ValueError(f"he: method {method!r} cannot aggregate ciphertexts{why}; expected one of {list(HE_METHODS)}")
    if method == "flora" and strategy.options.bounded:
        raise ValueError("he: a bounded FLoRA global is re-projected by an SVD, which ciphertexts do not allow; "
                         "use the exact global, or --method shared_a")


# --- the linear maps --------------------------------------------------------------------------


def integer_weights(weights: Sequence[float], budget: int) -> list[int]:
    """Non-negative integers proportional to ``weights`` with a sum of at most ``budget``.

    Integer weights that fit (example counts, usually) are kept as they are: the mean is exact.
    Otherwise they are scaled to ``budget`` less one per site and rounded, and every positive weight
    counts at least 1: weight k is then off by at most 0.5/m_k relative, except a site with less than
    1/(2·budget) of the total, which counts 1/Σm instead of nothing (multiplying a ciphertext by 0
    makes SEAL refuse it as "transparent"). This only happens when the sites together hold more than
    ``budget`` examples.
    """
    normalize_weights(weights, len(weights))  # same checks: non-negative, positive sum
    if all(float(w).is_integer() for w in weights) and sum(weights) <= budget:
        return [int(w) for w in weights]
    total, room = float(sum(weights)), budget - len(weights)
    if room < 1:
        raise ValueError(f"{len(weights)} weighted sites do not fit the HE sum's budget of {budget}")
    return [max(1, int(round(float(w) * room / total))) if w > 0 else 0 for w in weights]


def weighted_sum(ckks, updates: Sequence[EncryptedUpdate], weights: Sequence[float]) -> EncryptedUpdate:
    """Per group, the weighted mean over the updates that have the group (weights renormalised
    over them): Σ m_k Enc(x_k) with factor 1/Σ m_k. Updates sharing a group must share its layout
    (keys, shapes): zero-padding made them line up."""
    if len(weights) != len(updates):
        raise ValueError(f"got {len(weights)} weights for {len(updates)} updates")
    budget = int(ckks.capacity // VALUE_BOUND)
    out, factors = {}, {}
    for name in sorted({g for u in updates for g in u.groups}):
        members = [k for k, u in enumerate(updates) if name in u.groups]
        layout = updates[members[0]].groups[name][0]
        for k in members[1:]:
            if not same_slots(updates[k].groups[name][0], layout):
                raise ValueError(f"group {name!r}: update {k} has a different layout (keys/shapes) from update "
                                 f"{members[0]}: its tensors do not line up slot for slot")
        m = integer_weights([weights[k] for k in members], budget)
        if sum(m) == 0:
            raise ValueError(f"group {name!r}: the weights round to zero within the budget {budget}")
        terms = [(updates[k].groups[name][1], m_k) for m_k, k in zip(m, members) if m_k]  # weight 0: not in the sum
        out[name] = (layout, ckks.weighted_sum(terms))
        factors[name] = 1.0 / sum(m)
    return EncryptedUpdate(out, ckks.context_id, factors)


def same_slots(a, b) -> bool:
    """Two layouts put the same tensors in the same slots (dtypes may differ: values are float64 inside)."""
    return [(s.key, s.shape) for s in a] == [(s.key, s.shape) for s in b]


@dataclass
class EncryptedGlobal:
    """A round's global model as the server holds it.

    kind "sum": ``blocks[0]`` is the aggregate (``rank``: trim zero-padded factors to it);
    kind "stack": one scaled block per site, concatenated (``concat_lora``) after decryption.
    """

    kind: str
    blocks: list[EncryptedUpdate]
    rank: int | None = None

    def to_wire(self, ckks) -> dict:
        return {"kind": self.kind, "rank": self.rank, "blocks": [b.to_wire(ckks) for b in self.blocks]}

    @classmethod
    def from_wire(cls, wire, ckks) -> EncryptedGlobal:
        if not isinstance(wire, Mapping) or wire.get("kind") not in ("sum", "stack") or not wire.get("blocks"):
            raise InvalidUpdate("not an encrypted global: expected {'kind': 'sum'|'stack', 'blocks': [...]}")
        return cls(wire["kind"], [EncryptedUpdate.from_wire(b, ckks) for b in wire["blocks"]], wire.get("rank"))

    def decrypt(self, ckks) -> dict[str, Tensor]:
        states = [b.decrypt(ckks) for b in self.blocks]
        if self.kind == "stack":
            return concat_lora(states)
        return trim_lora(states[0], self.rank) if self.rank else states[0]


def stack(ckks, updates: Sequence[EncryptedUpdate], weights: Sequence[float],
          scalings: Sequence[float]) -> EncryptedGlobal:
    """Encrypted FLoRA stacking: block k = (A_k with factor p_k s_k, B_k), so that after decryption
    B_g A_g = Σ p_k s_k B_k A_k. The factor is public (the server computes it in clear); applying it
    to the ciphertext would only spend a prime."""
    if len(scalings) != len(updates):
        raise ValueError(f"got {len(scalings)} scalings for {len(updates)} updates")
    p = normalize_weights(weights, len(updates))
    blocks = []
    for u, p_k, s_k in zip(updates, p, scalings):
        groups = {g: (layout, ckks.to_last_level(cts)) for g, (layout, cts) in u.groups.items()}
        blocks.append(EncryptedUpdate(groups, ckks.context_id, {"A": p_k * float(s_k)}))
    return EncryptedGlobal("stack", blocks)


def fedit(ckks, updates, weights) -> EncryptedGlobal:
    return EncryptedGlobal("sum", [weighted_sum(ckks, updates, weights)])


def zero_pad(ckks, updates, weights, rank: int) -> EncryptedGlobal:
    """HetLoRA on factors the sites zero-padded to a common rank, B already times s_k:
    A_g = Σ p_k A_k, B_g = Σ p_k s_k B_k, trimmed to ``rank`` (the largest among the aggregated
    sites) on decryption."""
    return EncryptedGlobal("sum", [weighted_sum(ckks, updates, weights)], rank)


def layer_average(ckks, updates, weights) -> EncryptedUpdate:
    """Selective layers: each layer group averaged over the sites that sent it."""
    return weighted_sum(ckks, updates, weights)


# --- one-shot: fold arrivals (same add/result shape as flare_lora.components.algorithms.one_shot) ---------


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise InvalidUpdate(f"weight must be a finite number > 0, got {weight!r}")
    return float(weight)


class EncryptedOnlineAverage:
    """``OnlineAverage`` on ciphertexts: ``result()`` is the weighted mean of the updates added so far.

    The ciphertexts are kept and combined at ``result()``: the integer weights that fit the CKKS
    range depend on the total, which is known only then.
    """

    def __init__(self, ckks):
        self.ckks = ckks
        self._updates: dict[str, tuple[EncryptedUpdate, float]] = {}

    @property
    def sites(self) -> list[str]:
        return list(self._updates)

    def add(self, update: EncryptedUpdate, weight: float, site: str | None = None) -> None:
        weight = _check_weight(weight)
        name = site or f"#{len(self._updates)}"
        if name in self._updates:
            raise InvalidUpdate(f"{name!r} already contributed")
        if self._updates:
            first = next(iter(self._updates.values()))[0]
            if set(update.groups) != set(first.groups) or not all(
                same_slots(update.groups[g][0], first.groups[g][0]) for g in first.groups
            ):
                raise InvalidUpdate("layout (keys, shapes) differs from the aggregate's")
        self._updates[name] = (update, weight)

    def result(self) -> EncryptedGlobal:
        if not self._updates:
            raise ValueError("no update added yet")
        updates, weights = zip(*self._updates.values())
        return fedit(self.ckks, list(updates), list(weights))


class EncryptedOnlineStack:
    """``OnlineStack`` on ciphertexts: blocks in site-name order, whatever the arrival order."""

    def __init__(self, ckks):
        self.ckks = ckks
        self._updates: dict[str, tuple[EncryptedUpdate, float, float]] = {}

    @property
    def sites(self) -> list[str]:
        return sorted(self._updates)

    def add(self, update: EncryptedUpdate, weight: float, scaling: float, site: str) -> None:
        weight = _check_weight(weight)
        if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
            raise InvalidUpdate(f"scaling must be a finite number > 0, got {scaling!r}")
        if site in self._updates:
            raise InvalidUpdate(f"{site!r} already contributed")
        if set(update.groups) != {"A", "B"}:
            raise InvalidUpdate(f"expected LoRA groups A and B, got {sorted(update.groups)}")
        self._updates[site] = (update, weight, float(scaling))

    def result(self) -> EncryptedGlobal:
        if not self._updates:
            raise ValueError("no update added yet")
        ordered = [self._updates[s] for s in self.sites]
        return stack(self.ckks, [u for u, _, _ in ordered], [w for _, w, _ in ordered], [s for _, _, s in ordered])


# --- payloads: what a task carries to the sites --------------------------------------------


def rounds_payload(ckks, rounds: Mapping[int, EncryptedGlobal]) -> dict:
    """FLoRA: every stacked round a site lacks, as ``{"r<round>/<key>"}`` after decryption."""
    return {"format": "rounds", "rounds": {str(r): g.to_wire(ckks) for r, g in sorted(rounds.items())}}


def state_payload(ckks, global_: EncryptedGlobal | None) -> dict:
    """Averaging methods and selective layers: one global (or none yet)."""
    return {"format": "state", "global": global_.to_wire(ckks) if global_ is not None else None}


def decrypt_payload(wire, ckks) -> dict[str, Tensor]:
    """The params the client script installs: one state, or for "rounds" every round keyed
    ``r<round>/<key>`` (shared-A rounds hold only B_g; the site redraws their A)."""
    if not isinstance(wire, Mapping) or wire.get("format") not in ("rounds", "state"):
        raise InvalidUpdate("not an encrypted payload: expected {'format': 'rounds'|'state', ...}")
    if wire["format"] == "state":
        return EncryptedGlobal.from_wire(wire["global"], ckks).decrypt(ckks) if wire.get("global") else {}
    rounds = {int(r): EncryptedGlobal.from_wire(g, ckks).decrypt(ckks) for r, g in wire["rounds"].items()}
    return {f"r{r}/{k}": v for r, state in sorted(rounds.items()) for k, v in state.items()}


def payload_model(params: Mapping[str, Tensor], complete=None) -> dict[str, Tensor]:
    """The whole model a decrypted payload holds, as one adapter: rounds (``r<round>/`` keys) are
    concatenated after ``complete(round, state)`` (shared-A: adds the round's A); a state is itself."""
    if not any("/" in k for k in params):
        return dict(params)
    rounds = unpack_rounds(params)
    done = [complete(r, state) if complete else state for r, state in rounds.items() if state]
    return concat_lora(done) if done else {}


def layers_of(update: EncryptedUpdate) -> list[int]:
    """The decoder layers an encrypted per-layer update holds, checking each group's name."""
    layers = []
    for name, (segments, _) in update.groups.items():
        found = {layer_of(s.key) for s in segments}
        if len(found) != 1 or name != f"layer.{next(iter(found))}":
            raise InvalidUpdate(f"group {name!r} holds tensors of layers {sorted(found, key=str)}")
        layers.append(next(iter(found)))
    return sorted(layers)


def shape_stubs(update: EncryptedUpdate) -> dict[str, Tensor]:
    """Zero tensors (stride-0 views, no memory) of the update's declared shapes, for the plaintext
    validators: under HE the server can vet the layout, never the values."""
    return {k: torch.zeros((), dtype=torch.float32).expand(shape) for k, shape in update.shapes.items()}
