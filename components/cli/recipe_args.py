"""The shared options (common_args.py) as recipe arguments: the sites and what every recipe takes.

Every recipe (LoraRecipe, OneShotRecipe, SelectiveRecipe) accepts the same keyword arguments for
these, so a job passes all of them and the recipe refuses what it cannot do (e.g. a one-shot
job's checkpoint_dir): no option is accepted and then ignored.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from flare_lora.components.training.config import SiteConfig
from flare_lora.privacy.dp_config import client_dp_options, dp_site_settings

DEFAULT_RESTARTS = 3


def int_list(option: str, text: str | None) -> list[int] | None:
    """Comma-separated integers of ``option`` (e.g. --ranks 4,8,16); None when not given."""
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None


def build_sites(args, exporting: bool, **per_site: tuple[str, list | None]) -> tuple[dict[str, dict], dict]:
    """(each site's own config, the config every site shares) from the flags.

    Sites: ``--sites a,b,c``, or site-1..N with N the length of the first per-site list given
    (``per_site``: {config key: (option, values)}, e.g. rank=("--ranks", [4, 8, 16])). A per-site
    list has one value per site, in order (or one value for all); --site-config then overrides
    per site and may name only the job's sites. alpha is --alpha-ratio × each site's final rank
    unless a site sets its own.
    """
    given = {key: (option, values) for key, (option, values) in per_site.items() if values is not None}
    from flare_lora.components.flare.recipe_base import check_site_names

    if args.sites is not None:
        names = [n.strip() for n in args.sites.split(",")]
        if not all(names):
            raise ValueError(f"--sites: expected comma-separated site names, got {args.sites!r}")
    else:
        count = len(next(iter(given.values()))[1]) if given else 0
        names = [f"site-{i + 1}" for i in range(count)]
    check_site_names(names, "--sites")
    own: dict[str, dict] = {name: {} for name in names}
    for key, (option, values) in given.items():
        if len(values) not in (1, len(names)):
            raise ValueError(f"{option}: expected {len(names)} values (one per site of {names}) or one for all, "
                             f"got {len(values)}: {values}")
        for i, name in enumerate(names):
            own[name][key] = values[i if len(values) > 1 else 0]
    for site, cfg in site_config_file(args.site_config, names).items():
        own[site].update(cfg)
    for site, cfg in own.items():
        cfg.setdefault("alpha", args.alpha_ratio * cfg.get("rank", SiteConfig.rank))
    here = args.env != "prod" and not exporting  # on machines of their own, a site decides its threads
    threads = args.threads or (max(1, (os.cpu_count() or 1) // len(names)) if here else None)
    shared = {"seed": args.seed, "target_modules": [m for m in args.target_modules.split(",") if m]}
    for key, value in (("threads", threads), ("local_steps", args.steps), ("lr", args.lr),
                       ("batch_size", args.batch_size), ("dtype", args.dtype),
                       ("gradient_checkpointing", args.gradient_checkpointing or None), ("eval_mc", args.eval),
                       ("eval_mc_shots", args.eval_shots), ("eval_mc_limit", args.eval_limit),
                       ("eval_mc_style", args.eval_style)):
        if value is not None:
            shared[key] = value
    shared.update(dp_site_settings(args))
    return own, shared


def site_config_file(path: str | None, names: list[str]) -> dict[str, dict]:
    """--site-config: {site: {key: value}} for sites of the job only."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--site-config: {path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise ValueError(f"--site-config: {e}") from None
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"--site-config: {path}: expected {{site: {{key: value}}}}, got {overrides!r}")
    for site in overrides:
        if site not in names:
            raise ValueError(f"--site-config: {path}: site {site!r} is not a site of this job; its sites are {names} "
                             "(name them with --sites)")
    return overrides


def recipe_kwargs(args, exporting: bool) -> dict:
    """What every recipe takes from the shared flags: model, data, seed, how sites run, the
    production options and the privacy options (client-level DP, HE)."""
    if args.in_process and args.max_trainer_restarts is not None:
        raise ValueError("--max-trainer-restarts: restarts a site's training process; --in-process has none")
    return dict(
        model=args.model, data=args.data, seed=args.seed, launch_external_process=not args.in_process,
        command=site_command(args, exporting), site_scripts=site_scripts(args),
        max_trainer_restarts=DEFAULT_RESTARTS if args.max_trainer_restarts is None else args.max_trainer_restarts,
        checkpoint_dir=args.checkpoint_dir, max_result_bytes=int(args.max_result_mb * 1e6),
        task_timeout=args.task_timeout, byoc=not args.no_byoc, max_update_norm=args.max_update_norm,
        model_config=args.model_config, **({} if args.max_examples is None else {"max_examples": args.max_examples}),
        client_dp=client_dp_options(args), **he_kwargs(args, exporting),
    )


def site_command(args, exporting: bool) -> str:
    """How a site starts its training process. Run here (simulator, POC), with the interpreter
    that builds the job, so a venv need not be on PATH; exported and prod jobs run on machines
    of their own, with --site-python. ``--ddp N``: N processes via torch.distributed.run
    (torchrun's module, so that too uses the chosen interpreter)."""
    here = args.env != "prod" and not exporting
    if args.site_python and (here or args.in_process):
        where = "--in-process trains in the FLARE client process" if args.in_process else \
            f"simulator and POC sites run {sys.executable}"
        raise ValueError(f"--site-python: only for an external training process of --env prod or --export jobs ({where})")
    if args.ddp < 1 or (args.ddp > 1 and args.in_process):
        raise ValueError(f"--ddp: expected an integer >= 1 (> 1 needs an external process), got {args.ddp}")
    python = shlex.quote(sys.executable) if here else args.site_python or "python3"
    if args.ddp > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={args.ddp}"
    return f"{python} -u"


def site_scripts(args) -> dict[str, str]:
    scripts = {}
    for item in args.site_script:
        site, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise ValueError(f"--site-script: expected SITE=PATH to an existing file, got {item!r}")
        scripts[site] = os.path.abspath(path)
    return scripts


def he_kwargs(args, exporting: bool) -> dict:
    """--he: a simulator run gets contexts made into its workspace (test-only: the secret key sits
    beside the server); POC, prod and exported jobs use the startup kits'."""
    if not args.he:
        return {"he": False}
    if args.env != "sim" or exporting:
        return {"he": True}
    from flare_lora.privacy.he_context import provision_sim_contexts

    if not args.workspace:  # the run's workspace, which make_env then uses too
        from flare_lora.components.cli.environments import run_workspace

        args.workspace = run_workspace(args.env)
    folder = os.path.join(os.path.abspath(args.workspace), "he_contexts")
    return {"he": True, "he_context_dir": provision_sim_contexts(folder)}


def ranks(args, demo: str = "4,8,16") -> str | None:
    """--ranks, defaulting to the 3-site demo ranks when --sites does not name the sites."""
    return args.ranks if args.ranks is not None or args.sites is not None else demo
