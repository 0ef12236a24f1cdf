"""Running a job script (nvflare_jobs/*/job.py) in the FLARE simulator from a test, and reading what it wrote."""

import os
import subprocess
import sys
from pathlib import Path

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, module_prefixes
from flare_lora.components.report import load_metrics

ROOT = Path(__file__).resolve().parents[1]
FLORA_JOB = ROOT / "nvflare_jobs" / "flora" / "job.py"
SITE_SCRIPTS = Path(__file__).parent / "sites"


def run_job(tmp_path, model_dir, *args, job=FLORA_JOB, expect_ok=True, env_extra=None):
    """Run ``job`` in its own process; return (metrics log, results dir, completed process)."""
    results = tmp_path / "results"
    cmd = [sys.executable, str(job), "--model", str(model_dir), "--workspace", str(tmp_path / "ws")]
    cmd += ["--results", str(results), "--steps", "2", "--batch-size", "2", "--threads", "1", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    metrics = results / "metrics.json"
    return (load_metrics(metrics) if metrics.exists() else None), results, proc


def final_digests(log):
    return {s: e.get("base_digest") for s, e in log["final"]["sites"].items()}


def stacked_ranks(results):
    from safetensors.torch import load_file

    state = load_file(results / "adapter" / "adapter_model.safetensors")
    return {p: state[p + LORA_A_SUFFIX].shape[0] for p in module_prefixes(state)}
