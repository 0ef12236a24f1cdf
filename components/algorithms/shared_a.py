"""Nested shared-A aggregation: exact for mixed ranks with a plain weighted sum of B's.

Every site of a round uses the same frozen A, drawn from the round's shared seed at the largest
rank R (lora_init.py draws row by row, so a rank-r site's A is the first r rows), and trains only
its B_k (out, r_k). Then Σ_k p_k s_k B_k A[:r_k] = (Σ_k p_k s_k pad_R(B_k)) A: the round's global
is one weighted sum of zero-padded B's times the shared A. A weighted sum is what additive HE
computes on ciphertexts, so the server (and every other site) learns only the aggregate, unlike
stacking, which hands every site every other site's factors.

Sites upload B only (r_k·out per module) and download B_g (R·out); A is never sent: whoever needs it
(the server to vet and export, a site to merge a round) redraws it from the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .lora_init import fresh_lora_a
from .lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, InvalidUpdate, normalize_weights


def b_only(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries a site uploads: its B factors."""
    return {k: v for k, v in state.items() if k.endswith(LORA_B_SUFFIX)}


def with_shared_a(b_state: Mapping[str, Tensor], seed: int, shapes: Mapping[str, tuple[int, int]],
                  rank: int | None = None) -> dict[str, Tensor]:
    """A B-only state completed with the round's shared A at each B's rank (a full LoRA state).

    ``shapes``: {module prefix: (out, in)} of the modules A may be drawn for. Every B is checked
    before any A is drawn (InvalidUpdate naming it): a B key of one of those modules, with out rows
    and ``rank`` columns when given (the server, with a site's declared rank), else at least one.
    A B's width sets the size of the A drawn for it: with out rows checked, that A is never more
    than in/out times what the sender actually sent (a (0, 10^7) B cannot ask for a huge A)."""
    for key, b in b_state.items():
        if not key.endswith(LORA_B_SUFFIX):
            raise InvalidUpdate(f"{key}: shared-A sites send only their B factors ({LORA_B_SUFFIX})")
        prefix = key[: -len(LORA_B_SUFFIX)]
        if prefix not in shapes:
            raise InvalidUpdate(f"{key}: module {prefix!r} is not one the job adapts")
        out = shapes[prefix][0]
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise InvalidUpdate(f"declared rank must be a positive int, got {rank!r}")
        if b.dim() != 2 or b.shape[0] != out or (b.shape[1] != rank if rank is not None else b.shape[1] < 1):
            want = f"({out}, {rank})" if rank is not None else f"({out}, r) with r >= 1"
            raise InvalidUpdate(f"{key}: expected shape {want}, got {tuple(b.shape)}")
    out = {}
    for key, b in b_state.items():
        prefix = key[: -len(LORA_B_SUFFIX)]
        out[prefix + LORA_A_SUFFIX] = fresh_lora_a(seed, prefix, (b.shape[1], int(shapes[prefix][1])))
        out[key] = b
    return out


@torch.no_grad()
def shared_a_sum(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    scalings: Sequence[float],
) -> dict[str, Tensor]:
    """The round's global {A_R, B_g} (applied with scaling 1) from the sites' full states, whose
    A's are slices of one shared matrix: B_g = Σ_k p_k s_k pad_R(B_k), R the module's largest rank.

    p_k is normalised over all sites, as in stacking: a site without a module adds nothing to it.
    The A's are checked to be prefixes of the widest one (ValueError naming the module).
    """
    if len(scalings) != len(states):
        raise ValueError(f"got {len(scalings)} scalings for {len(states)} sites")
    p = normalize_weights(weights, len(states))
    prefixes = sorted({k[: -len(LORA_B_SUFFIX)] for s in states for k in s if k.endswith(LORA_B_SUFFIX)})
    out: dict[str, Tensor] = {}
    for prefix in prefixes:
        a_key, b_key = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
        members = [k for k, s in enumerate(states) if b_key in s]
        widest = max(members, key=lambda k: states[k][b_key].shape[1])
        a = states[widest][a_key].float()
        b_g = torch.zeros(states[widest][b_key].shape[0], a.shape[0])
        for k in members:
            a_k, b_k = states[k][a_key], states[k][b_key]
            if a_k.shape[0] != b_k.shape[1] or not torch.equal(a_k.float(), a[: a_k.shape[0]]):
                raise ValueError(f"{prefix}: site {k}'s A is not a prefix of the round's shared A")
            b_g[:, : b_k.shape[1]].add_(b_k.float(), alpha=p[k] * float(scalings[k]))
        out[a_key], out[b_key] = a, b_g
    return out
