"""Where a job runs (``--env``): FLARE's simulator, an isolated POC on this machine, or a
provisioned deployment through an admin's startup kit."""

from __future__ import annotations

import os
import tempfile


def make_env(args, sites: dict):
    """SimEnv, an isolated POC (own ports, workspace, HOME) or ProdEnv from --env."""
    if args.site_local and args.env != "poc":
        raise ValueError(f"--site-local: only with --env poc (a real site's admin edits its own local/), got --env {args.env}")
    if args.startup_kit and args.env != "prod":
        raise ValueError(f"--startup-kit: only with --env prod (the simulator and POC make their own), got --env {args.env}")
    if args.workspace and args.env == "prod":
        raise ValueError("--workspace: not with --env prod (the deployment's server keeps the workspace)")
    if args.log_level != "concise" and args.env != "sim":
        raise ValueError(f"--log-level: the simulator's console only; POC and prod processes log to their own "
                         f"workspaces (a site's local/log_config.json), got --env {args.env}")
    workspace = args.workspace or run_workspace(args.env)
    if args.env == "sim":
        from nvflare.recipe import SimEnv

        from flare_lora.components.flare.log_config import log_config

        return SimEnv(clients=list(sites), num_threads=len(sites), workspace_root=workspace,
                      log_config=log_config(args.log_level))
    if args.env == "poc":
        return poc_env(args, list(sites), workspace)
    from nvflare.recipe import ProdEnv

    if not args.startup_kit:
        raise ValueError("--env prod needs --startup-kit (the admin's startup kit directory)")
    return ProdEnv(startup_kit_location=args.startup_kit)


def run_workspace(env: str) -> str:
    """A new folder per run under /tmp/flare_lora (two runs at once never share a workspace)."""
    os.makedirs("/tmp/flare_lora", exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{env}-", dir="/tmp/flare_lora")


def poc_env(args, sites: list[str], workspace: str):
    """An isolated POC provisioned for this job: HE contexts in the kits with --he, and with
    --no-byoc the sites allow the classes of the flare-lora they "installed" (this one)."""
    from flare_lora.components.flare.poc import IsolatedPocEnv

    project = None
    if args.he:  # provision with FLARE's HEBuilder: contexts in the startup kits
        from flare_lora.components.flare.poc_project import build_project_config
        from flare_lora.privacy.he_context import with_he_builder

        project = with_he_builder(build_project_config(sites, fed_learn_port=0, admin_port=0))
    on_provisioned = None
    if args.no_byoc:
        from flare_lora.components.flare.site_policy import allow_flare_lora

        options = {"noise_mask": getattr(args, "mask_rho", None) is not None, "he": args.he,
                   "client_dp": args.client_dp_clip is not None}
        on_provisioned = lambda env: [allow_flare_lora(env.site_dir(p), **options) for p in env.participants]  # noqa: E731
    return IsolatedPocEnv(sites, workspace, project=project, on_provisioned=on_provisioned,
                          local_files=site_local_files(args))


LOCAL_FILES = ("flare_lora.json", "privacy.json", "resources.json", "authorization.json", "log_config.json")


def site_local_files(args) -> dict[str, dict[str, str]]:
    """{site: {file name: text}} from --site-local SITE=PATH (a file FLARE or flare-lora reads there)."""
    files: dict[str, dict[str, str]] = {}
    for item in args.site_local:
        site, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise ValueError(f"--site-local: expected SITE=PATH to an existing file, got {item!r}")
        if os.path.basename(path) not in LOCAL_FILES:
            raise ValueError(f"--site-local: {path}: a site reads only {list(LOCAL_FILES)} from local/, "
                             f"got {os.path.basename(path)!r} (name the file as the site reads it)")
        with open(path) as f:
            files.setdefault(site, {})[os.path.basename(path)] = f.read()
    return files
