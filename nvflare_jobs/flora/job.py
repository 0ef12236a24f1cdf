"""Federated LoRA fine-tuning with FLoRA stacking (or --method fedit / zero_pad) in NVIDIA FLARE.

    python nvflare_jobs/flora/job.py                       # 3 sites, ranks 4/8/16, simulator
    python nvflare_jobs/flora/job.py --env poc             # same job in POC mode
    python nvflare_jobs/flora/job.py --export --export-dir /tmp/flora_job   # then: nvflare job submit -j /tmp/flora_job/flora
"""

import argparse
import os
import sys

from components.flare.job_cli import add_common_args, build_sites, make_env, run_recipe, site_scripts
from components.flare.recipe import LoraRecipe
from components.methods import METHODS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="flora")
    p.add_argument("--name", default=None, help="job name (default: the method)")
    add_common_args(p)
    args = p.parse_args()
    name = args.name or args.method
    sites = build_sites(args)
    recipe = LoraRecipe(
        name=name,
        method=args.method,
        sites=sites,
        num_rounds=args.rounds,
        min_clients=args.min_clients,
        clients_per_round=args.clients_per_round,
        model=args.model,
        data=args.data,
        seed=args.seed,
        launch_external_process=not args.in_process,
        site_scripts=site_scripts(args),
    )
    results = args.results or os.path.join("results", name)
    title = f"{name}: ranks {args.ranks}"
    return run_recipe(recipe, make_env(args, sites), name, results, title, args.model, args.save_merged)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # config errors: one line naming site and key
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
