"""Command-line plumbing shared by the jobs in nvflare_jobs/: sites, environments, results.

A job script builds its Recipe from these arguments, runs it with ``Recipe.execute`` (which also
handles ``--export --export-dir X`` for ``nvflare job submit``), then collects the server's
results into ``--results`` and prints the per-round table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from flare_lora.components.report import comm_totals, load_metrics, write_report
from flare_lora.components.training.config import DTYPES
from flare_lora.privacy.dp_config import add_dp_args, client_dp_options, dp_site_settings

METRICS_GLOB = os.path.join("**", "flare_lora", "metrics.json")


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sites")
    g.add_argument("--ranks", default="4,8,16", help="LoRA rank per site; the count sets the number of sites")
    g.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha = ratio * rank at every site")
    g.add_argument("--target-modules", default="q_proj,v_proj")
    g.add_argument("--steps", type=int, default=None, help="local optimizer steps per round")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--threads", type=int, default=None, help="torch threads per site (default: cores / sites)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the base model's dtype at every site (default float32; LoRA factors stay float32)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more compute (not with DP-SGD)")
    g.add_argument("--site-config", default=None, help="JSON file {site: {key: value}} overriding the above")
    g = p.add_argument_group("job")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--min-clients", type=int, default=None)
    g.add_argument("--clients-per-round", type=int, default=None, help="partial participation")
    g.add_argument("--model", default=None, help="local model dir (safetensors or GGUF); default: embedded SmolLM2")
    g.add_argument("--data", default=None, help="dir with <site>.jsonl per site; default: embedded tasks")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--in-process", action="store_true", help="run site training inside the FLARE client process")
    g.add_argument("--max-trainer-restarts", type=int, default=3, metavar="N",
                   help="times per job a site starts a new training process after the last one died (0: never)")
    g.add_argument(
        "--site-script",
        action="append",
        default=[],
        metavar="SITE=PATH",
        help="a site's own training script speaking the same protocol (repeatable)",
    )
    g = p.add_argument_group("environment")
    g.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    g.add_argument("--workspace", default=None, help="simulator / POC workspace (default /tmp/flare_lora/<env>)")
    g.add_argument("--startup-kit", default=None, help="admin startup kit (prod)")
    g.add_argument("--site-local", action="append", default=[], metavar="SITE=PATH",
                   help="POC: copy PATH into SITE's local/ folder, as its admin would (e.g. a privacy.json scope)")
    g.add_argument("--results", default=None, help="where to copy results (default: ./results/<job name>)")
    g.add_argument("--save-merged", action="store_true", help="also write base+adapter merged as an HF model dir")
    add_dp_args(p)
    g = p.add_argument_group("homomorphic encryption (docs/he.md)")
    g.add_argument("--he", action="store_true",
                   help="aggregate CKKS ciphertexts: the server never sees an update or the global model "
                        "(keys: the startup kits' HEBuilder contexts; the simulator makes test-only ones)")


def he_recipe_kwargs(args) -> dict:
    """Recipe keyword arguments for --he: a simulator run gets contexts made into its workspace
    (test-only: the secret key sits beside the server); POC, prod and exported jobs use the kits'."""
    if not args.he:
        return {}
    from flare_lora.components.flare.nvflare_compat import export_requested

    if args.env != "sim" or export_requested():
        return {"he": True}
    from flare_lora.privacy.he_context import provision_sim_contexts

    folder = os.path.join(os.path.abspath(args.workspace or "/tmp/flare_lora/sim"), "he_contexts")
    return {"he": True, "he_context_dir": provision_sim_contexts(folder)}


def add_fedcdd_args(p: argparse.ArgumentParser) -> None:
    """FedCDD server options and the site-side noise mask (docs/fedcdd.md); all default to off/unset."""
    g = p.add_argument_group("fedcdd (method options, --method fedcdd only)")
    g.add_argument("--fedcdd-variant", choices=["full", "consensus", "divergence"], default=None,
                   help="ablation: full (default), consensus magnitude only, divergence direction only")
    g.add_argument("--fedcdd-temperature", type=float, default=None, help="similarity temperature (default 0.1)")
    g.add_argument("--fedcdd-weighting", choices=["uniform", "data"], default=None, help="site prior (default uniform)")
    g.add_argument("--fedcdd-similarity", choices=["uniqueness", "agreement", "none"], default=None,
                   help="direction weights (default uniqueness: duplicate sites count once)")
    g.add_argument("--fedcdd-axis", choices=["column", "row"], default=None, help="decompose columns (default) or rows")
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


def add_production_args(p: argparse.ArgumentParser) -> None:
    """Deployment options of LoraRecipe jobs (docs/production.md); the defaults change nothing."""
    g = p.add_argument_group("production (docs/production.md)")
    g.add_argument("--checkpoint-dir", default="",
                   help="server path (relative: under the server workspace) for a per-round checkpoint; "
                        "a job started on a checkpoint of the same job resumes after its last round")
    g.add_argument("--max-result-mb", type=float, default=0.0,
                   help="reject a site result larger than this many MB (0: no cap)")
    g.add_argument("--task-timeout", type=int, default=0,
                   help="seconds a round waits for a live site (0: until it answers or FLARE declares it dead)")
    g.add_argument("--ddp", type=int, default=1, metavar="N",
                   help="N training processes per site (torchrun + DDP; one per GPU)")
    g.add_argument("--no-byoc", action="store_true",
                   help="job without code: sites run their pip-installed flare-lora and allow its classes")


def production_recipe_kwargs(args) -> dict:
    """LoraRecipe keyword arguments from add_production_args' flags."""
    if args.ddp < 1 or (args.ddp > 1 and args.in_process):
        raise SystemExit(f"--ddp: expected an integer >= 1 (> 1 needs an external process), got {args.ddp}")
    kwargs = {"checkpoint_dir": args.checkpoint_dir, "max_result_bytes": int(args.max_result_mb * 1e6),
              "task_timeout": args.task_timeout, "byoc": not args.no_byoc}
    if args.ddp > 1:
        kwargs["command"] = f"torchrun --standalone --nproc_per_node={args.ddp}"
    return kwargs


def fedcdd_recipe_kwargs(args) -> dict:
    """LoraRecipe keyword arguments from add_fedcdd_args' flags (only those given)."""
    options = {
        key: getattr(args, "fedcdd_" + key)
        for key in ("variant", "temperature", "weighting", "similarity", "axis", "target")
        if getattr(args, "fedcdd_" + key) is not None
    }
    if options and args.method != "fedcdd":
        raise SystemExit(f"--fedcdd-{next(iter(options))}: only valid with --method fedcdd, got --method {args.method}")
    kwargs = {"method_options": options or None}
    mask = {key: getattr(args, "mask_" + key) for key in ("sigma", "mode", "importance")}
    if args.mask_rho is None:
        given = [key for key, value in mask.items() if value is not None]
        if given:
            raise SystemExit(f"--mask-{given[0]}: needs --mask-rho (the fraction of entries kept)")
        return kwargs
    kwargs["mask_rho"] = args.mask_rho
    kwargs.update({"mask_" + key: value for key, value in mask.items() if value is not None})
    return kwargs


def build_sites(args) -> dict[str, dict]:
    """{site-1: {rank, alpha, ...}, ...} from --ranks and the shared flags, then --site-config."""
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--ranks: expected comma-separated integers, got {args.ranks!r}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, len(ranks)))
    sites = {}
    for i, rank in enumerate(ranks):
        cfg = {"rank": rank, "alpha": args.alpha_ratio * rank, "threads": threads, "seed": args.seed}
        cfg["target_modules"] = [m for m in args.target_modules.split(",") if m]
        for key, value in (("local_steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                           ("dtype", args.dtype), ("gradient_checkpointing", args.gradient_checkpointing or None)):
            if value is not None:
                cfg[key] = value
        cfg.update(dp_site_settings(args))
        sites[f"site-{i + 1}"] = cfg
    if args.site_config:
        with open(args.site_config) as f:
            overrides = json.load(f)
        for site, cfg in overrides.items():
            sites.setdefault(site, {"threads": threads, "seed": args.seed}).update(cfg)
    return sites


def site_recipe_kwargs(args) -> dict:
    """The recipe arguments every job takes from add_common_args' flags: model, data, seed, how
    sites run, and the privacy options (client-level DP, HE)."""
    return dict(model=args.model, data=args.data, seed=args.seed, launch_external_process=not args.in_process,
                max_trainer_restarts=args.max_trainer_restarts, site_scripts=site_scripts(args),
                client_dp=client_dp_options(args), **he_recipe_kwargs(args))


def save_merged_weights(model: str | None, results_dir: str, weights_file: str) -> None:
    """Full-weight results (``--save-merged``): the base model with the trained weights, as an HF dir."""
    weights = os.path.join(results_dir, weights_file)
    if not os.path.isfile(weights):
        return
    from flare_lora.components.adapter_export import save_full_model
    from flare_lora.components.training.models import resolve_model_dir

    merged = save_full_model(resolve_model_dir(model), weights, os.path.join(results_dir, "merged"))
    print(f"merged model: {merged}  (AutoModelForCausalLM.from_pretrained(that_dir))")


def site_scripts(args) -> dict[str, str]:
    scripts = {}
    for item in args.site_script:
        site, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise SystemExit(f"--site-script: expected SITE=PATH to an existing file, got {item!r}")
        scripts[site] = os.path.abspath(path)
    return scripts


def make_env(args, sites: dict):
    """SimEnv, an isolated POC (own ports, workspace, HOME) or ProdEnv from --env."""
    workspace = args.workspace or f"/tmp/flare_lora/{args.env}"
    if getattr(args, "site_local", None) and args.env != "poc":
        raise SystemExit(f"--site-local: only with --env poc (a real site's admin edits its own local/), got --env {args.env}")
    if args.env == "sim":
        from nvflare.recipe import SimEnv

        return SimEnv(clients=list(sites), num_threads=len(sites), workspace_root=workspace)
    if args.env == "poc":
        from flare_lora.components.flare.poc import IsolatedPocEnv

        project = None
        if getattr(args, "he", False):  # provision with FLARE's HEBuilder: contexts in the startup kits
            from flare_lora.components.flare.poc_project import build_project_config
            from flare_lora.privacy.he_context import with_he_builder

            project = with_he_builder(build_project_config(list(sites), fed_learn_port=0, admin_port=0))
        on_provisioned = None
        if getattr(args, "no_byoc", False):  # the POC sites "installed" this checkout: allow its classes
            from flare_lora.components.flare.site_policy import allow_flare_lora

            options = {"noise_mask": getattr(args, "mask_rho", None) is not None, "he": getattr(args, "he", False),
                       "client_dp": getattr(args, "client_dp_clip", None) is not None}
            on_provisioned = lambda env: [allow_flare_lora(env.site_dir(p), **options) for p in env.participants]  # noqa: E731
        return IsolatedPocEnv(list(sites), workspace, project=project, on_provisioned=on_provisioned,
                              local_files=site_local_files(args))
    from nvflare.recipe import ProdEnv

    if not args.startup_kit:
        raise SystemExit("--env prod needs --startup-kit (the admin's startup kit directory)")
    return ProdEnv(startup_kit_location=args.startup_kit)


def site_local_files(args) -> dict[str, dict[str, str]]:
    """{site: {file name: text}} from --site-local SITE=PATH."""
    files: dict[str, dict[str, str]] = {}
    for item in getattr(args, "site_local", []):
        site, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise SystemExit(f"--site-local: expected SITE=PATH to an existing file, got {item!r}")
        with open(path) as f:
            files.setdefault(site, {})[os.path.basename(path)] = f.read()
    return files


def run_recipe(recipe, env, name: str, results_dir: str, title: str, model: str | None = None, save_merged=False) -> int:
    """Run (or, with --export, export) the recipe; collect and print results; 0 on success.

    A failed simulation still leaves the server's metrics.json (with the reason under "error"), so
    the report is written either way.
    """
    from nvflare.recipe import SimEnv

    try:
        try:
            run = recipe.execute(env)  # raises SystemExit(0) after writing the job folder on --export
            result = run.get_result(clean_up=False)
            print(f"job {run.get_job_id()} finished with status {run.get_status()}; workspace: {result}")
        except RuntimeError as e:
            print(f"job failed: {e}", file=sys.stderr)
            if not isinstance(env, SimEnv):  # POC / prod: logs stay in the workspace
                return 1
            result = env.get_job_result(name)  # the simulator exited non-zero; its workspace remains
    finally:
        env.stop()
    report = collect_results(result, results_dir, title)
    adapter = os.path.join(results_dir, "adapter")
    if save_merged and os.path.isdir(adapter):
        from flare_lora.components.adapter_export import save_merged_model
        from flare_lora.components.training.models import resolve_model_dir

        report["merged"] = save_merged_model(resolve_model_dir(model), adapter, os.path.join(results_dir, "merged"))
    print_report(report)
    return 1 if report["log"].get("error") or not report["log"].get("final") else 0


def collect_results(result_dir: str | None, out_dir: str, title: str) -> dict:
    """Copy the server's flare_lora/ results out of a run workspace and write the report."""
    found = sorted(glob.glob(os.path.join(result_dir or "", METRICS_GLOB), recursive=True)) if result_dir else []
    if not found:
        raise SystemExit(f"no flare_lora/metrics.json under the job result {result_dir!r}; see the server log there")
    src = os.path.dirname(found[0])
    if os.path.abspath(src) != os.path.abspath(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(src, out_dir)
    log = load_metrics(os.path.join(out_dir, "metrics.json"))
    if log.get("model_at_sites"):  # HE: only the sites hold the plaintext model; in the simulator, here
        for name in ("adapter", "layers.safetensors", "global.safetensors"):
            found = glob.glob(os.path.join(result_dir, "**", "flare_lora", name), recursive=True)
            at_sites = sorted(p for p in found if not os.path.abspath(p).startswith(os.path.abspath(src) + os.sep))
            if at_sites and not os.path.exists(os.path.join(out_dir, name)):
                copy = shutil.copytree if os.path.isdir(at_sites[0]) else shutil.copy
                copy(at_sites[0], os.path.join(out_dir, name))
                log[{"adapter": "adapter", "layers.safetensors": "layers_file"}.get(name, "full_weights")] = name
                print(f"HE: {name} decrypted at a site: {at_sites[0]}")
    report = write_report(log, out_dir, title)
    report.update(log=log, comm=comm_totals(log), out_dir=out_dir)
    return report


def print_report(report: dict) -> None:
    log = report["log"]
    print(report["table"])
    comm = report["comm"]
    print(f"\ntotal upload {comm['upload_bytes'] / 1e6:.2f} MB, download {comm['download_bytes'] / 1e6:.2f} MB")
    if log.get("error"):
        print(f"JOB FAILED: {log['error']}")
    print(f"results: {report['out_dir']} (metrics.json, table.txt, curves.png, tensorboard/)")
    if log.get("adapter"):
        print(f"adapter: {os.path.join(report['out_dir'], 'adapter')}  (PeftModel.from_pretrained(base, that_dir))")
    elif log.get("model_at_sites"):
        print(f"HE: the server holds the global only as ciphertexts; the model: {log['model_at_sites']}")
    if report.get("merged"):
        print(f"merged model: {report['merged']}  (AutoModelForCausalLM.from_pretrained(that_dir))")


def lora_job_main(doc: str, **defaults) -> int:
    """The whole CLI of a LoraRecipe job (flora, fedcdd): parse, validate, run, report.

    Config errors print one line naming site and key and exit 2 instead of a traceback.
    """
    from flare_lora.components.flare.recipe import LoraRecipe
    from flare_lora.components.strategies import METHODS

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="flora")
    p.add_argument("--name", default=None, help="job name (default: the method)")
    add_common_args(p)
    add_fedcdd_args(p)
    add_production_args(p)
    p.set_defaults(**defaults)
    args = p.parse_args()
    name = args.name or args.method
    try:
        sites = build_sites(args)
        recipe = LoraRecipe(
            name=name,
            method=args.method,
            sites=sites,
            num_rounds=args.rounds,
            min_clients=args.min_clients,
            clients_per_round=args.clients_per_round,
            **site_recipe_kwargs(args),
            **fedcdd_recipe_kwargs(args),
            **production_recipe_kwargs(args),
        )
        env = make_env(args, sites)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = args.results or os.path.join("results", name)
    title = f"{name}: ranks {args.ranks}"
    return run_recipe(recipe, env, name, results, title, args.model, args.save_merged)
