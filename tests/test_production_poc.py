"""One provisioned multi-process FLARE deployment on localhost (own ports, workspace, HOME), run the
way docs/production.md tells hospitals to run it, through a training-process crash, a site crash
and a server crash.

- provisioned from the production project.yml template (components/flare/provision.py): server,
  three hospitals, admins with roles;
- every site denies the "byoc" right and allows only flare-lora's classes
  (components/flare/site_policy.py), so the job runs only because it carries no code;
- a 4-round FLoRA job with a server checkpoint and min_clients=2:
  round 0: hospital-3's training process is killed (by its pid) while it trains: the round
  completes with the two others; in round 1 hospital-3's FLARE client starts a new training
  process, which installs round 0 (same base weights as the others) and trains: all three count;
  round 2: the whole hospital-3 site is killed (by pid, kept down): the round completes without it;
- the server is killed (by pid) right after round 2's checkpoint, then the server and hospital-3
  are restarted and the same job is submitted again: it resumes at round 3 with the stacked
  history of rounds 0-2, hospital-3 catches up and all sites end with identical base weights;
  the final adapter is exactly the checkpointed rounds plus the new one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flare_lora.components.flare.checkpoint import RoundCheckpoint
from flare_lora.components.flare.provision import render_project
from flare_lora.components.flare.recipe import LoraRecipe
from flare_lora.components.flare.site_policy import allow_flare_lora, deny_byoc
from flare_lora.components.strategies import FLoRA
from flare_lora.components.report import load_metrics
from poc_harness import HarnessPocEnv, workspace_processes

SITES = ["hospital-1", "hospital-2", "hospital-3"]
ADMIN = "admin@coordinator.example.org"
CHECKPOINT = "checkpoints/flora"  # relative: under the server workspace, in the submitter's folder
HEARTBEAT_TIMEOUT = 20  # seconds without heartbeat before the server declares a site dead (default 600)

pytestmark = pytest.mark.e2e


def make_recipe(model_dir: str) -> LoraRecipe:
    common = {"local_steps": 2, "batch_size": 2, "threads": 1}
    sites = {"hospital-1": {"rank": 2, **common}, "hospital-2": {"rank": 4, **common},
             "hospital-3": {"rank": 2, **common, "local_steps": 25}}  # long enough to be killed mid-training
    recipe = LoraRecipe(name="flora", sites=sites, num_rounds=4, min_clients=2, model=model_dir,
                        checkpoint_dir=CHECKPOINT, byoc=False)
    recipe.add_server_config({"dead_client_grace_period": 0})  # act on the server's dead-site report at once
    return recipe


def wait_for(what: str, check, timeout: float, env: HarnessPocEnv):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; logs: {env.log_paths()}")


def job_log(env: HarnessPocEnv, site: str, job_id: str) -> str:
    path = Path(env.site_dir(site), job_id, "log.txt")
    return path.read_text(errors="replace") if path.is_file() else ""


def trainer_pid(env: HarnessPocEnv, site: str) -> int | None:
    """The site's training process (the client script its FLARE job process launched)."""
    pids = [p for p in env.pids()[site].trainers if "client_train" in Path(f"/proc/{p}/cmdline").read_text()]
    return pids[0] if len(pids) == 1 else None


def test_trainer_crash_site_crash_and_server_restart_in_provisioned_deployment(tmp_path, tiny_model_dir):
    t0 = time.monotonic()
    project = render_project(SITES, server="server", project_admin=ADMIN)
    env = HarnessPocEnv(SITES, tmp_path / "deploy", home=tmp_path / "home", project=project, username=ADMIN,
                         extra_env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    checkpoint = None
    try:
        env.provision()
        for participant in env.participants:  # each site admin's policy for pip-installed flare-lora
            allow_flare_lora(env.site_dir(participant))
            deny_byoc(env.site_dir(participant))
        resources = Path(env.local_dir("server"), "resources.json")
        config = json.loads(resources.read_text())
        config["servers"][0]["heart_beat_timeout"] = HEARTBEAT_TIMEOUT
        resources.write_text(json.dumps(config, indent=2))
        env.start()
        checkpoint = Path(env.site_dir("server"), "flare_lora_checkpoints", ADMIN, CHECKPOINT)
        t_started = time.monotonic()

        first = make_recipe(tiny_model_dir).run(env).get_job_id()
        wait_for("hospital-3 training round 0",
                 lambda: "hospital-3 round 0:" in job_log(env, "hospital-3", first), 300, env)
        trainer = trainer_pid(env, "hospital-3")
        assert trainer, env.pids()["hospital-3"]
        os.kill(trainer, signal.SIGKILL)
        t_trainer = time.monotonic()
        wait_for("hospital-3 training round 2 in a new process",
                 lambda: "hospital-3 round 2:" in job_log(env, "hospital-3", first), 300, env)
        t_round2 = time.monotonic()
        assert trainer_pid(env, "hospital-3") not in (None, trainer)
        killed = env.kill_site("hospital-3")
        state = checkpoint / "state.json"
        wait_for("round 2 in the checkpoint",
                 lambda: state.is_file() and json.loads(state.read_text())["rounds_done"] >= 3, 180, env)
        t_checkpoint = time.monotonic()
        env.kill_site("server")
        assert json.loads(state.read_text())["rounds_done"] == 3
        first_log = job_log(env, "hospital-3", first)

        env.start_participant("server")
        env.start_participant("hospital-3")
        env.wait_ready(120)
        t_restarted = time.monotonic()
        second = make_recipe(tiny_model_dir).run(env).get_job_id()
        result = env.get_job_result(second, timeout=300)
        status = env.get_job_status(second)
        first_status = env.get_job_status(first)
    finally:
        env.stop()
    print(f"timings: start {t_started - t0:.1f}s, to trainer kill {t_trainer - t_started:.1f}s, from there to "
          f"round 2 {t_round2 - t_trainer:.1f}s, round 2 without hospital-3 {t_checkpoint - t_round2:.1f}s, restart "
          f"{t_restarted - t_checkpoint:.1f}s, resumed job {time.monotonic() - t_restarted:.1f}s; first job after "
          f"restart: {first_status}; harness {env.timings}")
    assert killed and workspace_processes(env.workspace) == {}
    assert status == "FINISHED:COMPLETED", (status, env.log_paths(second))

    log = load_metrics(Path(result) / "workspace" / "flare_lora" / "metrics.json")
    assert not log.get("error"), log.get("error")
    assert "launching a new trainer for task 'train' (restart 1 of 3)" in first_log, first_log[-3000:]
    assert log["resumed"]["from_round"] == 3
    assert [sorted(r["aggregated"]) for r in log["rounds"]] == [SITES[:2], SITES, SITES[:2], SITES]
    for rnd in (0, 2):
        assert log["rounds"][rnd]["sites"]["hospital-3"].get("missing"), log["rounds"][rnd]["sites"]["hospital-3"]
    caught_up = log["rounds"][1]["sites"]  # the new training process installed round 0 like the others
    assert {e["merged_rounds"] for e in caught_up.values()} == {1}
    assert len({e["base_digest"] for e in caught_up.values()}) == 1, caught_up
    final = log["final"]["sites"]
    assert sorted(final) == SITES and {e["merged_rounds"] for e in final.values()} == {4}
    assert len({e["base_digest"] for e in final.values()}) == 1, final

    # the adapter is the checkpointed rounds 0-2 (written before the crash) plus round 3, stacked
    rounds = RoundCheckpoint(str(checkpoint)).load(json.loads((checkpoint / "state.json").read_text())["identity"])
    assert len(rounds.rounds) == 4
    adapter = load_file(Path(result) / "workspace" / "flare_lora" / "adapter" / "adapter_model.safetensors")
    expected, _ = FLoRA().final(rounds.rounds)
    assert adapter.keys() == expected.keys()
    assert all(adapter[k].equal(expected[k]) for k in expected)
    print(f"provisioned deployment, trainer crash, site crash, server restart, resume: {time.monotonic() - t0:.1f}s")
