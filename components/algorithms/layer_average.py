"""Per-layer aggregation for selective-layer fine-tuning (pure torch, no nvflare import).

A site update is a flat dict of tensors for the decoder layers the site was assigned, keyed by
the tensor's name, which contains the layer index (``model.layers.3.mlp.up_proj.weight`` in
"full" mode, ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` in "lora" mode).
Every key is averaged over the sites that sent it, weighted by their example counts, so each
layer is the weighted mean over the sites that trained it; layers nobody trained keep their
global value. In "lora" mode this is FedIT averaging (mean of the A's and mean of the B's)
restricted, per layer, to the sites that trained that layer.

The server vets every update with :func:`validate_layer_update` first: a site that returns a
layer it was not assigned (or misses one, or sends NaN/Inf, or a shape that disagrees with what
was accepted before) is rejected with a message that says so.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

from .lora_state import InvalidUpdate, check_tensor, normalize_weights

# "<...>.layers.<i>.<...>" (Llama, Mistral, Qwen, Gemma, Phi), "h.<i>" (GPT-2), "blocks.<i>"
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_of(key: str) -> int | None:
    """The decoder-layer index in a parameter name, or None for non-layer parameters."""
    match = LAYER_PATTERN.search(key)
    return int(match.group(1)) if match else None


def relative_key(key: str) -> str:
    """The name with its layer index replaced by '*': equal for the same tensor of every layer."""
    return LAYER_PATTERN.sub(lambda m: m.group(0).replace(m.group(1), "*"), key, count=1)


def split_by_layer(state: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """{layer: {key: tensor}}; a key without a layer index raises InvalidUpdate."""
    out: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        layer = layer_of(key)
        if layer is None:
            raise InvalidUpdate(f"{key}: not a decoder-layer tensor (no layer index in the name)")
        out.setdefault(layer, {})[key] = value
    return dict(sorted(out.items()))


def validate_layer_update(
    state: Mapping[str, Tensor],
    assigned: Collection[int],
    *,
    known_shapes: Mapping[str, tuple[int, ...]] | None = None,
    layer_keys: Collection[str] | None = None,
) -> None:
    """Raise InvalidUpdate unless ``state`` holds exactly the ``assigned`` layers, well formed.

    ``known_shapes`` ({key: shape}) pins tensors accepted earlier in the job; ``layer_keys`` (the
    relative keys of one layer, see :func:`relative_key`) pins what every layer must contain.
    """
    assigned = {int(l) for l in assigned}
    by_layer = split_by_layer(state)
    extra = sorted(set(by_layer) - assigned)
    if extra:
        raise InvalidUpdate(f"returned layer(s) {extra} it was not assigned (assigned {sorted(assigned)})")
    missing = sorted(assigned - set(by_layer))
    if missing:
        raise InvalidUpdate(f"missing assigned layer(s) {missing} (assigned {sorted(assigned)})")
    expected = set(layer_keys) if layer_keys is not None else None
    for layer, tensors in by_layer.items():
        rel = {relative_key(k) for k in tensors}
        if expected is None:
            expected = rel
        elif rel != expected:
            diff = sorted(rel ^ expected)
            raise InvalidUpdate(f"layer {layer}: tensors differ from the expected set, e.g. {diff[0]!r}")
        for key, value in tensors.items():
            check_tensor(key, value)
            if known_shapes and key in known_shapes and tuple(known_shapes[key]) != tuple(value.shape):
                raise InvalidUpdate(f"{key}: expected shape {tuple(known_shapes[key])}, got {tuple(value.shape)}")


@torch.no_grad()
def average_layers(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Every key's weighted mean over the sites that sent it (weights: example counts).

    A layer trained by sites S gets Σ_{k∈S} n_k t_k / Σ_{k∈S} n_k; keys nobody sent are absent,
    so ``global_state.update(average_layers(...))`` leaves untouched layers as they were.
    Accumulates in float32 at least (float64 stays float64).
    """
    normalize_weights(weights, len(states))  # same checks: non-negative, positive sum, one per site
    members: dict[str, list[int]] = {}
    for k, state in enumerate(states):
        for key in state:
            members.setdefault(key, []).append(k)
    out: dict[str, Tensor] = {}
    for key, sites in members.items():
        total = float(sum(weights[k] for k in sites))
        if total <= 0:
            raise ValueError(f"{key}: the sites that trained it have zero total weight")
        first = states[sites[0]][key]
        dtype = torch.promote_types(first.dtype, torch.float32)
        acc = torch.zeros(first.shape, dtype=dtype, device=first.device)
        for k in sites:
            t = states[k][key]
            if t.shape != first.shape:
                raise ValueError(f"{key}: site {k} sent shape {tuple(t.shape)}, site {sites[0]} {tuple(first.shape)}")
            acc.add_(t.to(dtype), alpha=float(weights[k]) / total)
        out[key] = acc
    return out


def layer_counts(assignments: Mapping[str, Collection[int]], num_layers: int) -> list[int]:
    """c_l: how many sites train each layer."""
    counts = [0] * num_layers
    for layers in assignments.values():
        for l in layers:
            counts[int(l)] += 1
    return counts
