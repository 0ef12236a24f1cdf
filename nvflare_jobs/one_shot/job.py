"""One-shot federated fine-tuning in NVIDIA FLARE: every site trains once, the server folds results in as they arrive.

Each site trains from the pretrained base (LoRA of its own rank, or with --method full every
weight of a small model) and reports once. The server folds each result into the global model on
arrival (FLoRA incremental stacking, or a running average for fedit / full), writes the
intermediate global after every arrival, and finishes when all sites reported or, past
--deadline, as soon as --min-sites are in (still folding late sites for --late-grace seconds).

    python nvflare_jobs/one_shot/job.py                                # 3 sites, ranks 4/8/16, stacking
    python nvflare_jobs/one_shot/job.py --method full                  # full-parameter fine-tuning (lr 5e-5)
    python nvflare_jobs/one_shot/job.py --deadline 600 --min-sites 2 --late-grace 120
    python nvflare_jobs/one_shot/job.py --evaluate-global              # also measure the final model at the sites
    python nvflare_jobs/one_shot/job.py --env poc                      # same job in POC mode
    python nvflare_jobs/one_shot/job.py --export --export-dir /tmp/one_shot_job   # for `nvflare job submit`
"""

import argparse
import os
import sys

from flare_lora.components.flare.job_cli import add_common_args, build_sites, make_env, run_recipe, save_merged_weights, site_recipe_kwargs
from flare_lora.components.flare.one_shot_recipe import OneShotRecipe
from flare_lora.components.strategies import ONE_SHOT_METHODS

FULL_LR = 5e-5  # every weight moves: LoRA's default 5e-4 is too large for full fine-tuning


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_common_args(p)
    p.set_defaults(rounds=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rounds != 1:
        raise SystemExit(f"--rounds: a one-shot job has exactly one round, got {args.rounds}")
    if args.method == "full" and args.lr is None:
        args.lr = FULL_LR
    name = args.name or f"one_shot_{args.method}"
    sites = build_sites(args)
    recipe = OneShotRecipe(
        name=name,
        sites=sites,
        method=args.method,
        min_sites=args.min_sites,
        deadline=args.deadline,
        late_grace=args.late_grace,
        timeout=args.timeout,
        evaluate_global=args.evaluate_global,
        **site_recipe_kwargs(args),
    )
    results = args.results or os.path.join("results", name)
    what = "full-parameter" if args.method == "full" else f"ranks {args.ranks}"
    rc = run_recipe(recipe, make_env(args, sites), name, results, f"{name}: {what}", args.model,
                    args.save_merged and args.method != "full")
    if args.method == "full" and args.save_merged:
        save_merged_weights(args.model, results, "global.safetensors")
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # config errors: one line naming site and key
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
