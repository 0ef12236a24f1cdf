"""Selective-layer federated fine-tuning in NVIDIA FLARE: each site trains only some decoder layers.

Every round (or every --sel-gap rounds) each site scores its layers by squared gradient norm on a
few local batches and reports its layer budget; the server picks each site's layers by solving
max Σ m·G − λ Σ_l c_l (N − c_l) under the budgets (or by a baseline: --selection full, top,
bottom, random, rgn, snr); sites train those layers (their LoRA factors, or with --mode full their
weights) and upload only them; the server averages each layer over the sites that trained it.

    python nvflare_jobs/selective_layer/job.py                         # 3 sites, budgets 2/4/8, simulator
    python nvflare_jobs/selective_layer/job.py --selection top         # baseline at the same budgets
    python nvflare_jobs/selective_layer/job.py --mode full --lam 0.3   # full layer weights
    python nvflare_jobs/selective_layer/job.py --env poc               # same job in POC mode
    python nvflare_jobs/selective_layer/job.py --export --export-dir /tmp/sel_job   # for `nvflare job submit`
"""

import argparse
import json
import os
import sys

from flare_lora.components.algorithms.layer_selection import CRITERIA
from flare_lora.components.flare.job_cli import add_common_args, build_sites, make_env, run_recipe, save_merged_weights, site_recipe_kwargs
from flare_lora.components.flare.selective_recipe import SelectiveRecipe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("selective layers")
    g.add_argument("--budgets", default="2,4,8",
                   help="layers each site trains per round; the count sets the number of sites (a site's "
                        "admin can lower its own with FLARE_LORA_MAX_LAYERS[_<SITE>])")
    g.add_argument("--selection", choices=CRITERIA, default="selective")
    g.add_argument("--mode", choices=["lora", "full"], default="lora",
                   help="train the chosen layers' LoRA factors (FedIT-averaged per layer) or their full weights")
    g.add_argument("--lam", type=float, default=0.1, help="consistency weight λ >= 0 (selective only)")
    g.add_argument("--sel-gap", type=int, default=1, help="re-select layers every N rounds")
    g.add_argument("--score-batches", type=int, default=2, help="local batches per layer-score measurement")
    g.add_argument("--costs", default=None, help="comma-separated integer cost per layer (budgets in these units)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank at every site (lora mode)")
    g.add_argument("--name", default=None, help="job name (default: selective_<selection>)")
    add_common_args(p)
    p.set_defaults(ranks=None)
    return p.parse_args(argv)


def build_selective_sites(args) -> dict[str, dict]:
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--budgets: expected comma-separated integers, got {args.budgets!r}")
    if args.ranks is None:
        args.ranks = ",".join([str(args.rank)] * len(budgets))
    sites = build_sites(args)
    for (site, cfg), budget in zip(sites.items(), budgets):
        cfg.setdefault("budget", budget)
    if args.site_config:  # an override file may set "budget" too; it wins
        with open(args.site_config) as f:
            for site, cfg in json.load(f).items():
                if "budget" in cfg:
                    sites[site]["budget"] = cfg["budget"]
    return sites


def print_selections(results_dir: str) -> None:
    path = os.path.join(results_dir, "metrics.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        log = json.load(f)
    k = log.get("num_layers") or 0
    lam = f", λ={log.get('lam')}" if log.get("selection") == "selective" else ""
    print(f"\nlayer selections ({log.get('selection')}, mode {log.get('mode')}{lam}, K={k}):")
    for sel in log.get("selections", []):
        print(f"  round {sel['round']}: inconsistency {sel['inconsistency']}, objective {sel['objective']:.3f}, "
              f"solver {sel['solver']} {sel['seconds'] * 1e3:.1f} ms")
        for site in sel["sites"]:
            layers = set(sel["layers"][site])
            bar = "".join("#" if l in layers else "." for l in range(k))
            print(f"    {site:<10} b={sel['budgets'][site]:<3} {bar}  {sorted(layers)}  "
                  f"captured {sel['captured'][site]:.2f}")
    for record in log.get("rounds", []):
        for site, entry in sorted(record["sites"].items()):
            if entry.get("rejected") or entry.get("score_rejected"):
                print(f"  round {record['round']}: rejected {site}: {entry.get('rejected') or entry.get('score_rejected')}")


def main(argv=None) -> int:
    args = parse_args(argv)
    name = args.name or f"selective_{args.selection}"
    sites = build_selective_sites(args)
    costs = None
    if args.costs:
        try:
            costs = [int(c) for c in args.costs.split(",") if c.strip()]
        except ValueError:
            raise SystemExit(f"--costs: expected comma-separated integers, got {args.costs!r}")
    recipe = SelectiveRecipe(
        name=name,
        sites=sites,
        selection=args.selection,
        mode=args.mode,
        lam=args.lam,
        sel_gap=args.sel_gap,
        score_batches=args.score_batches,
        num_rounds=args.rounds,
        min_clients=args.min_clients,
        clients_per_round=args.clients_per_round,
        costs=costs,
        **site_recipe_kwargs(args),
    )
    results = args.results or os.path.join("results", name)
    title = f"{name}: mode {args.mode}, budgets {args.budgets}, λ={args.lam}"
    save_merged = args.save_merged and args.mode == "lora"
    rc = run_recipe(recipe, make_env(args, sites), name, results, title, args.model, save_merged)
    print_selections(results)
    if args.save_merged and args.mode == "full":  # the base with the trained layers replaced
        save_merged_weights(args.model, results, "layers.safetensors")
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # config errors: one line naming site and key
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
