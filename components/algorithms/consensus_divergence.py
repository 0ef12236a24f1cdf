"""FedCDD: consensus-divergence decoupled aggregation of LoRA updates (server side, pure torch).

After "Divide And Conquer: Efficiently Decoupling Consensus And Divergence For Federated LLM
Fine-Tuning". No code or full paper is public; this is our specification, every step below is
explicit (see docs/fedcdd.md for the rationale and the ablations).

Per LoRA matrix θ_k of site k (one matrix at a time: each lora_A, each lora_B, or each
ΔW_k = s_k B_k A_k with ``target="delta"``):

1. Decompose column-wise (``axis="column"``; ``"row"`` uses rows): θ_k = M_k ⊙ V_k, where
   M_k[j] = ‖θ_k[:, j]‖₂ and V_k[:, j] = θ_k[:, j] / M_k[j]. A zero column has M_k[j] = 0 and
   V_k[:, j] = 0: it has no direction to contribute (never 0/0).
2. Consensus magnitude: M̄ = Σ_k p_k M_k, with p_k the site prior (``weighting="uniform"``:
   1/K; ``"data"``: the site's share of training examples).
3. Direction similarity between sites k and j: c_kj = mean over the columns c that are non-zero
   at both sites of ⟨V_k[:, c], V_j[:, c]⟩ (0 when no column is non-zero at both; c_kk = 1).
4. Divergence weights (``similarity="uniqueness"``, the default), with temperature τ:
       K_kj = exp((c_kj − 1) / τ)          (1 for identical directions, → 0 for dissimilar ones)
       n_k  = Σ_j K_kj                      (soft count of sites sharing k's direction, incl. k)
       w_k  = (p_k / n_k) / Σ_i (p_i / n_i)
   n_k is the soft size of k's cluster of near-duplicates, so a direction uploaded by m
   identical sites gets the weight of ONE site (each copy gets 1/m of it) as τ → 0. For the
   reviewers' example (A, A, C with A ≠ C) the duplicated direction gets (2 + 4e) / (4 + 5e) of
   the weight, e = exp((c_AC − 1)/τ): 1/2 for τ → 0 and strictly below the head-count share 2/3
   for any τ when c_AC < 1 (τ → ∞ gives back w_k = p_k). ``"agreement"`` is the literal
   reading of the paper (w_k ∝ p_k exp(mean_{j≠k} c_kj / τ)): sites that agree with the others
   win, so duplicates get MORE than their head count — kept only as an ablation.
   ``"none"``: w_k = p_k.
5. Divergence direction: D = Σ_k w_k V_k, renormalised per column: U[:, j] = D[:, j] / ‖D[:, j]‖
   (a column where D is zero — all sites zero there, or exact cancellation — stays zero).
6. Result: θ_g = (M̄ ⊙ g) ⊙ U, where g guards against cancelling directions (``shrink``):
   ``"cancellation"`` (default): g_j = min(1, ‖D[:, j]‖ / √(Σ_k w_k² [V_k[:, j] ≠ 0])), which is
   1 unless the sites' directions on column j cancel more than unrelated directions would (their
   weighted mean cosine is negative), and → 0 as they cancel exactly: two sites whose updates
   nearly cancel get a column about as small as FedIT's, not the full mean length.
   ``"agreement"``: g_j = ‖D[:, j]‖ / Σ_k w_k [V_k[:, j] ≠ 0] ∈ [0, 1] (1 only for equal
   directions; unrelated directions shrink like FedIT's mean). ``"none"``: g = 1 (the consensus
   magnitude whatever the agreement; what docs/fedcdd.md's ablation measured).
   Applied wherever the consensus magnitude is used. The math runs in float64 (norms of entries
   ≳ 1e19 overflow float32) and a result that is not finite in the inputs' dtype is refused.

Ablations (``consensus`` / ``divergence`` switches): with the consensus step off the magnitude is
that of the plain weighted mean Σ p_k θ_k (FedIT's); with the divergence step off the direction is
that of Σ p_k θ_k. Both off is exactly FedIT (tested), so every variant differs from FedIT by
the named step only.

Targets:
- ``"factors"`` (default): A and B separately, s_k folded into B (θ_k = s_k B_k, so B_g includes
  the scaling and the global is applied with scaling 1). Needs one rank per module across sites. Default because in
  the FedIT-style protocol every site starts the round from the same global (A, B), so the
  factors' columns are aligned across sites (the precondition for comparing directions column by
  column), it is what sites upload and install (no re-factorisation error), and it costs O(size
  of the factors).
- ``"delta"``: ΔW_k = s_k B_k A_k, basis-invariant and rank-agnostic (heterogeneous ranks work);
  ΔW_g is re-factorised by truncated SVD, ΔW_g ≈ U_R S_R V_Rᵀ, B_g = U_R √S_R, A_g = √S_R V_Rᵀ
  with R = ``rank`` or the largest site rank. Costs an out×in matrix per site and module and one
  SVD per module; the truncation discards the part of ΔW_g beyond rank R.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, common_float_dtype, group_modules, normalize_weights

AXES = ("column", "row")
TARGETS = ("factors", "delta")
WEIGHTINGS = ("uniform", "data")
SIMILARITIES = ("uniqueness", "agreement", "none")
SHRINKS = ("cancellation", "agreement", "none")
DEFAULT_TEMPERATURE = 0.1


def _check_choice(key: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: expected one of {list(choices)}, got {value!r}")


def check_options(
    *, temperature: float = DEFAULT_TEMPERATURE, weighting: str = "uniform", similarity: str = "uniqueness",
    axis: str = "column", target: str = "factors", rank: int | None = None, shrink: str = "cancellation",
) -> None:
    """Raise ValueError naming the key for a bad option (used at job-config time too)."""
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and 0 < temperature < math.inf):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("axis", axis, AXES)
    _check_choice("target", target, TARGETS)
    _check_choice("shrink", shrink, SHRINKS)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank: expected an integer >= 1 or None, got {rank!r}")


def _dim(axis: str) -> int:
    """The dimension a norm runs over: a column's norm sums over rows (dim 0)."""
    _check_choice("axis", axis, AXES)
    return 0 if axis == "column" else 1


def decompose(tensor: Tensor, axis: str = "column") -> tuple[Tensor, Tensor]:
    """θ = M ⊙ V: per-column (or per-row) L2 norms M and unit directions V.

    M has shape (cols,) (or (rows,)); V has θ's shape. Zero columns get M = 0 and V = 0, so
    ``compose(M, V, axis)`` reproduces θ exactly there too and no NaN can appear.
    """
    if tensor.dim() != 2:
        raise ValueError(f"decompose: expected a 2-D tensor, got shape {tuple(tensor.shape)}")
    dim = _dim(axis)
    norms = torch.linalg.vector_norm(tensor, dim=dim)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    directions = tensor / safe.unsqueeze(dim)
    return norms, directions


def compose(norms: Tensor, directions: Tensor, axis: str = "column") -> Tensor:
    """Inverse of decompose: scale each column (row) of V by its M."""
    return directions * norms.unsqueeze(_dim(axis))


def _work(t: Tensor) -> Tensor:
    """Compute in float64: half precision loses small norms, float32 norms overflow past ~1e19."""
    return t.double()


def _unit(tensor: Tensor, axis: str) -> Tensor:
    return decompose(tensor, axis)[1]


def direction_similarity(directions: Sequence[Tensor], axis: str = "column") -> Tensor:
    """(K, K) matrix c_kj: mean cosine of the columns that are non-zero at both sites.

    With unit (or zero) columns the cosine is the dot product. Pairs with no commonly non-zero
    column get 0 (no evidence of similarity); c_kk = 1.
    """
    dim = _dim(axis)
    stacked = torch.stack(list(directions))  # (K, rows, cols)
    nonzero = (stacked != 0).any(dim=dim + 1).to(stacked.dtype)  # (K, cols): column has a direction
    # dots[k, j, c] = <V_k[:, c], V_j[:, c]>
    if dim == 0:
        dots = torch.einsum("krc,jrc->kjc", stacked, stacked)
    else:
        dots = torch.einsum("kcr,jcr->kjc", stacked, stacked)
    both = nonzero.unsqueeze(1) * nonzero.unsqueeze(0)  # (K, K, cols)
    count = both.sum(-1)
    sim = torch.where(count > 0, (dots * both).sum(-1) / count.clamp_min(1), torch.zeros_like(count))
    sim = sim.clamp(-1.0, 1.0)
    sim.fill_diagonal_(1.0)
    return sim


def direction_weights(
    similarity: Tensor, prior: Sequence[float] | Tensor, temperature: float = DEFAULT_TEMPERATURE,
    mode: str = "uniqueness",
) -> Tensor:
    """Per-site weights w (sum 1) for combining directions; see the module docstring, step 4."""
    _check_choice("similarity", mode, SIMILARITIES)
    p = torch.as_tensor(prior, dtype=torch.float64)
    c = similarity.to(torch.float64)
    if mode == "none":
        w = p
    elif mode == "uniqueness":
        kernel = torch.exp((c - 1.0) / temperature)
        w = p / kernel.sum(dim=1)
    else:  # agreement: the literal reading, favours sites similar to the others (and duplicates)
        k = c.shape[0]
        mean_other = (c.sum(dim=1) - c.diagonal()) / max(k - 1, 1)
        logits = mean_other / temperature
        w = p * torch.exp(logits - logits.max())
    return w / w.sum()


@torch.no_grad()
def aggregate_matrix(
    tensors: Sequence[Tensor],
    prior: Sequence[float],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    similarity: str = "uniqueness",
    axis: str = "column",
    consensus: bool = True,
    divergence: bool = True,
    shrink: str = "cancellation",
) -> tuple[Tensor, Tensor]:
    """Steps 1-6 for one matrix, in float64. Returns (θ_g, direction weights w used in step 5).

    ``prior`` must already be normalised (sum 1). With both switches off the result is the
    weighted mean Σ p_k θ_k (FedIT).
    """
    _check_choice("shrink", shrink, SHRINKS)
    p = torch.as_tensor(list(prior), dtype=torch.float64)
    thetas = [_work(t) for t in tensors]
    parts = [decompose(t, axis) for t in thetas]
    mean = None
    if not (consensus and divergence):
        mean = sum(float(pk) * t for pk, t in zip(p, thetas))
    if consensus:
        magnitude = sum(float(pk) * m for pk, (m, _) in zip(p, parts))
    else:
        magnitude = decompose(mean, axis)[0]
    dirs = [v for _, v in parts]
    w = direction_weights(direction_similarity(dirs, axis), p, temperature, similarity) if divergence else p
    combined = sum(float(wk) * v for wk, v in zip(w, dirs))  # D of step 5 (weights p without divergence)
    direction = _unit(combined if divergence else mean, axis)
    if consensus and shrink != "none":
        magnitude = magnitude * _agreement(combined, dirs, w, axis, shrink)
    return compose(magnitude, direction, axis), w.to(torch.float32)


def _agreement(combined: Tensor, dirs: Sequence[Tensor], w: Tensor, axis: str, shrink: str) -> Tensor:
    """Per column, the guard g of step 6 from D = Σ w_k V_k, the sites' unit directions and weights w."""
    dim = _dim(axis)
    norm = torch.linalg.vector_norm(combined, dim=dim)
    present = [(v != 0).any(dim=dim).double() for v in dirs]
    if shrink == "agreement":
        scale = sum(float(wk) * m for wk, m in zip(w, present))
    else:  # cancellation: against what unrelated directions would give
        scale = torch.sqrt(sum(float(wk) ** 2 * m for wk, m in zip(w, present)))
    return torch.where(scale > 0, (norm / scale.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(scale))


def _svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-R factors (A (R, in), B (out, R)) of ΔW with B A ≈ ΔW, √S split between them.

    If R exceeds min(out, in) the extra components are zero rows/columns.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
    a[:keep] = root.unsqueeze(1) * vh[:keep]
    b[:, :keep] = u[:, :keep] * root.unsqueeze(0)
    return a, b


@torch.no_grad()
def fedcdd_aggregate(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    scalings: Sequence[float] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    weighting: str = "uniform",
    similarity: str = "uniqueness",
    axis: str = "column",
    target: str = "factors",
    rank: int | None = None,
    consensus: bool = True,
    divergence: bool = True,
    shrink: str = "cancellation",
) -> dict[str, Tensor]:
    """FedCDD over PEFT LoRA state dicts; the global is applied with scaling 1, in float32 (float64
    for float64 sites; ValueError naming the module where it would not be finite).

    Args:
        states: one PEFT LoRA state dict per site.
        weights: example counts (used for ``weighting="data"``; uniform ignores their values).
        scalings: s_k = α_k / r_k per site (default 1): folded into B (factors) or ΔW (delta).
        temperature, similarity: divergence weighting (module docstring, step 4).
        weighting: site prior p_k for the consensus mean and the divergence weights.
        axis: "column" (default, as in the paper and DoRA) or "row".
        target: "factors" (A and B separately, equal ranks) or "delta" (ΔW_k, re-factorised).
        rank: global rank for target="delta" (default: the largest site rank of each module).
        consensus, divergence: the ablation switches; both False is FedIT.
        shrink: the consensus magnitude's guard against cancelling directions (step 6).

    A site of rank r and scaling s installs A_g[:r] and B_g[:, :r] / s (as with zero-padding);
    for target="delta" that is the best rank-r part of ΔW_g, the SVD orders components.
    """
    check_options(temperature=temperature, weighting=weighting, similarity=similarity, axis=axis,
                  target=target, rank=rank, shrink=shrink)
    n = len(states)
    if n == 0:
        raise ValueError("fedcdd_aggregate: no site states")
    scalings = [1.0] * n if scalings is None else [float(s) for s in scalings]
    if len(scalings) != n:
        raise ValueError(f"got {len(scalings)} scalings for {n} sites")
    prior_all = normalize_weights([1.0] * n if weighting == "uniform" else weights, n)
    normalize_weights(weights, n)  # reject negative / mis-sized weights either way
    opts = dict(temperature=temperature, similarity=similarity, axis=axis, consensus=consensus,
                divergence=divergence, shrink=shrink)
    dtype = torch.float64 if common_float_dtype(states) == torch.float64 else torch.float32
    out: dict[str, Tensor] = {}
    for prefix, members in group_modules(states).items():
        sites = [k for k, _, _ in members]
        prior = normalize_weights([prior_all[k] for k in sites], len(sites))
        if target == "factors":
            ranks = {a.shape[0] for _, a, _ in members}
            if len(ranks) != 1:
                got = {f"site {k}": a.shape[0] for k, a, _ in members}
                raise ValueError(
                    f"{prefix}: fedcdd target='factors' needs one rank across sites, got {got}; "
                    "use target='delta' for heterogeneous ranks"
                )
            a_g, _ = aggregate_matrix([_work(a) for _, a, _ in members], prior, **opts)
            b_g, _ = aggregate_matrix([scalings[k] * _work(b) for k, _, b in members], prior, **opts)
        else:
            deltas = [scalings[k] * (_work(b) @ _work(a)) for k, a, b in members]
            delta_g, _ = aggregate_matrix(deltas, prior, **opts)
            a_g, b_g = _svd_factors(delta_g, rank or max(a.shape[0] for _, a, _ in members))
        for key, value in ((prefix + LORA_A_SUFFIX, a_g), (prefix + LORA_B_SUFFIX, b_g)):
            out[key] = value.to(dtype).contiguous()
            if not bool(torch.isfinite(out[key]).all()):
                raise ValueError(f"{key}: the FedCDD aggregate is not finite in {dtype} (the sites' updates "
                                 "are too large); refusing it")
    return out
