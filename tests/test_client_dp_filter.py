"""ClientDPFilter on any job's result (privacy/flare/client_dp_filter.py): the real filter's ``process``
on real nvflare Shareables, DXOs and FLContexts, and a POC where a site's ``default_scope`` adds it to
NVFlare's own FedAvg recipe, which knows nothing of flare-lora."""

from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DataKind
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from flare_lora.privacy.client_dp import update_norm
from flare_lora.components.algorithms.lora_init import fresh_factor
from flare_lora.components.algorithms.lora_init import init_seed
from flare_lora.privacy.dp_reference import INIT_SEED_KEY
from flare_lora.privacy.flare.client_dp_filter import KEEP_TASKS, ClientDPFilter
from test_dp import filter_call, state

ROOT = Path(__file__).resolve().parents[1]
SITES = ["site-1", "site-2"]
CLIP = 0.05


def privacy_json_pair(**args):
    """The data filter and the result filter of one privacy.json scope: two separate instances."""
    return ClientDPFilter(clip=CLIP, **args), ClientDPFilter(clip=CLIP, **args)


def numpy_state(seed, scale=1.0):
    return {k: v.numpy() for k, v in state(seed, scale).items()}


def test_weights_result_is_the_received_global_plus_the_clipped_change():
    received, change = numpy_state(0), numpy_state(1, scale=0.01)  # ‖change‖ ≈ 0.3, clipped to 0.05
    data_filter, result_filter = privacy_json_pair(sigma=1e-6)
    kept = filter_call(data_filter, received, {}, 0, direction=FilterKey.IN, task="t1")
    assert all(kept.data[k] is received[k] for k in received)  # the task data goes on untouched
    global_weights = {k: v.copy() for k, v in received.items()}
    for v in kept.data.values():  # an in-process trainer may overwrite what it received
        v += 1.0
    result = {k: global_weights[k] + change[k] for k in received}
    out = filter_call(result_filter, result, {}, 0, task="t1")
    assert all(isinstance(v, np.ndarray) for v in out.data.values())
    released = {k: torch.from_numpy(out.data[k] - global_weights[k]) for k in result}
    assert update_norm(released) == pytest.approx(CLIP, rel=1e-3)
    scale = CLIP / update_norm({k: torch.from_numpy(v) for k, v in change.items()})
    for k in released:  # the change against the kept global, only shorter: that global was the reference
        torch.testing.assert_close(released[k], torch.from_numpy(change[k]) * scale, rtol=1e-3, atol=1e-5)
    assert out.meta["client_dp"]["releases"] == 1
    with pytest.raises(ValueError, match="nothing was kept for task t1"):  # used once, then dropped
        filter_call(result_filter, result, {}, 1, task="t1")


def test_weight_diff_is_clipped_and_holds_exactly_the_sent_entries():
    change = state(1, scale=0.01)
    data_filter, result_filter = privacy_json_pair(sigma=1e-6)
    filter_call(data_filter, state(0), {}, 0, direction=FilterKey.IN, task="diff", job="diff-job")
    out = filter_call(result_filter, change, {}, 0, kind=DataKind.WEIGHT_DIFF, task="diff", job="diff-job")
    assert update_norm(out.data) == pytest.approx(CLIP, rel=1e-3)
    assert out.meta["client_dp"]["releases"] == 1
    filter_call(data_filter, state(0), {}, 1, direction=FilterKey.IN, task="diff1", job="diff-job")
    with pytest.raises(ValueError, match="WEIGHT_DIFF result must hold exactly the entries the server sent"):
        filter_call(result_filter, {**change, "extra": torch.zeros(2)}, {}, 1, kind=DataKind.WEIGHT_DIFF,
                    task="diff1", job="diff-job")


def released_change(out, reference):
    return update_norm({k: torch.as_tensor(out.data[k]) - reference[k] for k in reference})


@pytest.mark.parametrize("method", ["flora", "fedit", "zero_pad"])
def test_the_reference_is_derived_from_the_task_whatever_the_job_says(method):
    """A hostile job's result: it claims its own reference (the old meta entry, pointing at a file it
    wrote), trains from elsewhere, adds meta and odd keys order. The release is the filter's reference
    plus at most C (sigma tiny), in sorted order, with allow-listed meta only."""
    rank, alpha, job_global = 8, 16.0, {k: v * 3 for k, v in state(0).items()}
    data_filter, result_filter = privacy_json_pair(sigma=1e-6)
    sent = {f"r0/{k}": v for k, v in job_global.items()} if method == "flora" else job_global
    job = f"hostile-{method}"
    task = filter_call(data_filter, sent, {"method": method}, 2, direction=FilterKey.IN, task="x", job=job)
    seed = task.meta[INIT_SEED_KEY]
    assert seed == init_seed(job, 2)
    if method == "flora":
        reference = {k: fresh_factor(seed, k, tuple(v.shape)) for k, v in job_global.items()}
    elif method == "fedit":
        reference = job_global
    else:
        reference = {k: v if "lora_A" in k else v / (alpha / rank) for k, v in job_global.items()}
    forged = {k: v + 5.0 for k, v in reversed(list(reference.items()))}  # far from where it "started"
    meta = {"rank": rank, "alpha": alpha, "num_examples": 10**6, "base_digest": "data:" + "ab" * 30,
            "update_reference": {"path": "/tmp/forged.safetensors", "digest": "0" * 64}, "merged_rounds": 0,
            "train": {"steps": 3, "train_loss": 0.123, "note": "secret"}, 7: "non-str key"}
    out = filter_call(result_filter, forged, meta, 2, task="x", job=job)
    assert released_change(out, reference) == pytest.approx(CLIP, rel=1e-3)
    assert list(out.data) == sorted(reference)
    assert out.meta["num_examples"] == 1 and set(out.meta["train"]) == {"seconds"}  # measured by the filter
    assert out.meta["merged_rounds"] == 1  # what the tasks installed (FLoRA: r0), not the job's 0
    for withheld in ("base_digest", "update_reference", 7):
        assert withheld not in out.meta
    assert set(out.meta) == {"rank", "alpha", "num_examples", "merged_rounds", "train", "initial_metrics", "client_dp"}
    # entries the task does not fix, non-finite values, other kinds and failed results never leave
    filter_call(data_filter, sent, {"method": method}, 4, direction=FilterKey.IN, task="z", job=job)
    with pytest.raises(ValueError, match="not finite"):
        filter_call(result_filter, {**forged, "m.lora_A.weight": forged["m.lora_A.weight"] * float("nan")}, meta, 4,
                    task="z", job=job)
    # rank and alpha are pinned at the job's first release at this site (or named by the server's task):
    # a later change is refused where the reference depends on them, and never released
    filter_call(data_filter, sent, {"method": method}, 3, direction=FilterKey.IN, task="y", job=job)
    if method == "zero_pad":
        with pytest.raises(ValueError, match="differ from this job's"):
            filter_call(result_filter, forged, {**meta, "alpha": 32.0}, 3, task="y", job=job)
    else:
        assert filter_call(result_filter, forged, {**meta, "alpha": 32.0}, 3, task="y", job=job).meta["alpha"] == alpha


def test_metrics_results_and_their_meta_are_rebuilt_from_the_allow_list():
    _, result_filter = privacy_json_pair(sigma=1.0)
    metrics = {"eval_loss": 1.5, "note": "secret", "x" * 100: 1.0, "nan": float("nan"), "client_dp": 0.0}
    out = filter_call(result_filter, metrics, {"base_digest": "ab" * 32, "client_dp": {"epsilon": 0}}, 0,
                      kind=DataKind.METRICS, task="validate")
    assert out.data == {"eval_loss": 1.5, "client_dp": 0.0}
    assert "base_digest" not in out.meta and "client_dp" not in out.meta  # a job cannot forge the filter's report
    scores = {"scores": [0.3, 0.9], "budget": 2, "num_layers": 2, "criterion": "grad_norm", "digest": "ab" * 32}
    out = filter_call(result_filter, {}, scores, 0, kind=DataKind.METRICS, task="score")  # a selective site's scores
    assert out.meta["scores"] == [0.0, 0.0] and out.meta["dp_scores"] == "withheld"
    assert (out.meta["budget"], out.meta["criterion"]) == (2, "grad_norm") and "digest" not in out.meta


def test_other_kinds_and_failed_results_never_carry_data_out():
    from nvflare.apis.dxo import DXO
    from nvflare.apis.fl_constant import ReturnCode

    _, result_filter = privacy_json_pair(sigma=1.0)
    ctx = FLContext()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.OUT, private=True, sticky=False)
    failed = DXO(DataKind.WEIGHTS, data=state(0)).to_shareable()
    failed.set_return_code(ReturnCode.EXECUTION_EXCEPTION)  # a job's process may set any code with any payload
    reply = result_filter.process(failed, ctx)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "DXO" not in reply
    collection = DXO(DataKind.COLLECTION, data={"inner": DXO(DataKind.WEIGHTS, data=state(0))}).to_shareable()
    with pytest.raises(ValueError, match="cannot privatise a DataKind.COLLECTION result"):
        result_filter.process(collection, ctx)
    with pytest.raises(ValueError, match="not a valid DXO"):
        result_filter.process(Shareable({"weights": state(0)}), ctx)


def test_encrypted_global_of_an_averaging_job_fails_closed_naming_the_fix():
    data_filter, result_filter = privacy_json_pair(sigma=1.0)
    filter_call(data_filter, {"m.lora_A.weight": b"ciphertext"}, {"method": "fedit"}, 1, direction=FilterKey.IN, task="he")
    with pytest.raises(ValueError, match="arrived encrypted.*enable client DP in the job"):
        filter_call(result_filter, state(0), {}, 1, task="he")


def test_weights_without_a_kept_global_fail_closed_and_tell_the_admin():
    data_filter, result_filter = privacy_json_pair(sigma=1.0)
    raw = Shareable()  # not a DXO (e.g. a custom job): passes the data filter, nothing is kept
    ctx = FLContext()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    assert data_filter.process(raw, ctx) is raw
    filter_call(data_filter, state(0), {}, 0, direction=FilterKey.IN, task="other-task")
    with pytest.raises(ValueError, match="add ClientDPFilter to the scope's task_data_filters .* as well"):
        filter_call(result_filter, state(0), {}, 0, task="this-task")


def test_a_result_entry_missing_from_the_global_fails_closed_naming_it():
    data_filter, result_filter = privacy_json_pair(sigma=1.0)
    filter_call(data_filter, state(0), {}, 0, direction=FilterKey.IN, task="t")
    with pytest.raises(ValueError, match=r"entries differ from what the task fixes .*\['new_head.bias'\]"):
        filter_call(result_filter, {**state(0), "new_head.bias": torch.zeros(3)}, {}, 0, task="t")


def test_metrics_pass_unchanged_and_only_the_latest_globals_are_kept():
    data_filter, result_filter = privacy_json_pair(sigma=1.0)
    metrics = filter_call(result_filter, {"eval_loss": 1.0}, {}, 0, kind=DataKind.METRICS, task="validate")
    assert metrics.data == {"eval_loss": 1.0} and "client_dp" not in metrics.meta
    for i in range(KEEP_TASKS + 1):
        filter_call(data_filter, state(0), {}, 0, direction=FilterKey.IN, task=f"t{i}")
    with pytest.raises(ValueError, match="nothing was kept for task t0"):
        filter_call(result_filter, state(0), {}, 0, task="t0")
    filter_call(result_filter, state(0), {}, 0, task=f"t{KEEP_TASKS}")


def test_a_second_client_dp_filter_on_the_same_result_says_so():
    data_filter, result_filter = privacy_json_pair(sigma=1.0)
    filter_call(data_filter, state(0), {}, 0, direction=FilterKey.IN, task="t")
    out = filter_call(result_filter, state(1), {}, 0, task="t")
    with pytest.raises(ValueError, match="already released this result"):
        filter_call(ClientDPFilter(clip=CLIP, sigma=1.0), out.data, out.meta, 0, task="t")


@pytest.mark.e2e
def test_poc_default_scope_privatises_nvflare_fedavg_full_and_diff(tmp_path):
    """site-2's admin installs the example privacy.json (data and result filter, default scope); NVFlare's
    FedAvg recipe with a plain Client API script completes in FULL and in DIFF mode, site-2 releases
    every round, and site-1 (no privacy.json) sends its updates as they are."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import TransferType

    from poc_harness import isolated_poc

    privacy = (ROOT / "privacy" / "examples" / "privacy.json").read_text()
    model = {"class_path": "torch.nn.Linear", "args": {"in_features": 4, "out_features": 1}}
    with isolated_poc(SITES, tmp_path / "poc", local_files={"site-2": {"privacy.json": privacy}}) as env:
        for transfer in (TransferType.FULL, TransferType.DIFF):
            recipe = FedAvgRecipe(name=f"fedavg_{transfer.lower()}", min_clients=2, num_rounds=2, model=model,
                                  train_script=str(ROOT / "tests" / "sites" / "fedavg_tiny.py"),
                                  params_transfer_type=transfer)
            job_id = recipe.run(env).get_job_id()  # not Run.get_result: it stops the POC
            result_dir, status = env.get_job_result(job_id, timeout=300), env.get_job_status(job_id)
            assert status == "FINISHED:COMPLETED" and result_dir, (transfer, status)
            logs = env.log_paths(job_id)
            site2 = Path(logs["site-2"]["job_log"]).read_text(errors="replace")
            for rnd in range(2):
                assert f"client DP: site-2 round {rnd}: change of norm" in site2, site2[-3000:]
            site1 = Path(logs["site-1"]["job_log"]).read_text(errors="replace")
            assert "client DP" not in site1 and "Processing error" not in site1 + site2
            (server,) = Path(result_dir).rglob("log.txt")
            assert server.read_text(errors="replace").count("Aggregated 2/2 results") == 2  # both sites, each round
    ledger = Path(env.site_dir("site-2")) / "flare_lora_privacy" / "client_dp.jsonl"
    assert len(ledger.read_text().splitlines()) == 4  # 2 jobs x 2 rounds, in the site workspace
    assert not (Path(env.site_dir("site-1")) / "flare_lora_privacy").exists()
