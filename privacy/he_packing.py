"""Dense packing of a tensor dict into CKKS ciphertexts, and the wire format of an encrypted update.

An update is split into *groups*, the units the server weights as one: the LoRA "A" and "B"
factors (stacking scales only A, zero-padding weights B by s_k), one group per decoder layer
(selective-layer fine-tuning, weighted per layer), or "all". Inside a group every tensor is
flattened in key order into one vector that fills ciphertexts of ``Ckks.chunk`` (8192) values:
no ciphertext per tensor, at most one part-filled ciphertext per group.

Keys, shapes and dtypes travel in clear beside the ciphertexts: the server needs them to vet an
update and to line sites up (docs/he.md, "what the server sees"). Heterogeneous ranks and
stacked shapes round-trip because each update carries its own layout. So do the public factors
an aggregate's groups are to be multiplied by after decryption (1/Σ weights, p_k·s_k).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import math

import numpy as np
import torch
from torch import Tensor

from flare_lora.components.algorithms.layer_average import layer_of
from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, InvalidUpdate

HE_KEY = "__flare_lora_he__"  # the single params key of an encrypted FLModel
GROUPINGS = ("lora", "layer", "all")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def group_of(key: str, grouping: str) -> str:
    if grouping == "lora":
        if key.endswith(LORA_A_SUFFIX):
            return "A"
        if key.endswith(LORA_B_SUFFIX):
            return "B"
        raise InvalidUpdate(f"{key}: not a LoRA key (expected a {LORA_A_SUFFIX} or {LORA_B_SUFFIX} name)")
    if grouping == "layer":
        layer = layer_of(key)
        if layer is None:
            raise InvalidUpdate(f"{key}: not a decoder-layer tensor (no layer index in the name)")
        return f"layer.{layer}"
    if grouping == "all":
        return "all"
    raise ValueError(f"grouping: expected one of {list(GROUPINGS)}, got {grouping!r}")


def pad_lora(state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Zero rows of A and zero columns of B up to ``rank``, so every site's tensors line up slot
    for slot and the server can add them (HetLoRA zero-padding, done before encryption)."""
    out = {}
    for key, t in state.items():
        r = t.shape[0] if key.endswith(LORA_A_SUFFIX) else t.shape[1]
        if r > rank:
            raise ValueError(f"{key}: rank {r} exceeds the round's padding rank {rank}")
        pad = (0, 0, 0, rank - r) if key.endswith(LORA_A_SUFFIX) else (0, rank - r)
        out[key] = torch.nn.functional.pad(t, pad)
    return out


def trim_lora(state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    return {k: (t[:rank] if k.endswith(LORA_A_SUFFIX) else t[:, :rank]).contiguous() for k, t in state.items()}


@dataclass(frozen=True)
class Segment:
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _segments(tensors: Mapping[str, Tensor]) -> list[Segment]:
    return [Segment(k, tuple(tensors[k].shape), str(tensors[k].dtype).removeprefix("torch.")) for k in sorted(tensors)]


def _flatten(tensors: Mapping[str, Tensor], segments: list[Segment]) -> np.ndarray:
    return np.concatenate([tensors[s.key].detach().to("cpu", torch.float64).reshape(-1).numpy() for s in segments])


def _unflatten(flat: np.ndarray, segments: list[Segment]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for s in segments:
        chunk = torch.from_numpy(flat[offset : offset + s.numel].copy())
        out[s.key] = chunk.reshape(s.shape).to(DTYPES[s.dtype])
        offset += s.numel
    return out


def encrypt_state(state: Mapping[str, Tensor], ckks, grouping: str = "lora", pad_rank: int | None = None,
                  bound: float = 16.0, factors: Mapping[str, float] | None = None) -> dict:
    """A site's update as the wire dict the server receives (see :meth:`EncryptedUpdate.to_wire`).

    ``pad_rank``: zero-pad LoRA factors to this rank first. ``factors``: multiply groups by these
    before encrypting (zero-padding's s_k on B, which the server cannot apply: it only multiplies by
    integers). ``bound``: every value must stay within it (the server's budget; ValueError if not).
    """
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise InvalidUpdate(f"{key}: expected a floating-point tensor, got {type(value).__name__}")
        tensors[key] = value
    if not tensors:
        raise InvalidUpdate("empty update: nothing to encrypt")
    if pad_rank is not None:
        tensors = pad_lora(tensors, pad_rank)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        groups.setdefault(group_of(key, grouping), {})[key] = value
    wire = {}
    for name in sorted(groups):
        segments = _segments(groups[name])
        flat = _flatten(groups[name], segments) * float((factors or {}).get(name, 1.0))
        wire[name] = {
            "segments": [[s.key, list(s.shape), s.dtype] for s in segments],
            "ciphertexts": ckks.encrypt(flat, bound),
        }
    return {"context_id": ckks.context_id, "groups": wire}


@dataclass
class EncryptedUpdate:
    """Loaded ciphertexts of one update (or one aggregate), by group, with their layouts and the
    public factor each group is multiplied by after decryption (absent: 1)."""

    groups: dict[str, tuple[list[Segment], list]]
    context_id: str
    factors: dict[str, float] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.key: s.shape for segments, _ in self.groups.values() for s in segments}

    def __iter__(self):
        """Its tensor keys, as iterating the state dict it encrypts would give."""
        return iter(self.shapes)

    def to_wire(self, ckks) -> dict:
        return {
            "context_id": self.context_id,
            "factors": dict(self.factors),
            "groups": {
                name: {"segments": [[s.key, list(s.shape), s.dtype] for s in segments],
                       "ciphertexts": ckks.dump(cts)}
                for name, (segments, cts) in sorted(self.groups.items())
            },
        }

    @classmethod
    def from_wire(cls, wire, ckks, fresh: bool = False) -> EncryptedUpdate:
        """Parse and load; InvalidUpdate naming what is wrong. ``fresh``: a site upload, whose
        ciphertexts must be at the context's first level and scale."""
        if not isinstance(wire, Mapping) or not isinstance(wire.get("groups"), Mapping):
            raise InvalidUpdate(f"not an encrypted update: expected a dict with 'groups', got {type(wire).__name__}")
        if wire.get("context_id") != ckks.context_id:
            raise InvalidUpdate(
                f"ciphertexts from another HE context (context id {wire.get('context_id')!r}, expected "
                f"{ckks.context_id!r}): different CKKS parameters or another provisioning"
            )
        if not wire["groups"]:
            raise InvalidUpdate("encrypted update without groups")
        factors = dict(wire.get("factors") or {})
        if fresh and factors:
            raise InvalidUpdate(f"an upload carries no factors, got {sorted(factors)}")
        for name, f in factors.items():
            if name not in wire["groups"] or isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
                raise InvalidUpdate(f"factor of group {name!r}: expected a finite number for a group it has, got {f!r}")
        groups, seen = {}, set()
        for name, group in wire["groups"].items():
            try:
                segments = [Segment(str(k), tuple(int(d) for d in shape), str(dtype))
                            for k, shape, dtype in group["segments"]]
                blobs = list(group["ciphertexts"])
            except (KeyError, TypeError, ValueError) as e:
                raise InvalidUpdate(f"group {name!r}: malformed layout ({e})") from None
            keys = [s.key for s in segments]
            if keys != sorted(keys):  # the one layout of a key set: a site cannot impose another order
                raise InvalidUpdate(f"group {name!r}: segments not in key order")
            for s in segments:
                if s.dtype not in DTYPES or not s.shape or min(s.shape) < 1:
                    raise InvalidUpdate(f"{s.key}: bad dtype/shape {s.dtype} {s.shape}")
                if s.key in seen:
                    raise InvalidUpdate(f"{s.key}: appears twice")
                seen.add(s.key)
            need = ckks.num_ciphertexts(sum(s.numel for s in segments))
            if len(blobs) != need:
                raise InvalidUpdate(f"group {name!r}: {len(blobs)} ciphertext(s) for {sum(s.numel for s in segments)} "
                                    f"values, expected {need} (truncated or padded payload)")
            try:
                cts = ckks.load(blobs, fresh=fresh)
            except ValueError as e:
                raise InvalidUpdate(f"group {name!r}: {e}") from None
            groups[str(name)] = (segments, cts)
        return cls(groups, ckks.context_id, {str(k): float(v) for k, v in factors.items()})

    def decrypt(self, ckks) -> dict[str, Tensor]:
        out = {}
        for name, (segments, cts) in sorted(self.groups.items()):
            try:
                flat = ckks.decrypt(cts, sum(s.numel for s in segments))
            except ValueError as e:
                raise InvalidUpdate(f"group {name!r}: {e}") from None
            out.update(_unflatten(flat * self.factors.get(name, 1.0), segments))
        return out
