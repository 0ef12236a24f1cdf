"""At a site, when a job starts there: the job against the site admin's own settings.

The settings are ``local/flare_lora.json`` in the site's kit (components/site_local.py). Limits
are checked against the job's site config; required protections against what FLARE will really
run on this site's train results, read from the deployed files, not the job's arguments: HE is the
last filter of the job's own chain for its train task; client-level DP must come from the site's
own privacy scope for this job (``local/privacy.json``: the scope the job's meta names, else the
default), whose parameters the site sets (a job's own filter has the job's parameters).
"""

from __future__ import annotations

import json
import os

from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.workspace import Workspace

from flare_lora.components.site_local import SiteLocal
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.ledger import site_root

HE_FILTER = "flare_lora.privacy.flare.he_filters.HEEncryptFilter"
CLIENT_DP_FILTER = "flare_lora.privacy.flare.client_dp_filter.ClientDPFilter"


def admit_job(site: str, cfg: SiteConfig, *, job_id: str, processes: int = 1) -> tuple[SiteLocal, SiteConfig]:
    """(this site's settings, the job's config under them); ConfigError naming the setting if refused."""
    root = site_root(job_id=job_id)
    if root is None:  # under FLARE the process runs inside the site's workspace
        raise ConfigError(f"site {site!r}: no FLARE site workspace (startup/ and local/) at or above {os.getcwd()}: "
                          "cannot read this site's settings; refusing the job here")
    local = SiteLocal.load(root, site)
    cfg = local.check_config(cfg, processes=processes)
    if local.require_he or local.require_client_dp:
        job_chains, scope_filters = train_result_filters(root, site, job_id)
        local.check_privacy(he=all(chain and chain[-1] == HE_FILTER for chain in job_chains),
                            client_dp=CLIENT_DP_FILTER in scope_filters)
    return local, cfg


def train_result_filters(root: str, site: str, job_id: str) -> tuple[list[list[str]], list[str]]:
    """(per train task name the job's executors use: the class paths of the job's filter chain FLARE
    applies to its results at this site, in order; the class paths of the site's own privacy-scope
    result filters for this job). As FLARE 2.9 builds them: a job chain applies to the tasks it
    names exactly, in direction "out" (its default) or "inout"; scope filters run before it."""
    workspace = Workspace(root, site)
    config = _read(workspace.get_client_app_config_file_path(job_id), site)
    train_tasks = {(e.get("executor") or {}).get("args", {}).get("train_task_name", "train")
                   for e in config.get("executors") or []} or {"train"}
    chains = []
    for task in sorted(train_tasks):
        chain = []
        for group in config.get("task_result_filters") or []:
            if task in (group.get("tasks") or []) and str(group.get("direction", "out")).lower() in ("out", "inout"):
                chain += [f.get("path") for f in group.get("filters") or []]
        chains.append(chain)
    scope_filters = []
    privacy_file = workspace.get_site_privacy_file_path()
    if os.path.isfile(privacy_file):
        privacy = _read(privacy_file, site)
        meta_file = workspace.get_job_meta_path(job_id)
        meta = _read(meta_file, site) if os.path.isfile(meta_file) else {}
        scope_name = meta.get(JobMetaKey.SCOPE.value) or privacy.get("default_scope")
        for scope in privacy.get("scopes") or []:
            if scope.get("name") == scope_name:
                scope_filters += [f.get("path") for f in scope.get("task_result_filters") or []
                                  if str(f.get("direction", "out")).lower() in ("out", "inout")]
    return chains, scope_filters


def _read(path: str, site: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"site {site!r}: cannot check the job's privacy against this site's requirements: "
                          f"{path}: {e}; refusing the job here") from None
