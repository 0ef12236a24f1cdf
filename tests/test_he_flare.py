"""HE end to end: a simulator job (with client-level DP before encryption) and a POC job with
FLARE-provisioned keys. In both, the server's persisted global is ciphertext and the plaintext
adapter exists only at the sites."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flare_lora.components.algorithms.stacking import concat_lora
from flare_lora.components.report import load_metrics
from flare_lora.privacy.he_aggregate import EncryptedGlobal
from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, Ckks, load_context
from flare_lora.privacy.he_server import load_wire
from poc_harness import workspace_processes

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "nvflare_jobs" / "flora" / "job.py"
COMMON = ["--steps", "2", "--batch-size", "2", "--threads", "1", "--ranks", "2,4", "--rounds", "1", "--he"]

pytestmark = pytest.mark.e2e


def run_job(tmp_path, model_dir, *args):
    results = tmp_path / "results"
    cmd = [sys.executable, str(JOB), "--model", str(model_dir), "--workspace", str(tmp_path / "ws")]
    cmd += ["--results", str(results), *COMMON, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return load_metrics(results / "metrics.json"), results


def check_server_holds_ciphertext(log, server_results: Path, server_context: str, site_context: str, adapter: Path):
    """The server's context has no secret key, its copy of the global is ciphertext, and that
    ciphertext decrypts (with a site's key) to the adapter the site wrote."""
    assert log["he"]["server_has_secret_key"] is False and not log.get("error")
    assert not (server_results / "adapter").exists()  # the server never wrote a plaintext model
    server = Ckks(*load_context(server_context, "server"))
    site = Ckks(*load_context(site_context, "site"))
    assert not server.context.has_secret_key()
    rounds = [load_wire(str(server_results / name)) for name in log["he_persisted"]]
    assert len(rounds) == len(log["rounds"]) == 1
    for wire in rounds:
        blob = wire["blocks"][0]["groups"]["A"]["ciphertexts"][0]
        assert isinstance(blob, bytes) and blob[:2] == b"\x5e\xa1"  # SEAL magic 0xA15E: a ciphertext, not a tensor
        EncryptedGlobal.from_wire(wire, server)  # the server loads its global without any key
    decrypted = concat_lora([EncryptedGlobal.from_wire(w, site).decrypt(site) for w in rounds])
    written = load_file(adapter / "adapter_model.safetensors")
    assert sorted(written) == sorted(decrypted)
    for key, value in decrypted.items():
        assert (written[key] - value).abs().max() <= 1e-6, key
    return decrypted


def test_simulator_job_with_he_after_client_dp(tmp_path, tiny_model_dir):
    log, results = run_job(tmp_path, tiny_model_dir, "--in-process", "--client-dp-clip", "1.0", "--client-dp-sigma", "0.5")
    assert sorted(log["rounds"][0]["aggregated"]) == ["site-1", "site-2"]
    contexts = tmp_path / "ws" / "he_contexts"
    server_dir = Path(glob.glob(str(tmp_path / "ws" / "flora" / "server" / "**" / "flare_lora"), recursive=True)[0])
    site_adapter = Path(glob.glob(str(tmp_path / "ws" / "flora" / "site-1" / "**" / "flare_lora" / "adapter"),
                                  recursive=True)[0])
    decrypted = check_server_holds_ciphertext(log, server_dir, str(contexts / SERVER_CONTEXT),
                                              str(contexts / CLIENT_CONTEXT), site_adapter)
    assert {t.shape[0] for k, t in decrypted.items() if k.endswith("lora_A.weight")} == {2 + 4}  # stacked ranks
    site_log = (tmp_path / "ws" / "flora" / "site-1" / "log.txt").read_text()
    dp, he = site_log.index("client DP"), site_log.index("HE: site-1 encrypted")
    assert dp < he, "the update must be privatised before it is encrypted"


def test_poc_job_with_flare_provisioned_keys(tmp_path, tiny_model_dir):
    workspace = tmp_path / "ws"
    log, results = run_job(tmp_path, tiny_model_dir, "--env", "poc", "--in-process")
    assert workspace_processes(workspace) == {}
    kits = Path(glob.glob(str(workspace / "*" / "prod_00"))[0])
    job_dir = Path(glob.glob(str(kits / "site-1" / "*" / "flare_lora" / "adapter"))[0])
    check_server_holds_ciphertext(log, results, str(kits / "server" / "startup" / SERVER_CONTEXT),
                                  str(kits / "site-1" / "startup" / CLIENT_CONTEXT), job_dir)
