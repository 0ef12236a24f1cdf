"""Which decoder layers each site fine-tunes: the selection problem, its input checks and baselines.

Pure torch/numpy, no nvflare import. The server of a selective-layer job calls
:func:`choose_layers` once per selection round with the K numbers each site reported (its layer
scores) and its budget; the result says which layers each site trains next.

The problem ("Exploring Selective Layer Fine-Tuning in Federated Learning"): with G_il the
(normalised) score of layer l at site i, binary m_il = 1 when site i trains layer l, and
c_l = Σ_i m_il the number of sites training layer l,

    maximise   Σ_i Σ_l m_il G_il  −  λ Σ_l c_l (N − c_l)
    subject to Σ_l cost_l m_il <= b_i for every site i.

c_l (N − c_l) = Σ_{i<i'} (m_il − m_i'l)²: the number of site pairs that disagree on layer l. The
first term is the gradient mass the sites train, the second the inconsistency of their choices;
the paper's error bound grows with the mass left out and with the inconsistency.

Score normalisation: every site's scores are rescaled to mean 1 over its layers
(G_il = K · s_il / Σ_l' s_il'). A site's scores then say how much of *its* gradient mass sits in
each layer relative to an average layer, whatever the model, its depth or the loss scale, and
λ is a price in those units: a site adding layer l pays λ·(N − 1 − 2·c'_l), where c'_l is the
number of *other* sites training l (pays λ per other site that does not train l, earns λ per one
that does). Useful values are therefore around 1/N: λ·N ≈ 0.1 nudges, λ·N ≈ 1 or more makes
sites agree whenever their budgets allow. With λ > 0 a site may be given fewer than b_i layers
(a layer nobody else trains can cost more than it earns): the budget is an upper bound.

:func:`select_layers` checks and normalises the input and hands it to a solver of
:mod:`flare_lora.components.algorithms.layer_solver`: the exact DP while it stays small
(``exact_work <= EXACT_WORK_LIMIT``), else the heuristic, which :func:`upper_bound` certifies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from flare_lora.components.algorithms.layer_solver import (
    EXACT_WORK_LIMIT,
    exact_work,
    lagrangian_bound,
    solve_exact,
    solve_heuristic,
)

CRITERIA = ("selective", "full", "top", "bottom", "random", "rgn", "snr")
SCORED = ("selective", "rgn", "snr")  # criteria that need the sites' K numbers


class SelectionError(ValueError):
    """Bad selection input; the message names the site."""


# ---------------------------------------------------------------------------------------------
# input checks and normalisation
# ---------------------------------------------------------------------------------------------


def _site_names(n: int, sites: Sequence[str] | None) -> list[str]:
    if sites is None:
        return [f"site #{i}" for i in range(n)]
    if len(sites) != n:
        raise SelectionError(f"got {len(sites)} site names for {n} score rows")
    return [repr(s) for s in sites]


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        return True
    return False


def check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
        raise SelectionError(f"lam: expected a finite number >= 0, got {lam!r}")
    if not math.isfinite(float(lam)) or lam < 0:
        raise SelectionError(f"lam: expected a finite number >= 0, got {lam!r}")
    return float(lam)


def check_costs(costs, num_layers: int) -> np.ndarray:
    """Per-layer costs: positive integers (budgets are in the same units), default all 1."""
    if costs is None:
        return np.ones(num_layers, dtype=np.int64)
    values = costs.tolist() if isinstance(costs, (Tensor, np.ndarray)) else list(costs)
    if len(values) != num_layers:
        raise SelectionError(f"costs: expected {num_layers} values (one per layer), got {len(values)}")
    for l, c in enumerate(values):
        if not (_is_int(c) or (isinstance(c, float) and c.is_integer())) or c < 1:
            raise SelectionError(f"costs: layer {l}: expected an integer >= 1, got {c!r}")
    return np.asarray([int(c) for c in values], dtype=np.int64)


def check_scores(scores, sites: Sequence[str] | None = None, num_layers: int | None = None) -> np.ndarray:
    """[N, K] float64 array of finite, non-negative scores; errors name the site.

    ``scores`` may be a tensor, an array or a list of per-site sequences. Without ``num_layers``
    the expected length is the most common row length, so a site with a wrong length is named.
    """
    rows = [r.tolist() if isinstance(r, (Tensor, np.ndarray)) else r for r in scores]
    if not rows:
        raise SelectionError("scores: expected one row per site, got none")
    names = _site_names(len(rows), sites)
    lengths = []
    for name, row in zip(names, rows):
        if not isinstance(row, (list, tuple)):
            raise SelectionError(f"site {name}: scores: expected a sequence of numbers, got {type(row).__name__}")
        lengths.append(len(row))
    k = num_layers if num_layers is not None else max(set(lengths), key=lambda n: (lengths.count(n), n))
    out = np.zeros((len(rows), k), dtype=np.float64)
    for i, (name, row) in enumerate(zip(names, rows)):
        if len(row) != k:
            raise SelectionError(f"site {name}: scores: expected {k} numbers (one per layer), got {len(row)}")
        for l, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise SelectionError(f"site {name}: scores: layer {l}: expected a number, got {v!r}")
            if not math.isfinite(float(v)):
                raise SelectionError(f"site {name}: scores: layer {l} is {v} (NaN or Inf)")
            if v < 0:
                raise SelectionError(f"site {name}: scores: layer {l} is {v}; scores must be >= 0")
            out[i, l] = float(v)
    return out


def check_budgets(budgets, num_sites: int, costs: np.ndarray, sites: Sequence[str] | None = None) -> np.ndarray:
    """Integer budgets in [1, Σ cost] (= [1, K] with unit costs); errors name the site."""
    values = budgets.tolist() if isinstance(budgets, (Tensor, np.ndarray)) else list(budgets)
    if len(values) != num_sites:
        raise SelectionError(f"budgets: expected {num_sites} values (one per site), got {len(values)}")
    names = _site_names(num_sites, sites)
    total, cheapest = int(costs.sum()), int(costs.min())
    unit = bool((costs == 1).all())
    upper = f"{total} (the number of layers)" if unit else f"{total} (the cost of all layers)"
    out = []
    for name, b in zip(names, values):
        if not _is_int(b):
            raise SelectionError(f"site {name}: budget: expected an integer in [1, {upper}], got {b!r}")
        b = int(b)
        if b < 1 or b > total:
            raise SelectionError(f"site {name}: budget: expected an integer in [1, {upper}], got {b}")
        if b < cheapest:
            raise SelectionError(f"site {name}: budget {b} cannot pay for any layer (cheapest costs {cheapest})")
        out.append(b)
    return np.asarray(out, dtype=np.int64)


def normalize_scores(scores: np.ndarray) -> np.ndarray:
    """Each site's scores rescaled to mean 1 over its layers; an all-zero row becomes all ones."""
    scores = np.asarray(scores, dtype=np.float64)
    k = scores.shape[1]
    totals = scores.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(totals > 0, scores * (k / np.where(totals > 0, totals, 1.0)), 1.0)
    return out


def check_problem(scores, budgets, lam, costs=None, *, sites: Sequence[str] | None = None,
                  normalize: bool = True) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(G [N, K], budgets, λ, costs) checked, G normalised unless ``normalize=False``."""
    lam = check_lam(lam)
    g = check_scores(scores, sites)
    cost = check_costs(costs, g.shape[1])
    b = check_budgets(budgets, g.shape[0], cost, sites)
    return (normalize_scores(g) if normalize else g), b, lam, cost


# ---------------------------------------------------------------------------------------------
# the selection
# ---------------------------------------------------------------------------------------------


def select_layers(
    scores,
    budgets,
    lam: float,
    costs=None,
    *,
    sites: Sequence[str] | None = None,
    normalize: bool = True,
    method: str = "auto",
    seed: int = 0,
    restarts: int | None = None,
) -> Tensor:
    """Bool tensor [N, K]: which layers each site trains (see the module docstring).

    Args:
        scores: [N, K] per-site layer scores (e.g. squared gradient norms), finite and >= 0.
        budgets: N integers in [1, Σ cost] (with unit costs: how many layers each site may train).
        lam: the consistency weight λ >= 0 (in units of the normalised scores).
        costs: K positive integers, the cost of training each layer (default: 1 each).
        sites: names used in error messages (default "site #i").
        normalize: rescale each site's scores to mean 1 first (what λ's units assume).
        method: "exact" (DP; refuses problems too large), "heuristic" (block-coordinate ascent
            with local search) or "auto" (exact while the DP is small, else heuristic).
        seed, restarts: the heuristic's perturbations (default restarts scale with the size).
    """
    g, b, lam, cost = check_problem(scores, budgets, lam, costs, sites=sites, normalize=normalize)
    n, k = g.shape
    if method not in ("auto", "exact", "heuristic"):
        raise SelectionError(f"method: expected 'auto', 'exact' or 'heuristic', got {method!r}")
    work = exact_work(b, cost, n)
    if method == "exact" or (method == "auto" and work <= EXACT_WORK_LIMIT):
        if work > 50 * EXACT_WORK_LIMIT:
            raise SelectionError(f"exact selection too large: {work:.3g} DP steps for {n} sites x {k} layers")
        mask = solve_exact(g, b, lam, cost)
    else:
        mask = solve_heuristic(g, b, lam, cost, seed=seed, restarts=restarts)
    return torch.from_numpy(mask.astype(bool))


def upper_bound(scores, budgets, lam: float, costs=None, *, normalize: bool = True, iters: int = 300) -> float:
    """An upper bound on the optimal objective (certifies the heuristic where the DP cannot):
    the Lagrangian relaxation of the budgets, ``layer_solver.lagrangian_bound``."""
    g, b, lam, cost = check_problem(scores, budgets, lam, costs, normalize=normalize)
    return lagrangian_bound(g, b, lam, cost, iters)


# ---------------------------------------------------------------------------------------------
# baselines and the criterion dispatch the server uses
# ---------------------------------------------------------------------------------------------


def positional(budgets, num_layers: int, where: str, costs=None, *, sites=None) -> Tensor:
    """"top": each site's b_i layers nearest the output; "bottom": nearest the input."""
    cost = check_costs(costs, num_layers)
    b = check_budgets(budgets, len(budgets), cost, sites)
    order = list(range(num_layers))[::-1] if where == "top" else list(range(num_layers))
    mask = np.zeros((len(b), num_layers), dtype=bool)
    for i, budget in enumerate(b):
        spent = 0
        for l in order:
            if spent + cost[l] <= budget:
                mask[i, l] = True
                spent += int(cost[l])
    return torch.from_numpy(mask)


def random_layers(budgets, num_layers: int, seed: int, costs=None, *, sites=None) -> Tensor:
    """Each site a uniformly random set of layers that fills its budget (seeded)."""
    cost = check_costs(costs, num_layers)
    b = check_budgets(budgets, len(budgets), cost, sites)
    rng = random.Random(seed)
    mask = np.zeros((len(b), num_layers), dtype=bool)
    for i, budget in enumerate(b):
        spent = 0
        for l in rng.sample(range(num_layers), num_layers):
            if spent + cost[l] <= budget:
                mask[i, l] = True
                spent += int(cost[l])
    return torch.from_numpy(mask)


def choose_layers(
    criterion: str,
    budgets,
    num_layers: int,
    *,
    scores=None,
    lam: float = 0.0,
    costs=None,
    seed: int = 0,
    sites: Sequence[str] | None = None,
) -> Tensor:
    """The [N, K] selection of a criterion (what ``--selection`` picks in the job).

    selective: :func:`select_layers` on the sites' squared gradient norms with λ = lam.
    rgn / snr: each site's top-b_i layers by its relative gradient norm ‖g‖²/‖w‖² or by the
        signal-to-noise ratio mean/std of its per-batch gradient norms (λ = 0: local criteria).
    top / bottom / random: positional or random sets that fill each budget.
    full: every layer at every site (budgets ignored: the reference the others save against).
    """
    if criterion not in CRITERIA:
        raise SelectionError(f"selection: expected one of {list(CRITERIA)}, got {criterion!r}")
    if criterion == "full":
        return torch.ones(len(budgets), num_layers, dtype=torch.bool)
    if criterion in ("top", "bottom"):
        return positional(budgets, num_layers, criterion, costs, sites=sites)
    if criterion == "random":
        return random_layers(budgets, num_layers, seed, costs, sites=sites)
    if scores is None:
        raise SelectionError(f"selection {criterion!r} needs the sites' scores")
    check_scores(scores, sites, num_layers)
    return select_layers(scores, budgets, lam if criterion == "selective" else 0.0, costs, sites=sites, seed=seed)
