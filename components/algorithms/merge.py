"""Merging LoRA updates into base weights, and fingerprinting the result.

FLoRA sites fold every stacked round into their base weights in round order. Merging is
deterministic elementwise work, so a site that catches up on missed rounds ends bit-identical to
one that merged them as they came, which `weights_digest` lets the server verify.

A base below float32 (bf16 sites) would round each round's small update away when added in its
own dtype, so such a weight gets a float32 master copy (``masters``, in host memory, not on the
GPU): every merge adds to the master and the weight becomes ``cast(W0 + Σ ΔW)``, one rounding
whatever the number of rounds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

from .lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, module_prefixes

BASE_PREFIX = "base_model.model."
HALF = (torch.bfloat16, torch.float16)  # base dtypes whose merges go through a float32 master


def base_weight_name(prefix: str) -> str:
    """PEFT module prefix -> name of the adapted weight in the base model."""
    return prefix.removeprefix(BASE_PREFIX) + ".weight"


def lora_delta(state: Mapping[str, Tensor], scaling: float = 1.0) -> dict[str, Tensor]:
    """{base weight name: scaling * B @ A}, in float32 whatever the factors' dtype."""
    return {
        base_weight_name(p): scaling
        * (state[p + LORA_B_SUFFIX].float() @ state[p + LORA_A_SUFFIX].float())
        for p in module_prefixes(state)
    }


@torch.no_grad()
def merge_lora_into(
    weights: MutableMapping[str, Tensor],
    state: Mapping[str, Tensor],
    scaling: float = 1.0,
    masters: MutableMapping[str, Tensor] | None = None,
) -> None:
    """In place, W += scaling * B @ A for every module (works on a model's named_parameters()).

    A bf16/fp16 weight is accumulated in ``masters`` (its float32 master on the CPU, created
    from W on first merge) and set to the master cast to W's dtype; without ``masters`` it is added in its
    own dtype. All or nothing: every module is checked first (the weight exists, shapes match, the
    result is finite in W's dtype), so a bad global never leaves a site with half-merged or inf weights.
    """
    deltas = lora_delta(state, scaling)
    for name, delta in deltas.items():
        if name not in weights:
            raise KeyError(f"base weight {name} not found for its LoRA module")
        w = weights[name]
        if w.shape != delta.shape:
            raise ValueError(
                f"{name}: weight shape {tuple(w.shape)}, LoRA delta {tuple(delta.shape)}"
            )
        if masters is not None and w.dtype in HALF:  # master and its sum on the CPU
            deltas[name] = delta = delta.cpu()
            new = ((masters[name] if name in masters else w.detach().float().cpu()) + delta).to(w.dtype)
        else:
            deltas[name] = delta = delta.to(w.device)
            new = w + delta.to(w.dtype)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"{name}: merging its LoRA delta would make the weight non-finite")
    for name, delta in deltas.items():
        w = weights[name]
        if masters is not None and w.dtype in HALF:
            if name not in masters:
                masters[name] = w.detach().float().cpu()
            w.copy_(masters[name].add_(delta).to(w.dtype))
        else:
            w.add_(delta.to(w.dtype))


def float_masters(model) -> dict[str, Tensor]:
    """The float32 masters of ``model``'s merged weights, kept on the model object itself so they
    live exactly as long as the weights they shadow (a restarted site rebuilds them by catching up)."""
    return model.__dict__.setdefault("_flare_lora_float_masters", {})


def base_originals(model) -> dict[str, Tensor]:
    """W0 (float32, CPU) of every weight a bounded global has set, kept on the model object."""
    return model.__dict__.setdefault("_flare_lora_w0", {})


@torch.no_grad()
def set_global_into(
    weights: MutableMapping[str, Tensor],
    state: Mapping[str, Tensor],
    originals: MutableMapping[str, Tensor],
) -> None:
    """In place, W = cast(W0 + B @ A) for every module of the scaling-1 ``state``, and W = W0 for a
    weight an earlier global set that this one lacks. W0 is kept in ``originals`` (float32, CPU)
    from the first time a weight is set. The weights then depend on the latest global alone, so
    sites that installed different sequences of globals hold identical weights. All or nothing,
    with the checks of :func:`merge_lora_into`."""
    new = {}
    for name, delta in lora_delta(state).items():
        if name not in weights:
            raise KeyError(f"base weight {name} not found for its LoRA module")
        w = weights[name]
        if w.shape != delta.shape:
            raise ValueError(f"{name}: weight shape {tuple(w.shape)}, LoRA delta {tuple(delta.shape)}")
        w0 = originals[name] if name in originals else w.detach().to("cpu", torch.float32, copy=True)
        value = (w0 + delta.cpu()).to(w.dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: W0 + B @ A is not finite in {w.dtype}; not setting any weight")
        new[name] = (w0, value)
    for name, (w0, value) in new.items():
        originals.setdefault(name, w0)
        weights[name].copy_(value)
    for name in originals.keys() - new.keys():
        weights[name].copy_(originals[name].to(weights[name].dtype))


def merge_rounds_into(
    weights: MutableMapping[str, Tensor],
    rounds: Sequence[Mapping[str, Tensor]],
    masters: MutableMapping[str, Tensor] | None = None,
) -> None:
    """Merge stacked rounds in order, each with scaling 1 (how sites catch up on missed rounds)."""
    for state in rounds:
        merge_lora_into(weights, state, masters=masters)


def weights_digest(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and raw bytes: sites with equal weights agree."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
