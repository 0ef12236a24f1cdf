"""Two training processes per site (torchrun + DDP, gloo on CPU) through the real FLARE simulator.

``job.py --ddp 2`` starts every site's client script as ``<python> -m torch.distributed.run --standalone
--nproc_per_node=2`` (torchrun):
rank 0 talks to FLARE and broadcasts each task, both ranks install the global state and train on
their half of the site's records, DDP averages the gradients. The client checks on every task that
both ranks hold the same base weights and, after training, the same trained weights (the job
fails otherwise). The same run checks the server's result-size cap: site-2's rank-4 factors are
bigger than ``--max-result-mb``, so its updates are rejected with a log naming it, and the
rounds go on with site-1.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flare_lora.components.report import load_metrics

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "nvflare_jobs" / "flora" / "job.py"
CAP_BYTES = 8000  # site-1 (rank 2) uploads ~6 KB per round, site-2 (rank 4) ~10 KB

pytestmark = pytest.mark.e2e


def test_two_ddp_processes_per_site_and_result_cap(tmp_path, tiny_model_dir):
    results = tmp_path / "results"
    cmd = [sys.executable, str(JOB), "--model", str(tiny_model_dir), "--workspace", str(tmp_path / "ws"),
           "--results", str(results), "--ranks", "2,4", "--rounds", "1", "--steps", "2", "--batch-size", "2",
           "--threads", "1", "--ddp", "2", "--min-clients", "1", "--max-result-mb", str(CAP_BYTES / 1e6)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = load_metrics(results / "metrics.json")

    assert len(log["rounds"]) == 1
    for record in log["rounds"]:
        sites = record["sites"]
        assert {sites[s]["train"]["processes"] for s in sites} == {2}  # both sites trained with 2 ranks
        assert record["aggregated"] == ["site-1"]
        assert sites["site-2"]["upload_bytes"] > CAP_BYTES >= sites["site-1"]["upload_bytes"]
        assert f"exceeds max_result_bytes={CAP_BYTES}" in sites["site-2"]["rejected"]
    server_log = (tmp_path / "ws" / "flora" / "server" / "log.txt").read_text()
    assert "rejected update from site-2: result of" in server_log

    final = log["final"]["sites"]
    assert {e["merged_rounds"] for e in final.values()} == {1}
    assert len({e["base_digest"] for e in final.values()}) == 1, final
