"""A site that fails in a real FLARE simulator job (nvflare_jobs/flora/job.py, tiny random Llama):
its update is bad, or its training process dies; the round goes on with the others when
min_clients allows, and a restarted process catches up."""

import pytest
from sim_jobs import SITE_SCRIPTS, run_job, stacked_ranks

BAD_SITE = SITE_SCRIPTS / "bad_site.py"
CRASHING_TRAINER = SITE_SCRIPTS / "crashing_trainer.py"

pytestmark = pytest.mark.e2e


def test_averaging_site_whose_training_process_dies_rejoins_with_the_current_global(tmp_path, tiny_model_dir):
    """FedIT, external processes: site-3's training process dies in round 0 (tests/sites/crashing_trainer.py);
    round 0 goes on with the others, site-3's FLARE client starts a new process, which loads round 0's
    global and trains round 1 like the others."""
    log, results, proc = run_job(
        tmp_path, tiny_model_dir, "--method", "fedit", "--ranks", "4,4,4", "--rounds", "2", "--min-clients", "2",
        "--site-script", f"site-3={CRASHING_TRAINER}",
    )  # fmt: skip
    assert log["method"] == "fedit" and set(stacked_ranks(results).values()) == {4}
    assert [sorted(r["aggregated"]) for r in log["rounds"]] == [["site-1", "site-2"], ["site-1", "site-2", "site-3"]]
    assert log["rounds"][0]["sites"]["site-3"].get("missing")
    # round 1: every site, the new process included, installed the one global of round 0
    assert {e["merged_rounds"] for e in log["rounds"][1]["sites"].values()} == {1}
    assert {e["merged_rounds"] for e in log["final"]["sites"].values()} == {2}


def test_bad_updates_and_a_trainer_that_keeps_dying_leave_the_rounds_to_the_others(tmp_path, tiny_model_dir):
    """site-3 answers with NaN factors (tests/sites/bad_site.py): rejected and logged every round.
    Every training process of site-4 dies; with --max-trainer-restarts 1 its FLARE client starts one
    new process (round 1), then no more (the final validation). The job finishes with site-1 and -2."""
    log, _, proc = run_job(
        tmp_path, tiny_model_dir, "--ranks", "2,2,2,2", "--rounds", "2", "--min-clients", "2",
        "--max-trainer-restarts", "1", "--site-script", f"site-3={BAD_SITE}",
        "--site-script", f"site-4={CRASHING_TRAINER}", env_extra={"CRASH_EVERY_PROCESS": "1"},
    )  # fmt: skip
    assert [sorted(r["aggregated"]) for r in log["rounds"]] == [["site-1", "site-2"]] * 2
    for record in log["rounds"]:
        assert "nan" in record["sites"]["site-3"]["rejected"].lower(), record["sites"]["site-3"]
        assert record["sites"]["site-4"].get("missing")
    assert log["final"]["sites"]["site-4"]["missing"]
    site4 = next((tmp_path / "ws").rglob("site-4/log.txt")).read_text(errors="replace")
    assert site4.count("launching a new trainer") == 1 and "(restart 1 of 1)" in site4
    assert "no new trainer: max_restarts=1 used up" in site4


def test_fewer_valid_sites_than_min_clients_fails_clearly(tmp_path, tiny_model_dir):
    log, _, proc = run_job(
        tmp_path,
        tiny_model_dir,
        "--ranks", "2,2", "--rounds", "2", "--min-clients", "2", "--in-process",
        "--site-script", f"site-2={BAD_SITE}",
        expect_ok=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert log is not None and "min_clients=2" in log["error"], proc.stdout[-3000:]
    assert len(log["rounds"]) == 0
