"""docs/production.md's walkthrough, run: three named hospitals whose data live in different
directories, a researcher who holds none of it.

1. ``flare-lora provision --sites hospital-a,hospital-b,hospital-c --he``: the project; provisioned
   (server on localhost, own ports, workspace and HOME) with nvflare's provisioner;
2. each hospital's admin writes ``local/flare_lora.json`` (its model and dataset paths under
   logical names, its limits; hospital-a requires HE) and runs ``flare-lora site-policy --he
   --deny-byoc`` on its kit;
3. the researcher exports a FLoRA job with DP-SGD and HE naming the model and data by logical
   name, from a directory where neither exists (only the public base model's config.json, which
   pins the modules the server accepts), submits it with ``nvflare job submit``, waits and
   downloads the results;
4. a hostile researcher edits the same job's executor command to run code of its own: a site
   that denies bring-your-own-code refuses the job before anything runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flare_lora.components.report import load_metrics
from poc_harness import HarnessPocEnv, workspace_processes
from test_flora_poc import _env, _nvflare_cmd, nvflare

SITES = ["hospital-a", "hospital-b", "hospital-c"]
ADMIN = "admin@coordinator.example.org"

pytestmark = pytest.mark.e2e


def flare_lora(*args: str, cwd: Path, env: dict) -> str:
    """The ``flare-lora`` command of this interpreter; its stdout (asserting success)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("flare-lora")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"flare-lora {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def hospital_data(tmp_path: Path) -> dict[str, tuple[str, int]]:
    """Each hospital's records in a directory of its own; {site: (its dataset path, records)}."""
    paths = {}
    for i, site in enumerate(SITES):
        count = 10 + 2 * i
        records = "".join(json.dumps({"instruction": f"{site} question {k}", "output": str(k % 3)}) + "\n"
                          for k in range(count))
        if site == "hospital-b":  # a directory holding <site>.jsonl
            folder = tmp_path / "b-storage" / "records"
            folder.mkdir(parents=True)
            (folder / f"{site}.jsonl").write_text(records)
            paths[site] = (str(folder), count)
        else:  # the site's own file
            file = tmp_path / f"{site}-nas" / "notes.jsonl"
            file.parent.mkdir(parents=True)
            file.write_text(records)
            paths[site] = (str(file), count)
    return paths


def test_provision_site_config_export_submit_download(tmp_path, tiny_model_dir):
    admin_env = _env()
    flare_lora("provision", "--sites", ",".join(SITES), "--server", "server", "--project-admin", ADMIN, "--he",
               "-o", str(tmp_path / "project.yml"), cwd=tmp_path, env=admin_env)
    project = yaml.safe_load((tmp_path / "project.yml").read_text())
    env = HarnessPocEnv(SITES, tmp_path / "deploy", home=tmp_path / "home", project=project, username=ADMIN,
                        extra_env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    data = hospital_data(tmp_path)
    try:
        env.provision()
        for site in ["server", *SITES]:  # each admin on its own kit
            kit = {"models": {"tiny-llama": str(tiny_model_dir)}, "datasets": {"notes": data[site][0]},
                   "max_threads": 1, "dp_epsilon_max": 1000.0, "require_he": site == "hospital-a"} \
                if site != "server" else None
            if kit is not None:
                Path(env.local_dir(site), "flare_lora.json").write_text(json.dumps(kit, indent=2))
            flare_lora("site-policy", env.site_dir(site), "--he", "--deny-byoc", cwd=tmp_path, env=admin_env)
        env.start()

        researcher = tmp_path / "researcher"  # holds neither the model nor any hospital's data
        (researcher / "base").mkdir(parents=True)
        shutil.copy(Path(tiny_model_dir) / "config.json", researcher / "base" / "config.json")
        flare_lora("export", "flora", "--sites", ",".join(SITES), "--ranks", "2,4,2", "--model", "tiny-llama",
                   "--model-config", str(researcher / "base" / "config.json"), "--data", "notes", "--dp-noise-multiplier", "0.5", "--he", "--no-byoc", "--rounds", "2",
                   "--steps", "2", "--batch-size", "2", "--site-python", sys.executable,
                   "--export-dir", str(researcher / "job"), cwd=researcher, env=admin_env)
        cli_env = {**_env(), **env.environ()}
        kit = ["--startup-kit", env.admin_dir]
        job_id = nvflare(cli_env, "job", "submit", "-j", str(researcher / "job" / "flora"), *kit)["job_id"]
        done = nvflare(cli_env, "job", "wait", job_id, "--timeout", "500", *kit, timeout=530)
        assert done["status"] == "FINISHED:COMPLETED", (done, env.log_paths(job_id))
        assert not nvflare(cli_env, "job", "meta", job_id, *kit).get("byoc")  # every site denies byoc anyway
        download = Path(nvflare(cli_env, "job", "download", job_id, "-o", str(researcher / "download"), *kit)["path"])

        evil = researcher / "evil"  # the same job, its executor told to run code of the researcher's
        shutil.copytree(researcher / "job" / "flora", evil)
        pwned = tmp_path / "pwned"
        for config in evil.glob("app_*/config/config_fed_client.json"):
            content = json.loads(config.read_text())
            content["executors"][0]["executor"]["args"]["command"] = [
                sys.executable, "-c", f"open({str(pwned)!r}, 'w').write('ran')"]
            config.write_text(json.dumps(content))
        evil_id = nvflare(cli_env, "job", "submit", "-j", str(evil), *kit)["job_id"]
        waited = subprocess.run([*_nvflare_cmd(), "--format", "json", "job", "wait", evil_id, "--timeout", "200", *kit],
                                env=cli_env, capture_output=True, text=True, timeout=230)
        status = json.loads(waited.stdout)["data"]["status"]  # a failed job: nvflare exits 1
        assert status == "FINISHED:EXECUTION_EXCEPTION" and not pwned.exists(), waited.stdout
        site_log = Path(env.log_paths(evil_id)["hospital-b"]["job_log"]).read_text(errors="replace")
        assert "refusing this job at this site: it carries no code" in site_log, site_log[-3000:]
    finally:
        env.stop()
    assert workspace_processes(tmp_path / "deploy") == {}

    log = load_metrics(download / "workspace" / "flare_lora" / "metrics.json")
    assert not log.get("error") and len(log["rounds"]) == 2 and log.get("he")
    for record in log["rounds"]:
        assert sorted(record["aggregated"]) == SITES
    for site, (_, count) in data.items():  # each site trained and evaluated on its own records
        held_out = round(0.2 * count)
        entry = log["rounds"][0]["sites"][site]
        assert (entry["num_examples"], entry["metrics"]["n"]) == (count - held_out, held_out), site
        assert entry["train"]["dp"]["noise_multiplier"] == 0.5 and log["final"]["sites"][site]["metrics"]["dp_epsilon"] > 0
    digests = {e["base_digest"] for e in log["final"]["sites"].values()}
    assert len(digests) == 1
