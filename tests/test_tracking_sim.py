"""End to end: live experiment tracking through FLARE's receivers, and the concise console.

Sites stream their scalars with nvflare.client.tracking while the job runs; the server's
TensorBoard receiver has round 0 before the job ends; the results hold the same scalars as
metrics.json; --tracking mlflow writes an MLflow run."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest
from sim_jobs import FLORA_JOB

from flare_lora.components.report import load_metrics, per_round


def scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def job(tmp_path, model, *args):
    cmd = [sys.executable, str(FLORA_JOB), "--model", str(model), "--workspace", str(tmp_path / "ws"),
           "--results", str(tmp_path / "results"), "--steps", "2", "--batch-size", "2", "--threads", "1",
           "--ranks", "2,2", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.e2e
def test_sites_stream_scalars_live_and_the_console_is_concise(tmp_path, tiny_model_dir):
    proc = job(tmp_path, tiny_model_dir, "--rounds", "3")
    live = None
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        found = glob.glob(str(tmp_path / "ws" / "**" / "tb_events" / "site-1"), recursive=True)
        if found and scalars(found[0]).get("eval_loss", {}).get(0) is not None:
            live = scalars(found[0])
            break
        time.sleep(0.5)
    running = proc.poll() is None
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert live is not None and running, "round 0's scalars reached the server only after the job ended"

    log = load_metrics(tmp_path / "results" / "metrics.json")
    # site-1's folder: what it streamed (evaluation) and what the server streamed from its results
    streamed = scalars(tmp_path / "results" / "tensorboard" / "site-1")
    for row in (r for r in per_round(log) if r["site"] == "site-1"):
        assert streamed["eval_loss"][row["round"]] == pytest.approx(row["eval_loss"], rel=1e-6)
        if row["round"]:
            assert streamed["train_loss"][row["round"]] == pytest.approx(row["train_loss"], rel=1e-6)
    site_2 = scalars(tmp_path / "results" / "tensorboard" / "site-2")
    assert site_2["upload_bytes"][1] == log["rounds"][0]["sites"]["site-2"]["upload_bytes"]

    lines = out.strip().splitlines()
    assert len(lines) <= 40, out
    assert lines[-1].startswith("job flora COMPLETED in ") and "status None" not in out
    assert sum(line.startswith("round 1/3  site-") for line in lines) == 2  # one line per site per round
    assert "INFO" not in out and "it/s" not in out + err  # FLARE's logs and progress bars stay in the log files
    server_log = glob.glob(str(tmp_path / "ws" / "**" / "server" / "**" / "log.txt"), recursive=True)
    assert server_log and "INFO" in open(server_log[0]).read()


@pytest.mark.e2e
def test_tracking_mlflow_writes_an_mlflow_run(tmp_path, tiny_model_dir):
    pytest.importorskip("mlflow")
    proc = job(tmp_path, tiny_model_dir, "--rounds", "1", "--tracking", "mlflow")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    metrics = {k for r in runs for k in r.data.metrics}
    assert {"eval_loss", "train_loss", "upload_bytes"} <= metrics, (metrics, [r.info.run_name for r in runs])
    assert json.loads((tmp_path / "results" / "run_config.json").read_text())["options"]["tracking"] == "mlflow"
