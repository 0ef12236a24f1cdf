"""One-shot federated fine-tuning: arrival-order folding (pure), the recipe's config checks, a
SimEnv job, and a POC job that loses a site mid-training and still completes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX, InvalidUpdate, module_prefixes
from flare_lora.components.algorithms.one_shot import OnlineAverage, OnlineStack
from flare_lora.components.report import load_metrics

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "nvflare_jobs" / "one_shot" / "job.py"
PREFIXES = ["m.layers.0.q_proj", "m.layers.1.v_proj"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def lora(rank: int, seed: int, out_dim: int = 12, in_dim: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for p in PREFIXES:
        state[p + LORA_A_SUFFIX] = torch.randn(rank, in_dim, generator=g)
        state[p + LORA_B_SUFFIX] = torch.randn(out_dim, rank, generator=g)
    return state


def dense(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(50, 8, generator=g), "layers.0.mlp.weight": torch.randn(8, 8, generator=g) * 1e3}


# ------------------------------------------------------------------------------------- pure core

def test_running_average_is_arrival_order_independent_and_exact_after_each_arrival():
    sites = {f"site-{k}": (dense(k), w) for k, w in enumerate([3, 17, 5, 40])}
    finals = []
    for order in itertools.permutations(sites):
        fold = OnlineAverage()
        for n, site in enumerate(order, start=1):
            fold.add(*sites[site], site=site)
            arrived = order[:n]
            total = sum(sites[s][1] for s in arrived)
            got = fold.result()
            for key in got:
                want = sum(sites[s][0][key].double() * sites[s][1] for s in arrived) / total
                assert rel_err(got[key], want) <= 1e-6
            assert fold.sites == list(arrived)
        finals.append(fold.result())
    for other in finals[1:]:
        for key, value in finals[0].items():
            assert rel_err(other[key], value) <= 1e-6


def test_incremental_stacking_is_arrival_order_independent_and_exact_after_each_arrival():
    sites = {"site-a": (lora(2, 1), 10, 2.0), "site-b": (lora(4, 2), 30, 0.5), "site-c": (lora(8, 3), 20, 1.0)}
    finals = []
    for order in itertools.permutations(sites):
        fold = OnlineStack()
        for n, site in enumerate(order, start=1):
            state, weight, scaling = sites[site]
            fold.add(state, weight, scaling, site)
            arrived = order[:n]
            total = sum(sites[s][1] for s in arrived)
            got = fold.result()
            for p in PREFIXES:
                product = got[p + LORA_B_SUFFIX] @ got[p + LORA_A_SUFFIX]
                want = sum(sites[s][1] / total * sites[s][2] * sites[s][0][p + LORA_B_SUFFIX].double()
                           @ sites[s][0][p + LORA_A_SUFFIX].double() for s in arrived)
                assert rel_err(product, want) <= 1e-6
                assert got[p + LORA_A_SUFFIX].shape[0] == sum(sites[s][0][p + LORA_A_SUFFIX].shape[0] for s in arrived)
        finals.append(fold.result())
    for other in finals[1:]:  # the stacked factors themselves, not only their product
        assert all(torch.equal(other[k], v) for k, v in finals[0].items())


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"embed.weight": torch.zeros(50, 8)}, "missing"),
        ({**dense(9), "extra.weight": torch.zeros(2)}, "unexpected"),
        ({**dense(9), "embed.weight": torch.zeros(49, 8)}, "expected shape"),
        ({**dense(9), "embed.weight": torch.full((50, 8), float("nan"))}, "NaN"),
    ],
)
def test_a_bad_update_is_rejected_and_leaves_the_average_untouched(bad, match):
    fold = OnlineAverage()
    fold.add(dense(0), 2, "site-1")
    before = fold.result()
    with pytest.raises(InvalidUpdate, match=match):
        fold.add(bad, 5, "site-2")
    with pytest.raises(InvalidUpdate, match="already contributed"):
        fold.add(dense(1), 5, "site-1")
    with pytest.raises(InvalidUpdate, match="weight"):
        fold.add(dense(1), 0, "site-3")
    assert fold.sites == ["site-1"]
    assert all(torch.equal(fold.result()[k], v) for k, v in before.items())


def test_a_bad_lora_update_is_rejected_and_leaves_the_stack_untouched():
    fold = OnlineStack()
    fold.add(lora(2, 0), 1, 2.0, "site-1", rank=2)
    before = fold.result()
    with pytest.raises(InvalidUpdate, match="expected rank 4"):
        fold.add(lora(2, 1), 1, 2.0, "site-2", rank=4)
    with pytest.raises(InvalidUpdate, match="expected \\(out, in\\)"):
        fold.add(lora(4, 1, in_dim=11), 1, 2.0, "site-2", rank=4)
    nan = lora(4, 1)
    nan[PREFIXES[0] + LORA_B_SUFFIX][0, 0] = float("inf")
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        fold.add(nan, 1, 2.0, "site-2", rank=4)
    assert fold.sites == ["site-1"]
    assert all(torch.equal(fold.result()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"deadline": 0}, "deadline: expected seconds > 0, got 0"),
        ({"min_sites": 4}, r"min_sites: expected an int in \[1, 3\]"),
        ({"late_grace": -1}, "late_grace"),
        ({"method": "zero_pad"}, "method: expected one of"),
        ({"method": "fedit", "sites": {"site-1": {"rank": 2}, "site-2": {"rank": 4}}},
         "site 'site-2': key 'rank': fedit needs the same value at every site"),
        ({"task_timeout": 60}, "task_timeout: not an option of the one-shot job"),
        ({"checkpoint_dir": "ckpt"}, "checkpoint_dir: not an option of the one-shot job"),
        ({"method": "shared_a", "he": True}, "one-shot shared_a cannot fold ciphertexts"),
    ],
)
def test_recipe_config_errors_before_the_job_starts(kwargs, match, tiny_model_dir):
    from flare_lora.components.flare.one_shot_recipe import OneShotRecipe
    from flare_lora.components.training.config import ConfigError

    kwargs = {"sites": {f"site-{k}": {"rank": 2, "alpha": 4} for k in (1, 2, 3)}, **kwargs}
    with pytest.raises(ConfigError, match=match):
        OneShotRecipe(model=str(tiny_model_dir), **kwargs)


def test_controller_refuses_lora_bounds_for_full_weights():
    """Used directly (not through a recipe): an option that would not be honoured is an error."""
    from flare_lora.components.flare.one_shot_controller import OneShotController

    with pytest.raises(ValueError, match="max_update_norm: applies to LoRA factors"):
        OneShotController(method="full", sites=["site-1"], max_update_norm=5.0)
    assert OneShotController(method="full", sites=["site-1"]).max_update_norm is None
    assert OneShotController(method="flora", sites=["site-1"]).limits.max_update_norm == 100.0


# ------------------------------------------------------------------------------------ end to end

def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_job(tmp_path, model_dir, *args) -> tuple[dict, Path, subprocess.CompletedProcess]:
    results = tmp_path / "results"
    cmd = [sys.executable, str(JOB), "--model", str(model_dir), "--workspace", str(tmp_path / "ws"),
           "--results", str(results), "--steps", "2", "--batch-size", "2", "--threads", "1", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return load_metrics(results / "metrics.json"), results, proc


@pytest.mark.e2e
def test_one_shot_stacking_job_in_the_simulator(tmp_path, tiny_model_dir):
    """3 sites, ranks 2/4/8, in-process: one round, every arrival folded and persisted, one adapter."""
    from safetensors.torch import load_file

    log, results, proc = run_job(tmp_path, tiny_model_dir, "--ranks", "2,4,8", "--in-process", "--evaluate-global")
    assert log["protocol"] == "one_shot" and len(log["rounds"]) == 1 and not log.get("error")
    arrivals = log["arrivals"]
    assert sorted(a["site"] for a in arrivals) == ["site-1", "site-2", "site-3"]
    for n, arrival in enumerate(arrivals, start=1):  # the global after each arrival names its sites
        assert sorted(arrival["global_sites"]) == sorted(a["site"] for a in arrivals[:n])
    assert sorted(log["rounds"][0]["aggregated"]) == ["site-1", "site-2", "site-3"]
    persisted = load_file(results / "global.safetensors")
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    assert {persisted[p + LORA_A_SUFFIX].shape[0] for p in module_prefixes(persisted)} == {2 + 4 + 8}
    assert all(torch.equal(persisted[k], adapter[k]) for k in persisted)
    # --evaluate-global: every site measured the final global; nothing else was sent
    final = log["final"]["sites"]
    assert sorted(final) == ["site-1", "site-2", "site-3"] and all("eval_loss" in e["metrics"] for e in final.values())
    table = proc.stdout[proc.stdout.index("round  site"):]
    assert "site-3" in table and "adapter:" in proc.stdout


@pytest.mark.e2e
def test_poc_one_shot_completes_without_a_site_killed_mid_training(tmp_path, tiny_model_dir):
    """Full-parameter one-shot in an isolated POC: site-3 is killed (by pid) while training; past
    the deadline the job finishes with site-1 and site-2 and the log names site-3 as missing."""
    from safetensors.torch import load_file

    from flare_lora.components.flare.one_shot_recipe import OneShotRecipe
    from poc_harness import isolated_poc, workspace_processes

    common = {"threads": 1, "batch_size": 2, "local_steps": 2, "lr": 1e-4}
    sites = {"site-1": dict(common), "site-2": dict(common), "site-3": dict(common, local_steps=100000)}
    recipe = OneShotRecipe(sites=sites, name="one_shot_kill", method="full", min_sites=2, deadline=30,
                           timeout=300, model=str(tiny_model_dir))
    recipe.add_server_config({"dead_client_grace_period": 0})  # act on the server's dead-site report at once
    workspace = tmp_path / "poc"
    t0 = time.monotonic()
    with isolated_poc(list(sites), workspace, home=tmp_path / "home", start=False) as env:
        resources = Path(env.local_dir("server"), "resources.json")  # declare a silent site dead after 15 s
        config = json.loads(resources.read_text())
        config["servers"][0]["heart_beat_timeout"] = 15
        resources.write_text(json.dumps(config))
        run = recipe.execute(env)
        killed, seen = [], []
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up and not killed:  # site-3's trainer is running: kill the site
            seen = [cmdline(p) for p in env.pids()["site-3"].all]
            if any("client_train.py" in c for c in seen):
                time.sleep(1)
                killed = env.kill_site("site-3")
            time.sleep(0.5)
        assert killed, f"site-3 never started training (job {run.get_status()}); its processes: {seen}"
        result = run.get_result(timeout=300, clean_up=False)
        status = run.get_status()
    print(f"one-shot POC with a killed site: {time.monotonic() - t0:.1f}s")
    assert status == "FINISHED:COMPLETED", status
    log = load_metrics(next(Path(result).rglob("flare_lora/metrics.json")))
    assert sorted(log["rounds"][0]["aggregated"]) == ["site-1", "site-2"]
    assert log["rounds"][0]["sites"]["site-3"].get("missing") is True
    server_logs = " ".join(p.read_text(errors="replace") for p in Path(result).rglob("log.txt"))
    assert "finishing without ['site-3']" in server_logs
    weights = load_file(next(Path(result).rglob("flare_lora/global.safetensors")))
    assert "model.embed_tokens.weight" in weights  # full parameters, not LoRA factors
    assert workspace_processes(workspace) == {}
