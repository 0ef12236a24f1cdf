"""``flare-lora``: run or export a job, report its results, and the site and provisioning tools.

    flare-lora run JOB [options]          run JOB (flora, fedcdd, one-shot, selective) with --env sim|poc|prod
    flare-lora export JOB [options]       write JOB's folder for `nvflare job submit` (--export-dir DIR, default ./fl_job)
    flare-lora report RESULTS_DIR         print a job's table, write curves.png and tensorboard/ from metrics.json
    flare-lora eval [RESULTS_DIR] --mc P  multiple-choice accuracy (MMLU, log-likelihood) of the base or a job's model
    flare-lora site-policy KIT_DIR ...    let a site run jobs without code (class allow-list, deny byoc)
    flare-lora provision --sites A,B ...  a project.yml for `nvflare provision` from the shipped template
    flare-lora split DATA --out DIR ...   split one dataset into per-site JSONL files

`flare-lora COMMAND --help` (`flare-lora run JOB --help`) lists each one's options.
"""

from __future__ import annotations

import importlib
import sys

from flare_lora.components.flare.nvflare_compat import export_requested

# job name -> (module in this package, its parser defaults); nvflare_jobs/<folder>/job.py run the same
JOBS = {
    "flora": ("lora_job", {}),
    "fedcdd": ("lora_job", {"method": "fedcdd"}),
    "one-shot": ("one_shot_job", {}),
    "selective": ("selective_job", {}),
}
TOOLS = {  # command -> module:function(argv) -> exit status
    "report": "flare_lora.components.cli.results:report_main",
    "eval": "flare_lora.components.cli.evaluate:main",
    "site-policy": "flare_lora.components.flare.site_policy:main",
    "provision": "flare_lora.components.flare.provision:main",
    "split": "flare_lora.components.data.split:main",
}


def job_main(job: str, argv=None, *, export: bool = False, prog: str | None = None) -> int:
    """Run (or export) ``job`` with command-line options ``argv`` (default: sys.argv[1:])."""
    from flare_lora.components.cli.runner import run_job

    name, defaults = JOBS[job]
    module = importlib.import_module(f"flare_lora.components.cli.{name}")
    return run_job(module.parser(prog, **defaults), module.build, argv, export=export)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] in (["run"], ["export"]):
        export_requested()  # before reading sys.argv: nvflare takes --export / --export-dir out of it on import
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command in ("-h", "--help"):
        print(__doc__)
        return 0
    if command in ("run", "export"):
        if rest[:1] in (["-h"], ["--help"]):
            print(f"usage: flare-lora {command} JOB [options]; JOB: {', '.join(JOBS)}")
            return 0
        if not rest or rest[0] not in JOBS:
            return usage_error(f"{command}: expected a job, one of {', '.join(JOBS)}; got {rest[0] if rest else 'none'}")
        return job_main(rest[0], rest[1:], export=command == "export", prog=f"flare-lora {command} {rest[0]}")
    if command in TOOLS:
        module, function = TOOLS[command].split(":")
        return getattr(importlib.import_module(module), function)(rest)
    return usage_error(f"expected a command, one of run, export, {', '.join(TOOLS)}; got {command or 'none'}")


def usage_error(message: str) -> int:
    print(f"usage: flare-lora COMMAND ... (flare-lora --help)\nerror: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
