"""Structure and validation of PEFT LoRA state dicts.

Every aggregation rule trusts its inputs, so the server calls `validate_lora_update` on each site
update first: a malformed or poisoned update is rejected with a message naming the offending key
instead of corrupting the global model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
# what a site may send: torch.isfinite is defined for these (not for float8), and they convert exactly to float64
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InvalidUpdate(ValueError):
    """A site update that must be rejected."""


def _prefix(key: str) -> str | None:
    for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def targeted(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for target_modules: ``name`` is one of them, or ends with "." + one of them."""
    return any(name == t or name.endswith("." + t) for t in targets)


def module_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    """Sorted module prefixes that have both a lora_A and a lora_B."""
    return sorted(
        key[: -len(LORA_A_SUFFIX)]
        for key in state
        if key.endswith(LORA_A_SUFFIX) and key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX in state
    )


def lora_module_shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """{prefix: (out, in)}: the shape of the base weight each module adapts."""
    return {
        p: (state[p + LORA_B_SUFFIX].shape[0], state[p + LORA_A_SUFFIX].shape[1])
        for p in module_prefixes(state)
    }


def check_tensor(key, value) -> None:
    """One entry of a site's tensors: a str key, a float tensor of FACTOR_DTYPES, all finite."""
    if not isinstance(key, str):
        raise InvalidUpdate(f"{key!r}: expected a str key, got {type(key).__name__}")
    if not isinstance(value, Tensor) or value.dtype not in FACTOR_DTYPES:
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise InvalidUpdate(f"{key}: expected a torch.Tensor of {[str(d) for d in FACTOR_DTYPES]}, got {got}")
    if not bool(torch.isfinite(value).all()):
        raise InvalidUpdate(f"{key}: contains NaN or Inf")


def validate_lora_update(
    state: Mapping[str, Tensor],
    *,
    rank: int | None = None,
    expected_shapes: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Raise InvalidUpdate unless `state` is a finite, well-formed LoRA state dict.

    `rank` pins every module's rank (methods that average factors need it); `expected_shapes`
    ({prefix: (out, in)}) pins the base-model modules a site may adapt.
    """
    if not state:
        raise InvalidUpdate("empty LoRA update")
    for key, value in state.items():
        check_tensor(key, value)
        prefix = _prefix(key)
        if prefix is None:
            raise InvalidUpdate(
                f"{key}: not a LoRA key (expected a {LORA_A_SUFFIX} or {LORA_B_SUFFIX} name)"
            )
        if value.dim() != 2:
            raise InvalidUpdate(f"{key}: expected a 2-D tensor, got shape {tuple(value.shape)}")
        for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
            if prefix + suffix not in state:
                raise InvalidUpdate(f"{key}: missing its pair {prefix + suffix}")
    for prefix in module_prefixes(state):
        a_key, b_key = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
        a, b = state[a_key], state[b_key]
        if a.shape[0] != b.shape[1]:
            raise InvalidUpdate(
                f"{a_key}: rank {a.shape[0]} does not match {b_key} rank {b.shape[1]}"
            )
        if rank is not None and a.shape[0] != rank:
            raise InvalidUpdate(f"{a_key}: expected rank {rank}, got {a.shape[0]}")
        if expected_shapes is not None:
            if prefix not in expected_shapes:
                raise InvalidUpdate(f"{a_key}: unknown module {prefix}")
            out_dim, in_dim = expected_shapes[prefix]
            if b.shape[0] != out_dim:
                raise InvalidUpdate(f"{b_key}: expected out dim {out_dim}, got {b.shape[0]}")
            if a.shape[1] != in_dim:
                raise InvalidUpdate(f"{a_key}: expected in dim {in_dim}, got {a.shape[1]}")


def product_norms(state: Mapping[str, Tensor], scaling: float) -> dict[str, float]:
    """{prefix: ||scaling * B @ A||_F}, in float64 from the r x r Gram matrices
    (trace(B^T B A A^T)): no out x in product, and factors whose product would overflow float32
    give a large finite (or inf) norm instead of an inf weight at merge time."""
    norms = {}
    for p in module_prefixes(state):
        a, b = state[p + LORA_A_SUFFIX], state[p + LORA_B_SUFFIX]
        if 0 in a.stride() or 0 in b.stride():  # HE shape stubs (zero views): no values, and never materialised
            norms[p] = 0.0
            continue
        a, b = a.double(), b.double()
        squared = torch.trace((b.T @ b) @ (a @ a.T)).clamp(min=0.0)
        norms[p] = abs(float(scaling)) * float(squared.sqrt())
    return norms


def group_modules(
    states: Sequence[Mapping[str, Tensor]],
) -> dict[str, list[tuple[int, Tensor, Tensor]]]:
    """{prefix: [(site index, A, B), ...]} over the union of the sites' modules, sorted by prefix.

    Sites may adapt different modules with different ranks, but a module's (out, in) must agree
    across sites, and every key must belong to an A/B pair.
    """
    groups: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    for k, state in enumerate(states):
        prefixes = module_prefixes(state)
        if 2 * len(prefixes) != len(state):
            stray = sorted(
                set(state) - {p + s for p in prefixes for s in (LORA_A_SUFFIX, LORA_B_SUFFIX)}
            )
            raise ValueError(f"site {k}: keys without a LoRA A/B pair: {stray}")
        for p in prefixes:
            groups.setdefault(p, []).append((k, state[p + LORA_A_SUFFIX], state[p + LORA_B_SUFFIX]))
    for p, members in groups.items():
        k0, a0, b0 = members[0]
        for k, a, b in members[1:]:
            if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
                raise ValueError(
                    f"{p}: site {k} has (out, in) = {(b.shape[0], a.shape[1])}, "
                    f"site {k0} has {(b0.shape[0], a0.shape[1])}"
                )
    return dict(sorted(groups.items()))


def common_float_dtype(states: Sequence[Mapping[str, Tensor]]) -> torch.dtype:
    """The float dtype all tensors share, else float32 (mixed precisions aggregate in fp32)."""
    dtypes = {t.dtype for state in states for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def normalize_weights(weights: Sequence[float], n_sites: int) -> list[float]:
    """Example counts -> probabilities p_k; rejects negative, all-zero or mis-sized weights."""
    if len(weights) != n_sites:
        raise ValueError(f"got {len(weights)} weights for {n_sites} sites")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]
