"""The layer-selection solvers, on checked and normalised arrays (pure torch/numpy).

:func:`flare_lora.components.algorithms.layer_selection.select_layers` checks its input, normalises
the scores and calls one of these; the problem and λ's units are described there. G is the [N, K]
normalised score array, b the N budgets, cost the K layer costs (integers).

* exact (:func:`solve_exact`): dynamic programming over layers whose state is every site's spent
  budget (Π_i (b_i + 1) states, 2^N choices of who trains each layer). Used automatically while
  that stays small (e.g. 4 sites × 6 layers is instant); exact by construction.
* heuristic (:func:`solve_heuristic`): block-coordinate ascent. Given the other sites' choices the
  objective is separable for site i: layer l is worth w_il = G_il − λ (N − 1 − 2 c'_l), so the
  site's best response is its top-b_i layers of positive worth (with costs a 0/1 knapsack, solved
  for all sites and all starts at once by a DP vectorised over them). Every accepted move strictly
  increases the objective, so the sweeps stop where no site can improve alone. Starts: the λ = 0
  solution (optimal when λ = 0), nested consensus sets of every size (all sites take the t layers
  of largest total score they can afford) and the empty selection, ascended together. Then group
  moves that single-site moves cannot make — take a layer from every site, give a layer to every
  site, move every site from layer a to layer z — each followed by the sweeps (best of the most
  promising 64 per pass, repeated while one improves), and seeded perturbation restarts.
  Measured by benchmarks/selective_solver.py (docs/selective_layer.md, with an independent exact
  reference, HiGHS): optimal on every random unit-cost instance the exact DP checks and on every
  mid-size instance with costs 1–3 HiGHS solves; 100 sites x 32 layers in 30–50 ms (unit costs)
  and at most 0.27 s over 100 instances (costs 1–3), on an idle 2-core machine.
"""

from __future__ import annotations

import math
import random

import numpy as np
from torch import Tensor

EXACT_WORK_LIMIT = 4_000_000  # states x choices x layers up to which "auto" uses the exact DP
KNAPSACK_CELLS = 20_000_000  # rows x layers x budget states per knapsack DP call (about 20 MB of flags)
RESTART_BATCH = 10  # perturbation restarts ascended together (one batch per improvement check)


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


def _top_row(w: np.ndarray, budget: int) -> np.ndarray:
    """With unit costs, a site's best response: its top-``budget`` layers of positive worth."""
    row = np.zeros(len(w), dtype=bool)
    order = np.argsort(-w, kind="stable")[:budget]
    row[order[w[order] > 0]] = True
    return row


def _best_rows(w: np.ndarray, cost: np.ndarray, b: np.ndarray, current: np.ndarray | None = None) -> np.ndarray:
    """Every site's best response max Σ w_l x_l s.t. Σ cost_l x_l <= b_i: one 0/1 knapsack DP over
    the layers worth taking to some site, vectorised over sites (value at capacity j = the best
    total worth of layers costing at most j), then backtracked from each site's own budget. With
    ``current`` (each site's worth now), sites that provably cannot beat it get an empty row."""
    n, k = w.shape
    rows = np.zeros((n, k), dtype=bool)
    if current is not None:  # only sites whose fractional-knapsack bound beats where they are
        sites = np.nonzero(_fractional_bound(w, cost, b) > current + 1e-12)[0]
        if len(sites) < n:
            rows[sites] = _best_rows(w[sites], cost, b[sites]) if len(sites) else rows[sites]
            return rows
    cap_max = int(b.max())
    if n > 1 and n * k * (cap_max + 1) > KNAPSACK_CELLS:  # bounded memory whatever the budgets
        half = n // 2
        rows[:half] = _best_rows(w[:half], cost, b[:half])
        rows[half:] = _best_rows(w[half:], cost, b[half:])
        return rows
    dp = np.zeros((n, cap_max + 1))
    items = np.nonzero((cost <= cap_max) & (w > 0).any(axis=0))[0]
    keep = np.empty((len(items), n, cap_max + 1), dtype=bool)
    for j, l in enumerate(items):
        c = int(cost[l])
        keep[j, :, :c] = False
        cand = dp[:, : cap_max + 1 - c] + w[:, l : l + 1]
        np.greater(cand, dp[:, c:], out=keep[j, :, c:])
        np.maximum(cand, dp[:, c:], out=dp[:, c:])
    cap = b.astype(np.int64).copy()
    sites = np.arange(n)
    for j in range(len(items) - 1, -1, -1):
        taken = keep[j, sites, cap]
        rows[taken, items[j]] = True
        cap[taken] -= int(cost[items[j]])
    return rows


def _fractional_bound(w: np.ndarray, cost: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per site, the LP relaxation of its knapsack (layers by worth per unit cost, the last one
    fractional): an upper bound on its best response's worth."""
    ratio = np.where(w > 0, w / cost, 0.0)
    order = np.argsort(-ratio, axis=1, kind="stable")
    c = np.take_along_axis(np.broadcast_to(cost.astype(np.float64), w.shape), order, axis=1)
    v = np.take_along_axis(np.maximum(w, 0.0), order, axis=1)
    before = np.cumsum(c, axis=1) - c  # cost of the better layers
    room = np.clip(b[:, None] - before, 0.0, c)  # how much of each layer still fits
    return (v * room / c).sum(axis=1)


def _ascend(starts: list[np.ndarray], g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, unit: bool,
            max_sweeps: int = 1000) -> list[np.ndarray]:
    """From each start, best responses site by site until no site can improve alone.

    Each sweep first finds, for every start and site at once, who can improve given the current
    counts (with unit costs: the sum of its top-b_i positive worths beats its current row; with
    costs: its knapsack best response, :func:`_best_rows`, over all starts in one batch), then lets
    those sites move one after another, each against the counts as they are then (with unit costs
    to its fresh best response; with costs to the row found for the sweep if that still improves on
    its current row, else it waits for the next sweep); site i moves in all starts at once. A start whose sweep moved nobody is done;
    one that reaches the same selection as another after a sweep ends where that one ends.
    """
    n, k = g.shape
    if not starts:
        return []
    masks = np.stack([m.copy() for m in starts])  # [S, N, K]
    counts = masks.sum(axis=1).astype(np.float64)  # [S, K]
    active, twins, seen = [], [], {}  # twins: (start, the start with its selection, whose ascent it shares)
    for s in range(len(starts)):
        key = masks[s].tobytes()
        if key in seen:
            twins.append((s, seen[key]))
        else:
            seen[key] = s
            active.append(s)
    last = np.minimum(b, k) - 1
    for _ in range(max_sweeps):
        if not active:
            break
        held = masks[active]
        worth = g[None] - lam * (n - 1 - 2 * (counts[active][:, None, :] - held))  # [s, N, K]
        now = (worth * held).sum(axis=2)  # each site's worth where it is
        if unit:
            ranked = -np.sort(-worth, axis=2)
            best = np.take_along_axis(np.cumsum(np.maximum(ranked, 0.0), axis=2), last[None, :, None], axis=2)[..., 0]
        else:
            proposals = _best_rows(worth.reshape(-1, k), cost, np.tile(b, len(active)), now.reshape(-1))
            proposals = proposals.reshape(worth.shape)
            best = (worth * proposals).sum(axis=2)
        movers = best > now + 1e-12
        idx = np.array(active)
        improved = np.zeros(len(idx), dtype=bool)
        for i in np.nonzero(movers.any(axis=0))[0]:  # site by site, in every start where it may move
            j = np.nonzero(movers[:, i])[0]
            s = idx[j]
            current = masks[s, i]  # [s, K]
            others = counts[s] - current
            w = g[i][None, :] - lam * (n - 1 - 2 * others)
            if unit:  # its fresh best response: top-b_i layers of positive worth
                rank = np.argsort(np.argsort(-w, axis=1, kind="stable"), axis=1, kind="stable")
                row = (rank < b[i]) & (w > 0)
            else:
                row = proposals[j, i]
            better = (w * row).sum(axis=1) > (w * current).sum(axis=1) + 1e-12
            s, j = s[better], j[better]
            masks[s, i] = row[better]
            counts[s] = others[better] + row[better]
            improved[j] = True
        still, seen = [], {}
        for s in idx[improved]:
            key = masks[s].tobytes()
            if key in seen:  # met another start's state: it goes on exactly as that one (the mask is the state)
                twins.append((s, seen[key]))
            else:
                seen[key] = s
                still.append(s)
        active = still
    for s, twin in reversed(twins):  # latest merges first, so chains resolve to their final selection
        masks[s] = masks[twin]
    return list(masks)


def _prefix_rows(order, cost: np.ndarray, b: np.ndarray, limit: int) -> np.ndarray:
    """Every site walks ``order`` taking what it can afford, at most ``limit`` layers."""
    m = np.zeros((len(b), len(cost)), dtype=bool)
    spent, taken = np.zeros(len(b), dtype=np.int64), np.zeros(len(b), dtype=np.int64)
    for l in order:
        take = (spent + cost[l] <= b) & (taken < limit)
        m[take, l] = True
        spent += take * int(cost[l])
        taken += take
    return m


def _starts(g: np.ndarray, b: np.ndarray, lam: float, cost: np.ndarray, unit: bool) -> list[np.ndarray]:
    """The λ = 0 solution, nested consensus sets of every size t (each site takes the first
    min(t, affordable) layers of the ranking by total score, and with costs also of the ranking
    by total score per unit cost), and nothing."""
    n, k = g.shape
    starts = [np.stack([_top_row(g[i], int(b[i])) for i in range(n)]) if unit else _best_rows(g, cost, b)]
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
                t[cost[l] <= b, l] = True  # every site that can afford it, dropping its least valuable layers
                while (over := np.nonzero(t @ cost > b)[0]).size:
                    held = t[over] & (np.arange(k) != l)
                    t[over, np.argmin(np.where(held, g[over], np.inf), axis=1)] = False
                trials.append(t)
        # swaps a -> z (same cost): their value before sweeping in closed form, built only if chosen
        held, free = m.astype(np.float64), (~m).astype(np.float64)
        movers = held.T @ free  # [a, z]: sites holding a but not z
        gain = held.T @ (free * g) - (held * g).T @ free  # Σ over those sites of g_z − g_a
        c = m.sum(axis=0).astype(np.float64)
        ca, cz = c[:, None] - movers, c[None, :] + movers
        penalty = lam * (ca * (n - ca) + cz * (n - cz) - (c * (n - c))[:, None] - (c * (n - c))[None, :])
        swap_value = value + gain - penalty
        valid = (movers > 0) & (cost[:, None] == cost[None, :]) & ~np.eye(k, dtype=bool)
        pairs = list(zip(*np.nonzero(valid)))
        stack = np.stack(trials) if trials else np.zeros((0, n, k), dtype=bool)
        cc = stack.sum(axis=1)
        before = np.concatenate([(stack * g).sum(axis=(1, 2)) - lam * (cc * (n - cc)).sum(axis=1),
                                 swap_value[valid]])
        chosen = np.argsort(-before, kind="stable")[:max_trials]  # sweep only the most promising moves
        picked = []
        for j in chosen:
            if j < len(trials):
                picked.append(trials[j])
            else:
                a, z = pairs[j - len(trials)]
                t = m.copy()
                swap = m[:, a] & ~m[:, z]
                t[swap, a], t[swap, z] = False, True
                picked.append(t)
        trials = picked
        for t in _ascend(trials, g, b, lam, cost, unit):
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
    for m in _ascend(_starts(g, b, lam, cost, unit), g, b, lam, cost, unit):
        value = objective(m, g, lam)
        if value > best_value + 1e-12:
            best, best_value = m, value
    if lam == 0:
        return best  # the problem splits by site: the independent start (own top-b_i) is optimal
    best = _column_moves(best, g, b, lam, cost, unit)
    best_value = objective(best, g, lam)
    restarts = restarts if restarts is not None else max(10, min(100, 2000 // max(1, n)))
    rng = random.Random(seed)
    for first in range(0, restarts, RESTART_BATCH):  # perturbations of the best so far, ascended together
        group = [_perturb(best, g, b, cost, unit, rng) for _ in range(min(RESTART_BATCH, restarts - first))]
        improved = False
        for m in _ascend(group, g, b, lam, cost, unit):
            value = objective(m, g, lam)
            if value > best_value + 1e-12:
                best, best_value, improved = m, value, True
        if improved:
            best = _column_moves(best, g, b, lam, cost, unit, max_passes=2)
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
