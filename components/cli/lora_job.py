"""The multi-round LoRA job (LoraRecipe): FLoRA stacking (exact or bounded), nested shared-A, FedIT,
zero-padding, hlora or FedCDD.

    flare-lora run flora                                  # 3 sites, ranks 4/8/16, FLoRA, simulator
    flare-lora run flora --method fedit --ranks 8,8,8     # FedIT baseline
    flare-lora run flora --env poc                        # same job in an isolated POC
    flare-lora run fedcdd --mask-rho 0.5                  # FedCDD (3 sites of rank 8) + noise mask (not DP)
    flare-lora export flora --export-dir /tmp/flora_job   # then: nvflare job submit -j /tmp/flora_job/flora

(``python nvflare_jobs/flora/job.py`` and ``nvflare_jobs/fedcdd/job.py`` are the same commands.)
"""

from __future__ import annotations

import argparse

from flare_lora.components.cli.common_args import add_common_args, job_parser
from flare_lora.components.cli.recipe_args import build_sites, int_list, ranks, recipe_kwargs
from flare_lora.components.cli.runner import Job

DEMO_RANKS = ("4,8,16", "8,8,8")  # without --sites / --ranks; FedCDD (factors) needs equal ranks
FEDCDD_KEYS = ("variant", "temperature", "weighting", "similarity", "axis", "target", "shrink")
GLOBAL_RANK_METHODS = {"rank": ("flora", "hlora"), "energy": ("flora",)}  # --global-* -> the methods taking it
MASK_KEYS = ("sigma", "mode", "importance")  # besides rho, which switches the mask on


def parser(prog: str | None = None, **defaults) -> argparse.ArgumentParser:
    from flare_lora.components.strategies import METHODS

    p = job_parser(__doc__, prog)
    p.add_argument("--method", choices=METHODS, default="flora")
    p.add_argument("--name", default=None, help="job name (default: the method)")
    add_common_args(p)
    add_fedcdd_args(p)
    p.set_defaults(**defaults)
    return p


def add_fedcdd_args(p: argparse.ArgumentParser) -> None:
    """The global's rank (bounded FLoRA, hlora), FedCDD server options and the site-side noise mask
    (docs/fedcdd.md); all default to off/unset."""
    g = p.add_argument_group("global rank (--method flora: a bounded global; --method hlora: its rank)")
    g.add_argument("--global-rank", type=int, default=None,
                   help="flora: re-project the global to this rank every round (default: exact, unbounded); "
                        "hlora: the global rank (default: the largest site rank)")
    g.add_argument("--global-energy", type=float, default=None,
                   help="flora: keep the smallest rank holding this share of the global's energy, in (0, 1]")
    g = p.add_argument_group("fedcdd (method options, --method fedcdd only)")
    g.add_argument("--fedcdd-variant", choices=["full", "consensus", "divergence"], default=None,
                   help="ablation: full (default), consensus magnitude only, divergence direction only")
    g.add_argument("--fedcdd-temperature", type=float, default=None, help="similarity temperature (default 0.1)")
    g.add_argument("--fedcdd-weighting", choices=["uniform", "data"], default=None, help="site prior (default uniform)")
    g.add_argument("--fedcdd-similarity", choices=["uniqueness", "agreement", "none"], default=None,
                   help="direction weights (default uniqueness: duplicate sites count once)")
    g.add_argument("--fedcdd-axis", choices=["column", "row"], default=None, help="decompose columns (default) or rows")
    g.add_argument("--fedcdd-shrink", choices=["cancellation", "agreement", "none"], default=None,
                   help="shrink the consensus magnitude where directions cancel (default), by agreement, or never")
    g.add_argument("--fedcdd-target", choices=["factors", "delta"], default=None,
                   help="A and B separately (default) or dW = s B A re-factorised by SVD (heterogeneous ranks)")
    g = p.add_argument_group("noise mask (site side, any method; NOT differential privacy)")
    g.add_argument("--mask-rho", type=float, default=None,
                   help="keep this fraction of each tensor's entries, in (0, 1]")
    g.add_argument("--mask-sigma", type=float, default=None,
                   help="std of the Gaussian noise, in parameter units (default 0.001)")
    g.add_argument("--mask-mode", choices=["replace", "perturb"], default=None, help="default replace")
    g.add_argument("--mask-importance", choices=["entry", "column"], default=None,
                   help="|value| (default) or column L2 norm")


def fedcdd_kwargs(args) -> dict:
    """LoraRecipe's method_options and mask arguments from add_fedcdd_args' flags (only those given)."""
    options = {key: getattr(args, "fedcdd_" + key) for key in FEDCDD_KEYS if getattr(args, "fedcdd_" + key) is not None}
    if options and args.method != "fedcdd":
        raise ValueError(f"--fedcdd-{next(iter(options))}: only valid with --method fedcdd, got --method {args.method}")
    bound = {key: getattr(args, "global_" + key) for key in ("rank", "energy") if getattr(args, "global_" + key) is not None}
    for key in bound:
        if args.method not in GLOBAL_RANK_METHODS[key]:
            raise ValueError(f"--global-{key}: only valid with --method {' or '.join(GLOBAL_RANK_METHODS[key])}, "
                             f"got --method {args.method}")
    options.update(bound)
    kwargs = {"method_options": options or None}
    mask = {key: getattr(args, "mask_" + key) for key in MASK_KEYS if getattr(args, "mask_" + key) is not None}
    if args.mask_rho is None:
        if mask:
            raise ValueError(f"--mask-{next(iter(mask))}: needs --mask-rho (the fraction of entries kept)")
        return kwargs
    return {**kwargs, "mask_rho": args.mask_rho, **{"mask_" + key: value for key, value in mask.items()}}


def build(args, exporting: bool) -> Job:
    from flare_lora.components.flare.recipe import LoraRecipe

    name = args.name or args.method
    sites, shared = build_sites(args, exporting, rank=("--ranks", int_list("--ranks", ranks(args, DEMO_RANKS[args.method == "fedcdd"]))))
    recipe = LoraRecipe(name=name, method=args.method, sites=sites, site_defaults=shared, num_rounds=args.rounds,
                        min_clients=args.min_clients, clients_per_round=args.clients_per_round,
                        **recipe_kwargs(args, exporting), **fedcdd_kwargs(args))
    return Job(recipe, name, recipe.sites, f"{name}: ranks {[c['rank'] for c in recipe.sites.values()]}")
