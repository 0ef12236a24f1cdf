"""End to end in a real FLARE POC (isolated: own ports, workspace and HOME) on a tiny random Llama.

1. ``job.py --env poc``: the one-command POC run.
2. ``job.py --export`` + the ``nvflare`` CLI (``job submit -j`` / ``list`` / ``wait`` / ``meta`` /
   ``download``) against an isolated POC, exactly the flow of docs/poc.md.
3. The site class allow-list entries docs/poc.md tells sites to add, checked with nvflare's own
   ``ComponentPathAuthorizer`` against the exported job's configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, module_prefixes
from flare_lora.components.flare import site_policy
from flare_lora.components.report import load_metrics
from poc_harness import isolated_poc, workspace_processes

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "nvflare_jobs" / "flora" / "job.py"
SITES = ["site-1", "site-2"]
COMMON = ["--ranks", "2,4", "--steps", "2", "--batch-size", "2", "--threads", "1"]

# what docs/poc.md tells each site to append to ``class_allow_list`` for a non-BYOC run
SERVER_ALLOW, (CLIENT_ALLOW,) = site_policy.SERVER_ALLOW[0], site_policy.CLIENT_ALLOW  # LoraController

pytestmark = pytest.mark.e2e


def _env(**extra) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def _nvflare_cmd() -> list[str]:
    """The ``nvflare`` console script of this interpreter (same entry point as ``python -m nvflare.cli``)."""
    script = Path(sys.executable).with_name("nvflare")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nvflare.cli"]


def nvflare(env: dict, *args: str, timeout: float = 120) -> dict:
    """Run ``nvflare --format json <args>``; return the JSON envelope's ``data`` (asserting status ok)."""
    proc = subprocess.run(
        [*_nvflare_cmd(), "--format", "json", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout.strip()
    detail = f"nvflare {' '.join(args)} -> rc {proc.returncode}\n{out}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and out, detail
    envelope = json.loads(out)  # --format json: one envelope {"status": ..., "data": ...} on stdout
    assert envelope["status"] == "ok", envelope
    return envelope["data"]


def stacked_ranks(adapter_dir: Path) -> set[int]:
    from safetensors.torch import load_file

    state = load_file(adapter_dir / "adapter_model.safetensors")
    return {state[p + LORA_A_SUFFIX].shape[0] for p in module_prefixes(state)}


def check_results(log: dict, rounds: int) -> None:
    assert not log.get("error"), log.get("error")
    assert len(log["rounds"]) == rounds
    for record in log["rounds"]:
        assert sorted(record["aggregated"]) == SITES
    digests = {s: e.get("base_digest") for s, e in log["final"]["sites"].items()}
    assert sorted(digests) == SITES and None not in digests.values()
    assert len(set(digests.values())) == 1, f"sites hold different base weights: {digests}"
    assert log.get("adapter") == "adapter"


@pytest.fixture(scope="module")
def exported_job(tmp_path_factory, tiny_model_dir) -> Path:
    """``job.py --export --export-dir X``: the job folder ``X/flora`` for ``nvflare job submit -j``."""
    out = tmp_path_factory.mktemp("export")
    cmd = [sys.executable, str(JOB), "--export", "--export-dir", str(out / "job"), "--model", str(tiny_model_dir)]
    cmd += [*COMMON, "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the export dir holds one folder named after the job; that folder is what `nvflare job submit -j` takes
    assert [p.name for p in (out / "job").iterdir()] == ["flora"]
    return out / "job" / "flora"


def test_one_command_poc_run(tmp_path, tiny_model_dir):
    """``python nvflare_jobs/flora/job.py --env poc``: 2 rounds, both sites, same base, adapter, nothing left."""
    t0 = time.monotonic()
    workspace, results = tmp_path / "poc", tmp_path / "results"
    cmd = [sys.executable, str(JOB), "--env", "poc", "--workspace", str(workspace), "--model", str(tiny_model_dir)]
    cmd += [*COMMON, "--rounds", "2", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    leftovers = workspace_processes(workspace)
    print(f"job.py --env poc: {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FINISHED:COMPLETED" in proc.stdout

    check_results(load_metrics(results / "metrics.json"), rounds=2)
    assert stacked_ranks(results / "adapter") == {2 * (2 + 4)}  # every round's stack, ranks 2 + 4
    assert (results / "adapter" / "adapter_config.json").is_file()
    assert (results / "table.txt").is_file()

    # the POC ran on its own ports/HOME and was stopped: no process references its workspace
    assert leftovers == {}, leftovers
    assert Path(str(workspace) + "_home").is_dir()


def test_exported_job_with_nvflare_job_submit(tmp_path, exported_job):
    """The exported folder, submitted/monitored/downloaded with the real ``nvflare job`` CLI."""
    t0 = time.monotonic()
    meta = json.loads((exported_job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"], "app_site-1": ["site-1"], "app_site-2": ["site-2"]}
    server_cfg = json.loads((exported_job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server_cfg["workflows"][0]["path"] == SERVER_ALLOW
    for site in SITES:
        assert (exported_job / f"app_{site}" / "config" / "config_fed_client.json").is_file()

    workspace = tmp_path / "poc"
    with isolated_poc(SITES, workspace, home=tmp_path / "home") as env:
        # env.environ(): HOME (so ~/.nvflare is the isolated one), NVFLARE_POC_WORKSPACE and
        # NVFLARE_STARTUP_KIT_DIR; --startup-kit names the admin kit explicitly as well.
        cli_env = _env(**env.environ())
        kit = ["--startup-kit", env.admin_dir]
        job_id = nvflare(cli_env, "job", "submit", "-j", str(exported_job), *kit)["job_id"]
        listed = nvflare(cli_env, "job", "list", *kit)
        assert job_id in [j["job_id"] for j in listed]
        done = nvflare(cli_env, "job", "wait", job_id, "--timeout", "300", *kit, timeout=330)
        assert done["status"] == "FINISHED:COMPLETED", done
        job_meta = nvflare(cli_env, "job", "meta", job_id, *kit)
        assert job_meta["byoc"] is True  # custom/ in the apps: the submitter needs the "byoc" right
        download = nvflare(cli_env, "job", "download", job_id, "-o", str(tmp_path / "download"), *kit)
        print("POC timings:", env.timings)
    assert workspace_processes(workspace) == {}

    result = Path(download["path"])
    assert result == tmp_path / "download" / job_id
    results = result / "workspace" / "flare_lora"
    check_results(load_metrics(results / "metrics.json"), rounds=1)
    assert stacked_ranks(results / "adapter") == {2 + 4}
    print(f"export + nvflare job submit/wait/download: {time.monotonic() - t0:.1f}s")


def test_site_allow_list_entries_for_a_non_byoc_run(tmp_path, exported_job):
    """docs/poc.md: with the code pip-installed and no custom/ folder, each site must add one class.

    nvflare enforces ``class_allow_list`` (site ``local/resources.json``) only for jobs without
    custom code; the default list (nvflare's DEFAULT_CLASS_ALLOW_LIST) contains neither our
    controller nor our client executor (flare_lora.components.flare.restarting_executor).
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.private.fed.app.default_app_validator import DefaultAppValidator
    from site_allow_list import site_allows

    # as exported, every app carries code in custom/: FLARE marks the job BYOC and skips the allow-list
    for app, site_type in (("app_server", "server"), ("app_site-1", "client")):
        err, info = DefaultAppValidator(site_type).validate(str(exported_job / app))
        assert err == "" and info.get("byoc") is True

    server = json.loads((exported_job / "app_server" / "config" / "config_fed_server.json").read_text())
    client = json.loads((exported_job / "app_site-1" / "config" / "config_fed_client.json").read_text())
    controller, executor = server["workflows"][0], client["executors"][0]["executor"]
    assert (controller["path"], executor["path"]) == (SERVER_ALLOW, CLIENT_ALLOW)

    def allowed(component, allow_list) -> bool:
        """What a site whose local/resources.json has this class_allow_list decides for ``component``."""
        return site_allows(component, allow_list, tmp_path / "resources.json")

    default = list(DEFAULT_CLASS_ALLOW_LIST)
    assert not allowed(controller, default) and not allowed(executor, default)
    assert allowed(controller, default + [SERVER_ALLOW]) and allowed(executor, default + [CLIENT_ALLOW])
    assert allowed(controller, default + ["flare_lora.components.flare."])  # package prefixes end with "."
    assert not allowed(controller, default + ["components"])  # an invalid entry rejects every class
    assert not allowed(executor, default + [SERVER_ALLOW])  # the server entry does not cover clients

