"""Selective-layer federated fine-tuning (SelectiveRecipe): each site trains only some decoder layers.

Every round (or every --sel-gap rounds) each site scores its layers by squared gradient norm on a
few local batches and reports its layer budget; the server picks each site's layers by solving
max Σ m·G − λ Σ_l c_l (N − c_l) under the budgets (or by a baseline: --selection full, top,
bottom, random, rgn, snr); sites train those layers (their LoRA factors, or with --mode full their
weights) and upload only them; the server averages each layer over the sites that trained it.
--budgets sets the number of sites; every site has LoRA rank --rank.

    flare-lora run selective                               # 3 sites, budgets 2/4/8, simulator
    flare-lora run selective --selection top               # baseline at the same budgets
    flare-lora run selective --mode full --lam 0.3         # full layer weights
    flare-lora export selective --export-dir /tmp/sel_job  # for `nvflare job submit`

(``python nvflare_jobs/selective_layer/job.py`` is the same command.)
"""

from __future__ import annotations

import argparse

from flare_lora.components.cli.common_args import add_common_args, job_parser
from flare_lora.components.cli.recipe_args import build_sites, int_list, recipe_kwargs
from flare_lora.components.cli.runner import Job

LAM = 0.1
DEMO_BUDGETS = "2,4,8"


def parser(prog: str | None = None, **defaults) -> argparse.ArgumentParser:
    from flare_lora.components.algorithms.layer_selection import CRITERIA

    p = job_parser(__doc__, prog)
    g = p.add_argument_group("selective layers")
    g.add_argument("--budgets", default=None,
                   help="layers each site trains per round, one per site of --sites (or one for all); without "
                        f"--sites the count sets the number of sites (default {DEMO_BUDGETS}; with --sites: "
                        "every layer). A site's admin can lower its own with max_layers in local/flare_lora.json")
    g.add_argument("--selection", choices=CRITERIA, default="selective")
    g.add_argument("--mode", choices=["lora", "full"], default="lora",
                   help="train the chosen layers' LoRA factors (FedIT-averaged per layer) or their full weights")
    g.add_argument("--lam", type=float, default=None, help="consistency weight λ >= 0 (default 0.1; --selection selective only)")
    g.add_argument("--sel-gap", type=int, default=1, help="re-select layers every N rounds")
    g.add_argument("--score-batches", type=int, default=2, help="local batches per layer-score measurement")
    g.add_argument("--costs", default=None, help="comma-separated integer cost per layer (budgets in these units)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank at every site (lora mode)")
    g.add_argument("--name", default=None, help="job name (default: selective_<selection>)")
    add_common_args(p, ranks=False)
    p.set_defaults(**defaults)
    return p


def build(args, exporting: bool) -> Job:
    """Sites from --sites / --budgets (a --site-config "budget" wins over it)."""
    from flare_lora.components.flare.selective_recipe import SelectiveRecipe

    if args.lam is not None and args.selection != "selective":
        raise ValueError(f"--lam: weighs the selective solver's consistency term; --selection {args.selection} has none")
    lam = LAM if args.lam is None else args.lam
    budgets = args.budgets if args.budgets is not None or args.sites is not None else DEMO_BUDGETS
    sites, shared = build_sites(args, exporting, budget=("--budgets", int_list("--budgets", budgets)),
                                rank=("--rank", [args.rank]))
    name = args.name or f"selective_{args.selection}"
    recipe = SelectiveRecipe(
        name=name, sites=sites, site_defaults=shared, selection=args.selection, mode=args.mode, lam=lam, sel_gap=args.sel_gap,
        score_batches=args.score_batches, num_rounds=args.rounds, min_clients=args.min_clients,
        clients_per_round=args.clients_per_round, costs=int_list("--costs", args.costs) if args.costs else None,
        **recipe_kwargs(args, exporting),
    )
    return Job(recipe, name, recipe.sites, f"{name}: mode {args.mode}, budgets {list(recipe.budgets.values())}, λ={lam}")
