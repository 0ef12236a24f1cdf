"""At a site, when a job starts there: the job against the site admin's own settings.

The settings are ``local/flare_lora.json`` in the site's kit (components/site_local.py). Limits
are checked against the job's site config; required protections against what FLARE will really
run on this site's train results: the filters of the job's deployed app config plus those of the
site's privacy scope the job gets (``local/privacy.json``: the scope its meta names, else the
default). Reading the deployed files, not the job's arguments, means a job cannot claim HE or DP
it does not have.
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
    root = site_root()
    local = SiteLocal.load(root, site)
    cfg = local.check_config(cfg, processes=processes)
    if local.require_he or local.require_client_dp:
        filters = train_result_filters(root, site, job_id)
        local.check_privacy(he=HE_FILTER in filters, client_dp=CLIENT_DP_FILTER in filters)
    return local, cfg


def train_result_filters(root: str, site: str, job_id: str) -> set[str]:
    """Class paths of the filters FLARE applies to this job's "train" results at this site."""
    workspace = Workspace(root, site)
    config = _read(workspace.get_client_app_config_file_path(job_id), site)
    paths = {f.get("path") for group in config.get("task_result_filters") or []
             if {"train", "*"} & set(group.get("tasks") or ["*"]) for f in group.get("filters") or []}
    privacy_file = workspace.get_site_privacy_file_path()
    if os.path.isfile(privacy_file):
        privacy = _read(privacy_file, site)
        meta_file = workspace.get_job_meta_path(job_id)
        meta = _read(meta_file, site) if os.path.isfile(meta_file) else {}
        scope_name = meta.get(JobMetaKey.SCOPE.value) or privacy.get("default_scope")
        for scope in privacy.get("scopes") or []:
            if scope.get("name") == scope_name:
                paths |= {f.get("path") for f in scope.get("task_result_filters") or []}
    return paths


def _read(path: str, site: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"site {site!r}: cannot check the job's privacy against this site's requirements: "
                          f"{path}: {e}; refusing the job here") from None
