"""A hostile site in a real FLARE simulator job (nvflare_jobs/flora/job.py, tiny random Llama):
tests/sites/hostile_site.py sends another kind of bad result every round. Every one is rejected
with its reason, every round aggregates the three honest sites, and they end with identical
finite weights and an adapter of the target modules only."""

import pytest
import torch
from safetensors.torch import load_file
from sim_jobs import SITE_SCRIPTS, final_digests, run_job

from flare_lora.components.algorithms.lora_state import module_prefixes

pytestmark = pytest.mark.e2e

EXPECTED = [  # hostile_site.ATTACKS, in order: what the rejection must name
    "expected in dim",
    "unknown module base_model.model.model.embed_tokens",
    "exceeds max_examples=1000000",
    "exceeds max_update_norm=100",
    "float8",
    "str key",
    "merged_rounds: expected an int",
    "num_examples must be a positive int",
    "of the site's target_modules are missing",
    "||A||_F",
]


def test_a_hostile_site_is_rejected_every_round_and_the_honest_sites_go_on(tmp_path, tiny_model_dir):
    log, results, proc = run_job(
        tmp_path, tiny_model_dir, "--sites", "clinic-x,hospital-a,hospital-b,hospital-c", "--ranks", "2",
        "--rounds", str(len(EXPECTED)), "--min-clients", "3", "--steps", "1",
        "--site-script", f"clinic-x={SITE_SCRIPTS / 'hostile_site.py'}",
    )  # fmt: skip
    honest = ["hospital-a", "hospital-b", "hospital-c"]
    assert len(log["rounds"]) == len(EXPECTED)
    for record, reason in zip(log["rounds"], EXPECTED):
        assert sorted(record["aggregated"]) == honest, record
        assert reason in record["sites"]["clinic-x"]["rejected"], (reason, record["sites"]["clinic-x"])
    digests = final_digests(log)
    assert len({digests[s] for s in honest}) == 1 and digests[honest[0]]
    assert {e["merged_rounds"] for s, e in log["final"]["sites"].items() if s in honest} == {len(EXPECTED)}
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in adapter.values())
    assert {p.rsplit(".", 1)[-1] for p in module_prefixes(adapter)} == {"q_proj", "v_proj"}
    server = next((tmp_path / "ws").rglob("server/log.txt")).read_text(errors="replace")
    assert server.count("rejected update from clinic-x") == len(EXPECTED)
