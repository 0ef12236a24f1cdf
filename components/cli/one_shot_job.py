"""One-shot federated fine-tuning (OneShotRecipe): every site trains once, the server folds results in as they arrive.

Each site trains from the pretrained base (LoRA of its own rank, or with --method full every
weight of a small model) and reports once. The server folds each result into the global model on
arrival (FLoRA incremental stacking, or a running average for fedit / full), writes the
intermediate global after every arrival, and finishes when all sites reported or, past
--deadline, as soon as --min-sites are in (still folding late sites for --late-grace seconds).
One round: no --rounds, --min-clients or --clients-per-round.

    flare-lora run one-shot                                # 3 sites, ranks 4/8/16, stacking
    flare-lora run one-shot --method full                  # full-parameter fine-tuning (lr 5e-5)
    flare-lora run one-shot --deadline 600 --min-sites 2 --late-grace 120
    flare-lora run one-shot --evaluate-global              # also measure the final model at the sites
    flare-lora export one-shot --export-dir /tmp/one_shot_job   # for `nvflare job submit`

(``python nvflare_jobs/one_shot/job.py`` is the same command.)
"""

from __future__ import annotations

import argparse

from flare_lora.components.cli.common_args import add_common_args, job_parser
from flare_lora.components.cli.recipe_args import build_sites, int_list, ranks, recipe_kwargs
from flare_lora.components.cli.runner import Job

FULL_LR = 5e-5  # every weight moves: LoRA's default 5e-4 is too large for full fine-tuning


def parser(prog: str | None = None, **defaults) -> argparse.ArgumentParser:
    from flare_lora.components.strategies import ONE_SHOT_METHODS

    p = job_parser(__doc__, prog)
    g = p.add_argument_group("one-shot")
    g.add_argument("--method", choices=ONE_SHOT_METHODS, default="flora",
                   help="flora: LoRA, stacked (ranks may differ); fedit: LoRA, averaged; full: all weights, averaged")
    g.add_argument("--min-sites", type=int, default=None, help="fewest results to finish with at the deadline (default: all)")
    g.add_argument("--deadline", type=float, default=3600.0, help="seconds; past it, finish once --min-sites reported")
    g.add_argument("--late-grace", type=float, default=0.0, help="seconds to keep folding late results after that")
    g.add_argument("--timeout", type=float, default=None, help="give up waiting for --min-sites (default 3 x deadline)")
    g.add_argument("--evaluate-global", action="store_true",
                   help="send the final global to the sites it holds, for evaluation (a measurement, not part of the protocol)")
    g.add_argument("--name", default=None, help="job name (default: one_shot_<method>)")
    add_common_args(p, rounds=False)
    p.set_defaults(**defaults)
    return p


def build(args, exporting: bool) -> Job:
    from flare_lora.components.flare.one_shot_recipe import OneShotRecipe

    if args.method == "full" and args.lr is None:
        args.lr = FULL_LR
    name = args.name or f"one_shot_{args.method}"
    sites, shared = build_sites(args, exporting, rank=("--ranks", int_list("--ranks", ranks(args))))
    recipe = OneShotRecipe(name=name, sites=sites, site_defaults=shared, method=args.method, min_sites=args.min_sites,
                           deadline=args.deadline, late_grace=args.late_grace, timeout=args.timeout,
                           evaluate_global=args.evaluate_global, **recipe_kwargs(args, exporting))
    what = "full-parameter" if args.method == "full" else f"ranks {[c['rank'] for c in recipe.sites.values()]}"
    return Job(recipe, name, recipe.sites, f"{name}: {what}")
