"""The layer-selection solvers, on checked and normalised arrays (pure torch/numpy).

:func:`flare_lora.components.algorithms.layer_selection.select_layers` checks its input, normalises
the scores and calls one of these; the problem and λ's units are described there. G is the [N, K]
normalised score array, b the N budgets, cost the K layer costs (integers).

* exact (:func:`solve_exact`): dynamic programming over layers whose state is every site's spent
  budget (Π_i (b_i + 1) states, 2^N choices of who trains each layer). Used automatically while
  that stays small (e.g. 4 sites × 6 layers is instant); exact by construction.
* heuristic (:func:`solve_heuristic`): block-coordinate ascent. Given the other sites' choices the
  objective is separable for site i: layer l is worth w_il = G_il − λ (N − 1 − 2 c'_l), so the
  site's best response is its top-b_i layers of positive worth (a small knapsack DP with costs).
  Every accepted best response strictly increases the objective, so the sweeps stop where no site
  can improve alone. Starts: the λ = 0 solution (optimal when λ = 0), nested consensus sets of
  every size (all sites take the t layers of largest total score they can afford) and the empty
  selection. Then group moves that single-site moves cannot make — take a layer from every site,
  give a layer to every site, move every site from layer a to layer z — each followed by the
  sweeps (best of the most promising 64 per pass, repeated while one improves), and seeded
  perturbation restarts. Measured (benchmarks/selective_solver.py, docs/selective_layer.md):
  optimal on all 500 random unit-cost instances that the exact DP can check (up to 8 sites, 12
  layers, λ·N from 0.1 to 10), 2 of 250 with integer layer costs off by <= 1.7 %; 100 sites x 32
  layers in ~0.1 s, within 0.03 % of the Lagrangian upper bound (:func:`lagrangian_bound`).
"""

from __future__ import annotations

import math
import random

import numpy as np
from torch import Tensor

EXACT_WORK_LIMIT = 4_000_000  # states x choices x layers up to which "auto" uses the exact DP


def objective(mask, scores, lam: float) -> float:
    """Σ m·G − λ Σ_l c_l (N − c_l) for a [N, K] mask on scores as given (already normalised)."""
    m = np.asarray(mask.numpy() if isinstance(mask, Tensor) else mask, dtype=np.float64)
    g = np.asarray(scores.numpy() if isinstance(scores, Tensor) else scores, dtype=np.float64)
    c = m.sum(axis=0)
    return float((m * g).sum() - lam * (c * (m.shape[0] - c)).sum())


def inconsistency(mask) -> int:
    """Σ_l c_l (N − c_l): pairs of sites that disagree on a layer, summed over layers."""
    m = np.asarray(mask.numpy() if isinstance(mask, Tensor) else mask, dtype=np.int64)
    c = m.sum(axis=0)
    return int((c * (m.shape[0] - c)).sum())


def exact_work(budgets: np.ndarray, costs: np.ndarray, num_sites: int) -> float:
    """DP size: budget states x subsets of sites x layers."""
    states = float(np.prod(np.minimum(budgets, costs.sum()) + 1.0))
    return states * (2.0**num_sites) * len(costs)


def solve_exact(g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray) -> np.ndarray:
    """DP over layers; state = budget spent by every site (an N-dimensional array)."""
    n, k = g.shape
    shape = tuple(int(x) + 1 for x in b)
    dp = np.full(shape, -np.inf)
    dp[(0,) * n] = 0.0
    subsets = [np.array([(s >> i) & 1 for i in range(n)], dtype=bool) for s in range(2**n)]
    choices = []
    for l in range(k):
        c = int(cost[l])
        new = np.full(shape, -np.inf)
        choice = np.zeros(shape, dtype=np.int32)
        for s, members in enumerate(subsets):
            if (b[members] < c).any():
                continue
            size = int(members.sum())
            gain = float(g[members, l].sum()) - lam * size * (n - size)
            src = tuple(slice(0, shape[i] - c) if members[i] else slice(None) for i in range(n))
            dst = tuple(slice(c, None) if members[i] else slice(None) for i in range(n))
            cand = dp[src] + gain
            region, region_choice = new[dst], choice[dst]  # views into new / choice
            better = cand > region
            region[better] = cand[better]
            region_choice[better] = s
        dp = new
        choices.append(choice)
    state = list(np.unravel_index(int(np.argmax(dp)), shape))
    mask = np.zeros((n, k), dtype=bool)
    for l in range(k - 1, -1, -1):
        members = subsets[int(choices[l][tuple(state)])]
        mask[:, l] = members
        for i in np.nonzero(members)[0]:
            state[i] -= int(cost[l])
    return mask


def _best_row(w: np.ndarray, cost: np.ndarray, budget: int, unit: bool) -> np.ndarray:
    """max Σ w_l x_l s.t. Σ cost_l x_l <= budget, x binary (only positive w are worth taking)."""
    k = len(w)
    row = np.zeros(k, dtype=bool)
    if unit:
        order = np.argsort(-w, kind="stable")[:budget]
        row[order[w[order] > 0]] = True
        return row
    items = np.nonzero(w > 0)[0]
    if len(items) == 0:
        return row
    dp = np.zeros(budget + 1)
    keep = np.zeros((len(items), budget + 1), dtype=bool)
    for j, l in enumerate(items):
        c = int(cost[l])
        if c > budget:
            continue
        cand = dp[: budget + 1 - c] + w[l]
        take = cand > dp[c:]
        keep[j, c:] = take
        dp[c:] = np.where(take, cand, dp[c:])
    cap = budget
    for j in range(len(items) - 1, -1, -1):
        if keep[j, cap]:
            row[items[j]] = True
            cap -= int(cost[items[j]])
    return row


def _ascend(m: np.ndarray, g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, unit: bool,
            max_sweeps: int = 1000) -> np.ndarray:
    """Best responses site by site until no site can improve alone (in place; returns m).

    Each sweep first finds, for all sites at once, who can improve given the current counts
    (with unit costs: the sum of its top-b_i positive worths beats its current row), then lets
    those sites move one after another, each against the counts as they are then.
    """
    n, k = g.shape
    c = m.sum(axis=0).astype(np.float64)
    rows = np.arange(n)
    last = np.minimum(b, k) - 1
    for _ in range(max_sweeps):
        if unit:
            worth = g - lam * (n - 1 - 2 * (c[None, :] - m))
            ranked = -np.sort(-worth, axis=1)
            best = np.cumsum(np.maximum(ranked, 0.0), axis=1)[rows, last]
            movers = np.nonzero(best > (worth * m).sum(axis=1) + 1e-12)[0]
        else:
            movers = rows
        improved = False
        for i in movers:
            others = c - m[i]
            w = g[i] - lam * (n - 1 - 2 * others)
            row = _best_row(w, cost, int(b[i]), unit)
            if w[row].sum() > w[m[i]].sum() + 1e-12:
                m[i] = row
                c = others + row
                improved = True
        if not improved:
            break
    return m


def _prefix_rows(order, cost: np.ndarray, b: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Every site walks ``order`` taking what it can afford, at most ``limit`` layers."""
    n, k = len(b), len(cost)
    m = np.zeros((n, k), dtype=bool)
    for i in range(n):
        spent, taken = 0, 0
        for l in order:
            if limit is not None and taken >= limit:
                break
            if spent + cost[l] <= b[i]:
                m[i, l] = True
                spent += int(cost[l])
                taken += 1
    return m


def _starts(g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, unit: bool) -> list[np.ndarray]:
    """The λ = 0 solution, nested consensus sets of every size t (each site takes the first
    min(t, affordable) layers of the ranking by total score, and with costs also of the ranking
    by total score per unit cost), and nothing."""
    n, k = g.shape
    starts = [np.stack([_best_row(g[i], cost, int(b[i]), unit) for i in range(n)])]
    orders = [np.argsort(-g.sum(axis=0), kind="stable")]
    if not unit:  # with costs, also rank by total score per unit of cost
        orders.append(np.argsort(-g.sum(axis=0) / cost, kind="stable"))
    for order in orders:
        starts += [_prefix_rows(order, cost, b, t) for t in range(1, min(k, int(b.max())) + 1)]
    starts.append(np.zeros((n, k), dtype=bool))
    return starts


def _column_moves(m: np.ndarray, g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, unit: bool,
                  max_passes: int = 20, max_trials: int = 64) -> np.ndarray:
    """Group moves that single-site best responses cannot make, each followed by the sweeps:
    take layer l away from every site ("clear"), give it to every site that can afford it by
    dropping its least valuable layers ("fill"), or move every site holding layer a but not z
    from a to z ("swap"). Of the (up to 2K + K²) moves, the ``max_trials`` best before sweeping
    are swept; the best result is kept, and passes repeat while one improves."""
    n, k = g.shape
    value = objective(m, g, lam)
    for _ in range(max_passes):
        best, best_value = None, value
        trials = []
        for l in range(k):
            if m[:, l].any():
                t = m.copy()
                t[:, l] = False
                trials.append(t)
            if not m[:, l].all():
                t = m.copy()
                for i in np.nonzero(~t[:, l])[0]:
                    if cost[l] > b[i]:
                        continue
                    row = t[i]
                    row[l] = True
                    while int(cost[row].sum()) > b[i]:
                        held = np.nonzero(row)[0]
                        held = held[held != l]
                        row[held[np.argmin(g[i, held])]] = False
                trials.append(t)
        for a in range(k):
            holders = m[:, a]
            if not holders.any():
                continue
            for z in range(k):
                if z == a or cost[z] != cost[a]:
                    continue
                movers = holders & ~m[:, z]
                if movers.any():
                    t = m.copy()
                    t[movers, a] = False
                    t[movers, z] = True
                    trials.append(t)
        if len(trials) > max_trials:  # sweep only the most promising moves (by value before sweeping)
            before = np.array([objective(t, g, lam) for t in trials])
            trials = [trials[j] for j in np.argsort(-before, kind="stable")[:max_trials]]
        for t in trials:
            t = _ascend(t, g, b, lam, cost, unit)
            v = objective(t, g, lam)
            if v > best_value + 1e-12:
                best, best_value = t, v
        if best is None:
            break
        m, value = best, best_value
    return m


def _perturb(best: np.ndarray, g: np.ndarray, b: np.ndarray, cost: np.ndarray, unit: bool,
             rng: random.Random) -> np.ndarray:
    """Re-draw a random group of sites: each takes a random affordable set."""
    n, k = best.shape
    m = best.copy()
    for i in rng.sample(range(n), max(1, min(n, rng.randint(1, max(1, n // 3))))):
        row = np.zeros(k, dtype=bool)
        spent = 0
        for l in rng.sample(range(k), k):
            if spent + cost[l] <= b[i] and rng.random() < 0.7:
                row[l] = True
                spent += int(cost[l])
        m[i] = row
    return m


def solve_heuristic(g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, *, seed: int = 0,
                    restarts: int | None = None) -> np.ndarray:
    """Best of the ascents from every start, improved by group moves and seeded restarts."""
    n, k = g.shape
    unit = bool((cost == 1).all())
    best, best_value = None, -math.inf
    for start in _starts(g, b, lam, cost, unit):
        m = _ascend(start.copy(), g, b, lam, cost, unit)
        value = objective(m, g, lam)
        if value > best_value + 1e-12:
            best, best_value = m, value
    if lam == 0:
        return best  # the problem splits by site: the independent start (own top-b_i) is optimal
    best = _column_moves(best, g, b, lam, cost, unit)
    best_value = objective(best, g, lam)
    restarts = restarts if restarts is not None else max(10, min(100, 2000 // max(1, n)))
    rng = random.Random(seed)
    for _ in range(restarts):
        m = _ascend(_perturb(best, g, b, cost, unit, rng), g, b, lam, cost, unit)
        value = objective(m, g, lam)
        if value > best_value + 1e-12:
            best, best_value = _column_moves(m, g, b, lam, cost, unit, max_passes=2), value
            best_value = objective(best, g, lam)
    return best


def lagrangian_bound(g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, iters: int = 300) -> float:
    """An upper bound on the optimal objective, by relaxing every site's budget with a price μ_i.

    For fixed μ >= 0 the problem splits by layer: the best set of c sites for layer l is the c
    with the largest G_il − μ_i cost_l, so L(μ) = Σ_i μ_i b_i + Σ_l max_c [top-c sum − λ c (N − c)]
    is computed exactly by sorting; any μ gives a bound, and a projected subgradient descent
    tightens it. (opt <= min over the iterations of L(μ).)
    """
    n, k = g.shape
    cost, b = cost.astype(np.float64), b.astype(np.float64)
    cs = np.arange(n + 1, dtype=np.float64)
    penalty = lam * cs * (n - cs)
    mu = np.zeros(n)
    best = math.inf
    step = float(g.max()) if g.size else 1.0
    for t in range(iters):
        v = g - mu[:, None] * cost[None, :]  # [N, K]
        order = np.argsort(-v, axis=0, kind="stable")
        sorted_v = np.take_along_axis(v, order, axis=0)
        prefix = np.vstack([np.zeros((1, k)), np.cumsum(sorted_v, axis=0)])  # [N+1, K]
        totals = prefix - penalty[:, None]
        best_c = np.argmax(totals, axis=0)
        value = float((mu * b).sum() + totals[best_c, np.arange(k)].sum())
        best = min(best, value)
        used = np.zeros(n)
        for l in range(k):
            used[order[: best_c[l], l]] += cost[l]
        grad = b - used
        norm = float(np.linalg.norm(grad))
        if norm == 0:
            break
        mu = np.maximum(0.0, mu - step / math.sqrt(t + 1) * grad / norm)
    return best
