"""Layer-selection solver: optimality gap against the exact DP, and time at 100 sites x 32 layers.

    python benchmarks/selective_solver.py            # ~1-2 min on 2 shared cores
    python benchmarks/selective_solver.py --quick    # a few seconds
    python benchmarks/selective_solver.py --timing 20  # only the cost path's time at 100 x 32, 100 instances

Part 1 runs the heuristic (``select_layers(..., method="heuristic")``: block-coordinate ascent
with group moves and perturbation restarts) and the exact DP on random instances small enough for
the DP, and reports how often the heuristic is optimal and its relative gap
(opt − heuristic) / |opt|. Scores are gamma-distributed with a random trend over depth; budgets
uniform in [1, b_max]; λ is given as λ·N (the per-site price of disagreeing with everyone).

Part 2 times the default solver (``method="auto"``, which picks the heuristic at this size) on
100 sites x 32 layers and certifies it with the Lagrangian upper bound (``upper_bound``):
gap <= (bound − value) / bound.

Parts 3 and 4 check the cost-weighted path (layer costs 1-3) against an independent exact
reference, a mixed-integer program solved by HiGHS (scipy.optimize.milp; the penalty linearised
with one binary per layer and site count): on mid-size instances that "auto" hands to the
heuristic (too large for the DP) and at 100 x 32, where HiGHS gets a time limit and reports its
proven bound when it cannot finish.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flare_lora.components.algorithms.layer_selection import normalize_scores, select_layers, upper_bound
from flare_lora.components.algorithms.layer_solver import EXACT_WORK_LIMIT, exact_work, inconsistency, objective


def instance(rng, n, k, b_max, with_costs):
    g = rng.gamma(rng.choice([0.3, 1.0, 3.0]), size=(n, k)) * np.linspace(1.0, rng.uniform(0.2, 5.0), k)
    costs = rng.integers(1, 3, size=k) if with_costs else None
    top = int(costs.sum()) if with_costs else k
    budgets = rng.integers(1, min(b_max, top) + 1, size=n)
    if with_costs:
        budgets = np.maximum(budgets, costs.min())
    return g, budgets, costs


def gap_table(quick: bool, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = [(4, 6, 6, False), (6, 8, 3, False), (8, 8, 2, False), (5, 12, 3, False), (4, 6, 6, True), (6, 6, 4, True)]
    lam_ns = [0.1, 0.3, 1.0, 3.0, 10.0]
    trials = 4 if quick else 25
    rows = []
    for n, k, b_max, with_costs in sizes:
        for lam_n in lam_ns:
            gaps, t_exact, t_heur = [], 0.0, 0.0
            for _ in range(trials):
                g, b, costs = instance(rng, n, k, b_max, with_costs)
                lam = lam_n / n
                norm = normalize_scores(g)
                t0 = time.perf_counter()
                exact = objective(select_layers(g, b, lam, costs, method="exact"), norm, lam)
                t1 = time.perf_counter()
                heur = objective(select_layers(g, b, lam, costs, method="heuristic"), norm, lam)
                t2 = time.perf_counter()
                t_exact, t_heur = t_exact + t1 - t0, t_heur + t2 - t1
                gaps.append((exact - heur) / abs(exact) if exact else 0.0)
            rows.append({
                "size": f"{n}x{k}", "b_max": b_max, "costs": "1-2" if with_costs else "1", "lam_n": lam_n,
                "instances": trials, "optimal": sum(gap <= 1e-9 for gap in gaps),
                "mean_gap": float(np.mean(gaps)), "max_gap": float(np.max(gaps)),
                "exact_ms": 1e3 * t_exact / trials, "heur_ms": 1e3 * t_heur / trials,
            })
    return rows


def large_table(quick: bool, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    n, k = 100, 32
    rows = []
    for lam_n in ([0.3, 3.0] if quick else [0.1, 0.3, 1.0, 3.0, 10.0]):
        g = rng.gamma(0.5, size=(n, k)) * np.linspace(1.0, rng.uniform(0.3, 3.0), k)
        budgets = rng.integers(1, 9, size=n)
        lam = lam_n / n
        t0 = time.perf_counter()
        mask = select_layers(g, budgets, lam)
        seconds = time.perf_counter() - t0
        norm = normalize_scores(g)
        value = objective(mask, norm, lam)
        bound = upper_bound(g, budgets, lam, iters=300 if quick else 2000)
        independent = select_layers(g, budgets, 0.0)
        rows.append({
            "lam_n": lam_n, "seconds": seconds, "value": value, "bound": bound,
            "gap_bound": (bound - value) / abs(bound) if bound else 0.0,
            "incons": inconsistency(mask), "incons_lam0": inconsistency(independent),
            "value_lam0": objective(independent, norm, lam),
        })
    return rows


def solve_milp(g, b, lam, cost, time_limit: float):
    """max Σ x·G − λ Σ_l t_l (N − t_l) exactly: x_il site i trains layer l, y_lt layer l has t sites.
    Returns (objective of HiGHS' best selection or None, proven upper bound, optimal?, seconds)."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # scipy >= 1.9 (installed with opacus)
    from scipy.sparse import coo_matrix

    n, k = g.shape
    nx = n * k
    t = np.arange(n + 1)
    c = np.concatenate([-g.reshape(-1), np.tile(lam * t * (n - t), k)])
    rows, cols, vals = [], [], []
    for i in range(n):  # budget of site i
        rows += [i] * k
        cols += list(range(i * k, (i + 1) * k))
        vals += list(cost.astype(float))
    for l in range(k):  # Σ_i x_il − Σ_t t y_lt = 0 and Σ_t y_lt = 1
        rows += [n + l] * n + [n + l] * (n + 1) + [n + k + l] * (n + 1)
        ys = list(range(nx + l * (n + 1), nx + (l + 1) * (n + 1)))
        cols += list(range(l, nx, k)) + ys + ys
        vals += [1.0] * n + list(-t.astype(float)) + [1.0] * (n + 1)
    a = coo_matrix((vals, (rows, cols)), shape=(n + 2 * k, nx + k * (n + 1))).tocsr()
    lo = np.concatenate([np.full(n, -np.inf), np.zeros(k), np.ones(k)])
    hi = np.concatenate([b.astype(float), np.zeros(k), np.ones(k)])
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(len(c)), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    seconds = time.perf_counter() - t0
    value = objective(res.x[:nx].round().reshape(n, k), g, lam) if res.x is not None else None
    return value, -float(res.mip_dual_bound), res.status == 0, seconds


def cost_instance(rng, n, k, b_max):
    g = rng.gamma(rng.choice([0.3, 1.0, 3.0]), size=(n, k)) * np.linspace(1.0, rng.uniform(0.2, 5.0), k)
    costs = rng.integers(1, 4, size=k)
    budgets = np.maximum(rng.integers(1, b_max + 1, size=n), costs.min())
    return g, budgets, costs


def mid_cost_table(quick: bool, seed: int) -> list[dict]:
    """Cost instances "auto" solves with the heuristic, against HiGHS' exact optimum."""
    rng = np.random.default_rng(seed + 2)
    rows = []
    for n, k, b_max in [(8, 10, 6), (12, 16, 8)]:
        for lam_n in [0.3, 1.0, 3.0, 10.0]:
            gaps, times, exact_s, unsolved = [], [], [], 0
            for _ in range(3 if quick else 10):
                g, b, costs = cost_instance(rng, n, k, b_max)
                if exact_work(b, costs, n) <= EXACT_WORK_LIMIT:
                    continue  # "auto" would solve it exactly
                lam, norm = lam_n / n, normalize_scores(g)
                t0 = time.perf_counter()
                value = objective(select_layers(g, b, lam, costs), norm, lam)
                times.append(time.perf_counter() - t0)
                opt, bound, optimal, seconds = solve_milp(norm, b, lam, costs, time_limit=60)
                exact_s.append(seconds)
                if not optimal:
                    unsolved += 1
                    continue
                gaps.append((opt - value) / abs(opt) if opt else 0.0)
            rows.append({"size": f"{n}x{k}", "b_max": b_max, "lam_n": lam_n, "instances": len(gaps),
                         "unsolved": unsolved, "optimal": sum(x <= 1e-9 for x in gaps),
                         "max_gap": max(gaps, default=0.0), "heur_ms": 1e3 * max(times), "milp_s": max(exact_s)})
    return rows


def large_cost_table(quick: bool, seed: int) -> list[dict]:
    """100 x 32 with costs 1-3: time, the Lagrangian bound and HiGHS (time-limited)."""
    rng = np.random.default_rng(seed + 3)
    rows = []
    for lam_n in ([0.3, 3.0] if quick else [0.1, 0.3, 1.0, 3.0, 10.0]):
        g, b, costs = cost_instance(rng, 100, 32, 24)
        lam, norm = lam_n / 100, normalize_scores(g)
        t0 = time.perf_counter()
        value = objective(select_layers(g, b, lam, costs), norm, lam)
        seconds = time.perf_counter() - t0
        bound = upper_bound(g, b, lam, costs, iters=300 if quick else 2000)
        opt, milp_bound, optimal, milp_s = solve_milp(norm, b, lam, costs, time_limit=20 if quick else 60)
        rows.append({"lam_n": lam_n, "seconds": seconds, "value": value, "bound": min(bound, milp_bound),
                     "milp": opt, "optimal": optimal, "milp_s": milp_s})
    return rows


def timing(seeds: int) -> None:
    """Only the time of the cost-weighted path at 100 x 32 (costs 1-3), over many instances: the
    default solver on ``seeds`` x 5 instances (λ·N = 0.1 ... 10), with the unit-cost path's time on
    the same sites as a gauge of how fast the machine is at the moment."""
    times, unit = {lam_n: [] for lam_n in (0.1, 0.3, 1.0, 3.0, 10.0)}, []
    for seed in range(seeds):
        rng = np.random.default_rng(seed + 3)
        for lam_n in times:
            g, b, costs = cost_instance(rng, 100, 32, 24)
            t0 = time.perf_counter()
            select_layers(g, b, lam_n / 100, costs)
            t1 = time.perf_counter()
            select_layers(g, np.minimum(b, 8), lam_n / 100)
            times[lam_n].append(t1 - t0)
            unit.append(time.perf_counter() - t1)
    print(f"100 sites x 32 layers, layer costs 1-3, budgets U[1, 24]: {seeds} instances per λ·N\n")
    print("| λ·N | median ms | max ms |")
    print("|---|---|---|")
    for lam_n, t in times.items():
        print(f"| {lam_n:g} | {1e3 * np.median(t):.0f} | {1e3 * max(t):.0f} |")
    every = [x for t in times.values() for x in t]
    print(f"\nall {len(every)}: max {1e3 * max(every):.0f} ms, {sum(x > 0.5 for x in every)} over 500 ms; "
          f"unit-cost path on the same scores (budgets U[1, 8]): median {1e3 * np.median(unit):.0f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing", type=int, metavar="SEEDS", help="only time the cost-weighted path at 100 x 32 "
                   "on SEEDS x 5 instances (no HiGHS)")
    args = p.parse_args(argv)
    if args.timing:
        timing(args.timing)
        return 0

    rows = gap_table(args.quick, args.seed)
    print("heuristic vs exact DP (relative gap = (opt - heuristic) / |opt|)\n")
    print("| N x K | b_max | layer costs | λ·N | instances | heuristic optimal | mean gap | max gap | exact ms | heuristic ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['b_max']} | {r['costs']} | {r['lam_n']:g} | {r['instances']} | {r['optimal']} | "
              f"{r['mean_gap']:.2e} | {r['max_gap']:.2e} | {r['exact_ms']:.1f} | {r['heur_ms']:.1f} |")
    total = sum(r["instances"] for r in rows)
    optimal = sum(r["optimal"] for r in rows)
    print(f"\nall: {optimal}/{total} optimal, max gap {max(r['max_gap'] for r in rows):.2e}")

    print("\n100 sites x 32 layers, budgets U[1, 8], default solver (auto -> heuristic)\n")
    print("| λ·N | time ms | objective | Lagrangian bound | gap <= | inconsistency | inconsistency at λ=0 | objective of the λ=0 selection |")
    print("|---|---|---|---|---|---|---|---|")
    for r in large_table(args.quick, args.seed):
        print(f"| {r['lam_n']:g} | {1e3 * r['seconds']:.0f} | {r['value']:.2f} | {r['bound']:.2f} | {100 * r['gap_bound']:.2f} % | "
              f"{r['incons']} | {r['incons_lam0']} | {r['value_lam0']:.2f} |")

    print("\nlayer costs 1-3, instances 'auto' gives the heuristic, vs HiGHS' exact optimum (scipy.optimize.milp)\n")
    print("| N x K | b_max | λ·N | instances solved by HiGHS | heuristic optimal | max gap | heuristic ms (max) | HiGHS s (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in mid_cost_table(args.quick, args.seed):
        print(f"| {r['size']} | {r['b_max']} | {r['lam_n']:g} | {r['instances']} (+{r['unsolved']} unsolved in 60 s) | "
              f"{r['optimal']} | {100 * r['max_gap']:.2f} % | {r['heur_ms']:.0f} | {r['milp_s']:.1f} |")

    print("\n100 sites x 32 layers, layer costs 1-3, budgets U[1, 24], default solver\n")
    print("| λ·N | time ms | objective | HiGHS objective | HiGHS proved optimal | best upper bound | gap <= | HiGHS s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in large_cost_table(args.quick, args.seed):
        gap = (r["bound"] - r["value"]) / abs(r["bound"]) if r["bound"] else 0.0
        milp_value = f"{r['milp']:.2f}" if r["milp"] is not None else "none"
        print(f"| {r['lam_n']:g} | {1e3 * r['seconds']:.0f} | {r['value']:.2f} | {milp_value} | {r['optimal']} | "
              f"{r['bound']:.2f} | {100 * gap:.2f} % | {r['milp_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
