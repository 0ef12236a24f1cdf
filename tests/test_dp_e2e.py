"""DP end to end: a simulator job switched on by job flags, and a POC where a site's admin enforces
client-level DP through its ``local/privacy.json`` scope without the job asking for it."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from flare_lora.components.report import load_metrics
from flare_lora.privacy.client_dp import client_epsilon

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "nvflare_jobs" / "flora" / "job.py"
SITES = ["site-1", "site-2"]

pytestmark = pytest.mark.e2e


def test_sim_job_with_dp_flags_reports_epsilon_every_round(tmp_path, tiny_model_dir):
    """--dp-epsilon (Opacus DP-SGD over 2 rounds x 2 steps) and --client-dp-* (the filter) together."""
    results, workspace = tmp_path / "results", tmp_path / "ws"
    cmd = [sys.executable, str(JOB), "--model", str(tiny_model_dir), "--ranks", "2", "--rounds", "2"]
    cmd += ["--steps", "2", "--batch-size", "2", "--threads", "1", "--in-process"]
    cmd += ["--dp-epsilon", "8", "--dp-max-grad-norm", "0.5", "--client-dp-clip", "0.05", "--client-dp-sigma", "2"]
    cmd += ["--workspace", str(workspace), "--results", str(results)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = load_metrics(results / "metrics.json")
    for site in ["site-1"]:
        accountant, previous = RDPAccountant(), 0.0
        (journal,) = glob.glob(str(workspace / "**" / site / "flare_lora_privacy" / "dp_sgd.jsonl"), recursive=True)
        charges = [json.loads(line) for line in Path(journal).read_text().splitlines()]
        assert [c["steps"] for c in charges] == [1, 1, 1, 1]  # blocks of 1, 1 step per round, 2 rounds x 2 steps
        for rnd, record in enumerate(log["rounds"]):
            entry = record["sites"][site]
            # under client-level DP the filter releases only the seconds it measured: no loss, no token
            # counts, and not DP-SGD's sample rate either (it would tell the dataset's size)
            assert set(entry["train"]) == {"seconds"} and entry["num_examples"] == 1
            for _ in range(2):
                accountant.step(noise_multiplier=charges[0]["noise_multiplier"], sample_rate=charges[0]["sample_rate"])
            assert entry["metrics"]["dp_epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
            assert entry["metrics"]["dp_epsilon"] > previous
            previous = entry["metrics"]["dp_epsilon"]
            assert entry["metrics"]["client_dp_epsilon"] == pytest.approx(client_epsilon(2.0, rnd + 1, 1e-5))
        assert 7.9 <= previous <= 8.0  # σ was chosen for ε = 8 over the planned 4 steps, and all were taken
        assert log["final"]["sites"][site]["metrics"]["dp_epsilon"] == pytest.approx(previous)
        ledgers = glob.glob(str(workspace / "**" / site / "flare_lora_privacy" / "*.jsonl"), recursive=True)
        assert sorted(os.path.basename(p) for p in ledgers) == ["client_dp.jsonl", "dp_sgd.jsonl"]
    assert all(r["aggregated"] == ["site-1"] for r in log["rounds"])
    # the live tracking stream carries no training statistics of a DP site, only evaluation and epsilon
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    streamed = set()
    for folder in (results / "tensorboard").iterdir():
        events = EventAccumulator(str(folder))
        events.Reload()
        streamed |= set(events.Tags()["scalars"])
    assert {"eval_loss", "dp_epsilon", "client_dp_epsilon", "upload_bytes"} <= streamed, streamed
    assert not [tag for tag in streamed if tag.endswith(("train_loss", "tokens_per_s"))], streamed


def test_poc_site_scope_enforces_client_dp(tmp_path, tiny_model_dir):
    """site-2's admin adds the DP filter in privacy.json; site-1's scope has a budget too small for one
    release, so its filter refuses and its update never leaves the site. The job asks for neither."""
    from flare_lora.components.flare.poc_project import poc_prod_dir
    from flare_lora.components.flare.recipe import LoraRecipe
    from poc_harness import poc_log_paths, run_job_in_poc

    def scope(**args):
        dp = {"path": "flare_lora.privacy.flare.client_dp_filter.ClientDPFilter", "args": {"clip": 0.05, "sigma": 1.0, **args}}
        return {"scopes": [{"name": "dp", "task_data_filters": [dp], "task_result_filters": [dp]}], "default_scope": "dp"}

    one_release = client_epsilon(1.0, 1, 1e-5)
    local_files = {"site-2": {"privacy.json": scope()}, "site-1": {"privacy.json": scope(epsilon_max=one_release / 2)}}
    config = {"rank": 2, "alpha": 4.0, "local_steps": 1, "batch_size": 2, "threads": 1}
    recipe = LoraRecipe(sites={s: dict(config) for s in SITES}, num_rounds=1, min_clients=1, model=tiny_model_dir,
                        launch_external_process=False)
    workspace = tmp_path / "poc"
    status, result_dir = run_job_in_poc(recipe, SITES, workspace, timeout=300, local_files=local_files)
    assert status == "FINISHED:COMPLETED" and result_dir, status
    (metrics,) = glob.glob(os.path.join(result_dir, "**", "flare_lora", "metrics.json"), recursive=True)
    log = json.loads(Path(metrics).read_text())
    (record,) = log["rounds"]
    assert record["aggregated"] == ["site-2"]
    assert record["sites"]["site-2"]["metrics"]["client_dp_epsilon"] == pytest.approx(one_release)
    assert "site-1" not in record["sites"] or record["sites"]["site-1"].get("missing")
    logs = poc_log_paths(workspace, job_id=os.path.basename(result_dir))
    site1 = Path(logs["site-1"]["job_log"]).read_text(errors="replace")
    assert "Processing error in Task Result Filter" in site1 and "refusing to send the update" in site1
    site2 = Path(logs["site-2"]["job_log"]).read_text(errors="replace")
    assert "client DP: site-2 round 0: change of norm" in site2
    ledger = Path(poc_prod_dir(workspace)) / "site-2" / "flare_lora_privacy" / "client_dp.jsonl"
    assert len(ledger.read_text().splitlines()) == 1  # kept in the site workspace across jobs
