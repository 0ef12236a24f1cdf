"""One provisioned multi-process FLARE deployment on localhost (own ports, workspace, HOME), run the
way docs/production.md tells hospitals to run it, through a site crash and a server crash.

- provisioned from the production project.yml template (components/flare/provision.py): server,
  three hospitals, admins with roles;
- every site denies the "byoc" right and allows only flare-lora's classes
  (components/flare/site_policy.py), so the job runs only because it carries no code;
- a FLoRA job with a server checkpoint: hospital-3 is killed (by pid, kept down) while it trains
  round 1: round 1 completes with the two others (min_clients=2);
- the server is killed (by pid) right after round 1's checkpoint, then the server and hospital-3
  are restarted and the same job is submitted again: it resumes at round 2 with the stacked
  history of rounds 0-1, hospital-3 catches up on both rounds and all sites end with identical
  base weights; the final adapter is exactly the checkpointed rounds plus the new one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from components.flare.checkpoint import RoundCheckpoint
from components.flare.poc import IsolatedPocEnv, workspace_processes
from components.flare.provision import render_project
from components.flare.recipe import LoraRecipe
from components.flare.site_policy import allow_flare_lora, deny_byoc
from components.methods import FLoRA
from components.report import load_metrics

SITES = ["hospital-1", "hospital-2", "hospital-3"]
ADMIN = "admin@coordinator.example.org"
CHECKPOINT = "checkpoints/flora"  # relative: under the server's workspace
HEARTBEAT_TIMEOUT = 20  # seconds without heartbeat before the server declares a site dead (default 600)

pytestmark = pytest.mark.e2e


def make_recipe(model_dir: str) -> LoraRecipe:
    common = {"local_steps": 2, "batch_size": 2, "threads": 1}
    sites = {"hospital-1": {"rank": 2, **common}, "hospital-2": {"rank": 4, **common},
             "hospital-3": {"rank": 2, **common, "local_steps": 25}}  # long enough to be killed mid-training
    recipe = LoraRecipe(name="flora", sites=sites, num_rounds=3, min_clients=2, model=model_dir,
                        checkpoint_dir=CHECKPOINT, byoc=False)
    recipe.add_server_config({"dead_client_grace_period": 0})  # act on the server's dead-site report at once
    return recipe


def wait_for(what: str, check, timeout: float, env: IsolatedPocEnv):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; logs: {env.log_paths()}")


def job_log(env: IsolatedPocEnv, site: str, job_id: str) -> str:
    path = Path(env.site_dir(site), job_id, "log.txt")
    return path.read_text(errors="replace") if path.is_file() else ""


def test_site_crash_and_server_restart_in_provisioned_deployment(tmp_path, tiny_model_dir):
    t0 = time.monotonic()
    project = render_project(SITES, server="server", project_admin=ADMIN)
    env = IsolatedPocEnv(SITES, tmp_path / "deploy", home=tmp_path / "home", project=project, username=ADMIN,
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
        checkpoint = Path(env.site_dir("server"), CHECKPOINT)
        t_started = time.monotonic()

        first = make_recipe(tiny_model_dir).run(env).get_job_id()
        wait_for("hospital-3 training round 1",
                 lambda: "hospital-3 round 1:" in job_log(env, "hospital-3", first), 300, env)
        killed = env.kill_site("hospital-3")
        t_killed = time.monotonic()
        state = checkpoint / "state.json"
        wait_for("round 1 in the checkpoint",
                 lambda: state.is_file() and json.loads(state.read_text())["rounds_done"] >= 2, 180, env)
        t_round1 = time.monotonic()
        env.kill_site("server")
        assert json.loads(state.read_text())["rounds_done"] == 2

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
    print(f"timings: start {t_started - t0:.1f}s, to kill {t_killed - t_started:.1f}s, round 1 without "
          f"hospital-3 {t_round1 - t_killed:.1f}s, restart {t_restarted - t_round1:.1f}s, resumed job "
          f"{time.monotonic() - t_restarted:.1f}s; first job after restart: {first_status}; harness {env.timings}")
    assert killed and workspace_processes(env.workspace) == {}
    assert status == "FINISHED:COMPLETED", (status, env.log_paths(second))

    log = load_metrics(Path(result) / "workspace" / "flare_lora" / "metrics.json")
    assert not log.get("error"), log.get("error")
    assert log["resumed"]["from_round"] == 2
    assert [sorted(r["aggregated"]) for r in log["rounds"]] == [SITES, SITES[:2], SITES]
    assert log["rounds"][1]["sites"]["hospital-3"].get("missing"), log["rounds"][1]["sites"]["hospital-3"]
    final = log["final"]["sites"]
    assert sorted(final) == SITES and {e["merged_rounds"] for e in final.values()} == {3}
    assert len({e["base_digest"] for e in final.values()}) == 1, final

    # the adapter is the checkpointed rounds 0-1 (written before the crash) plus round 2, stacked
    rounds = RoundCheckpoint(str(checkpoint)).load(json.loads((checkpoint / "state.json").read_text())["identity"])
    assert len(rounds.rounds) == 3
    adapter = load_file(Path(result) / "workspace" / "flare_lora" / "adapter" / "adapter_model.safetensors")
    expected, _ = FLoRA.final(rounds.rounds)
    assert adapter.keys() == expected.keys()
    assert all(adapter[k].equal(expected[k]) for k in expected)
    print(f"provisioned deployment, site crash, server restart, resume: {time.monotonic() - t0:.1f}s")
