"""What every job command does with the recipe it built: export it, or run it where --env says
and report the results.

Bad input (a flag, a site's config, a missing file) prints one ``error:`` line and exits 2,
before anything starts.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from flare_lora.components.cli.environments import make_env
from flare_lora.components.cli.run_record import describe_results, run_config
from flare_lora.components.flare.tracking import add_tracking
from flare_lora.components.optional import MissingExtra
from flare_lora.components.cli.results import (
    check_results_dir,
    collect_results,
    mark_results,
    print_report,
    report_results,
    save_merged,
)
from flare_lora.components.flare.nvflare_compat import export_dir, export_requested


@dataclass
class Job:
    """A built job: its recipe, the sites an environment starts, and the title of its report."""

    recipe: object
    name: str
    sites: dict
    title: str


def run_job(parser, build: Callable[..., Job], argv=None, *, export: bool = False) -> int:
    """Parse, build (``build(args, exporting)``), then export or run; the exit status.

    ``--export [--export-dir DIR]`` on the command line (nvflare takes both out of sys.argv) or
    ``export=True`` writes the job folder for ``nvflare job submit`` instead of running it.
    """
    export = export_requested() or export  # first: the import takes --export out of sys.argv
    args = parser.parse_args(argv)
    local = [flag for flag, given in (("--overwrite", args.overwrite), ("--log-level", args.log_level != "concise")) if given]
    if export and local:
        print(f"error: {local[0]}: applies to a run on this machine, not to an exported job", file=sys.stderr)
        return 2
    try:
        job = build(args, exporting=export)
        add_tracking(job.recipe, args.tracking, job.sites)
        if export:
            job.recipe.export(export_dir())
            print(f"job exported to {os.path.join(export_dir(), job.name)}  (nvflare job submit -j that_dir)")
            return 0
        results = args.results or os.path.join("results", job.name)
        check_results_dir(results, args.overwrite)
        env = make_env(args, job.sites)
        if args.env != "prod":  # the sites' model, data and limits, before anything starts
            job.recipe.check_local_sites(getattr(env, "local_files", {}))
    except (ValueError, FileNotFoundError, MissingExtra) as e:  # ConfigError too: one line naming site and key
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_recipe(job, env, results, args, run_config(job, args, sys.argv if argv is None else [*parser.prog.split(), *argv]))


def run_recipe(job: Job, env, results_dir: str, args, config: dict) -> int:
    """Run the job in ``env``, collect and print its results; 0 on success.

    A failed simulation still leaves the server's metrics.json (with the reason under "error"), so
    the report is written either way.
    """
    from nvflare.recipe import SimEnv

    start = time.monotonic()
    try:
        try:
            run = job.recipe.run(env)
            with contextlib.redirect_stdout(io.StringIO()) if isinstance(env, SimEnv) else contextlib.nullcontext():
                result = run.get_result(clean_up=False)  # SimEnv prints that it keeps no status
            status = None if isinstance(env, SimEnv) else run.get_status()
        except RuntimeError as e:
            if not isinstance(env, SimEnv):  # POC / prod: logs stay in the workspace
                print(f"job {job.name} FAILED: {e}", file=sys.stderr)
                return 1
            result, status = env.get_job_result(job.name), None  # the simulator exited non-zero; its workspace remains
    finally:
        env.stop()
    log = collect_results(result, results_dir, args.overwrite)
    describe_results(results_dir, log, config)
    report = report_results(log, results_dir, job.title)
    if args.save_merged:
        report["merged"] = save_merged(args.model, results_dir, log)
    mark_results(results_dir)
    print_report(report)
    failure = log.get("error") or (None if log.get("final") else "the job ended before its final evaluation")
    took = time.monotonic() - start
    flare_status = f" (FLARE: {status})" if status else ""
    print(f"job {job.name} {'FAILED: ' + failure if failure else 'COMPLETED'}{flare_status} in {int(took // 60)} min "
          f"{took % 60:.0f} s; FLARE's logs: {result}")
    return 1 if failure else 0
