"""A job whose script forges the client-DP reference (tests/sites/dp_forger.py) in a real FLARE
simulator FedIT job with the job's client-level DP filter: what reaches the server moves the global
by at most the clip C (plus the noise), whatever the script claims, and its forged meta never
leaves the site."""

import pytest
from safetensors.torch import load_file
from sim_jobs import SITE_SCRIPTS, run_job

from flare_lora.privacy.client_dp import update_norm

pytestmark = pytest.mark.e2e
CLIP, SIGMA = 0.05, 1e-3


def test_a_forged_reference_releases_nothing_beyond_the_clip(tmp_path, tiny_model_dir):
    log, _, proc = run_job(
        tmp_path, tiny_model_dir, "--method", "fedit", "--sites", "site-1,site-2", "--ranks", "2", "--rounds", "2",
        "--client-dp-clip", str(CLIP), "--client-dp-sigma", str(SIGMA), "--checkpoint-dir", "forgery",
        "--site-script", f"site-2={SITE_SCRIPTS / 'dp_forger.py'}",
    )  # fmt: skip
    site_log = next((tmp_path / "ws").rglob("site-2/log.txt")).read_text(errors="replace")
    assert "dp forger: round 1: sending a change of norm" in site_log
    assert [sorted(r["aggregated"]) for r in log["rounds"]] == [["site-1", "site-2"]] * 2
    for record in log["rounds"]:
        entry = record["sites"]["site-2"]
        assert "base_digest" not in entry and "note" not in entry and "update_reference" not in entry, entry
        assert entry["metrics"]["client_dp_epsilon"] > 0
    checkpoint = next((tmp_path / "ws").rglob("flare_lora_checkpoints"))
    g0, g1 = (load_file(next(checkpoint.rglob(f"round-000{i}.safetensors"))) for i in (0, 1))
    # round 1: both releases lie within C (+ the noise, ≈ σC·√n) of the global they were sent
    noise = SIGMA * CLIP * sum(t.numel() for t in g0.values()) ** 0.5
    moved = update_norm({k: g1[k].float() - g0[k].float() for k in g0})
    assert 0 < moved <= CLIP + 2 * noise, moved  # the forger alone would have moved it by ≈ 16
