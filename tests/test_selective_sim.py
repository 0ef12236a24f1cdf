"""Selective-layer fine-tuning: the site task handler on a real tiny model, and FLARE simulator jobs
(nvflare_jobs/selective_layer/job.py) end to end on a 4-layer tiny random Llama."""

import json

import pytest
import sim_jobs
import torch
from conftest import TOKENIZER_DIR

from flare_lora.components.algorithms.layer_average import layer_of
from flare_lora.components.data.synthetic import default_site_data
from flare_lora.components.flare.client_train import SelectiveSite
from flare_lora.components.site_local import SiteLocal
from flare_lora.components.flare.selective_recipe import SelectiveRecipe
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.components.training.lora import add_lora, layer_state, reset_lora
from flare_lora.components.training.models import load_model_and_tokenizer, make_tiny_llama

JOB = sim_jobs.ROOT / "nvflare_jobs" / "selective_layer" / "job.py"
BAD_LAYER_SITE = sim_jobs.SITE_SCRIPTS / "bad_layer_site.py"
CRASHING_TRAINER = sim_jobs.SITE_SCRIPTS / "crashing_trainer.py"


@pytest.fixture(scope="session")
def tiny4_model_dir(tmp_path_factory) -> str:
    """A 4-layer, 64-wide Llama with SmolLM2's tokenizer: K = 4 selectable layers."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), TOKENIZER_DIR, layers=4)


def site(model_dir, mode, budget=2, layer_cap=None):
    model, tokenizer = load_model_and_tokenizer(model_dir)
    cfg = SiteConfig(rank=2, alpha=4.0, local_steps=2, batch_size=2, threads=1, max_eval=4, lr=1e-2)
    if mode == "lora":
        model = add_lora(model, cfg)
        reset_lora(model, 0)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    train, evaluation = default_site_data(0, n_train=8, n_eval=4)
    return SelectiveSite(model, tokenizer, train, evaluation, cfg, site="site-2", mode=mode, budget=budget,
                         score_batches=2, layer_cap=layer_cap)


# --- the site task handler (no FLARE) ------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_site_scores_then_trains_only_its_layers_and_stays_global(tiny4_model_dir, mode):
    s = site(tiny4_model_dir, mode)
    assert s.num_layers == 4
    for criterion in ("grad_norm", "rgn", "snr"):
        _, _, meta = s.handle("score", {}, {"criterion": criterion})
        assert len(meta["scores"]) == 4 and all(x > 0 and x < float("inf") for x in meta["scores"])
        assert meta["budget"] == 2 and meta["criterion"] == criterion
    before_all = {k: v.detach().clone() for k, v in s.model.named_parameters()}
    digest = s.digest()
    update, metrics, meta = s.handle("train", {}, {"layers": [1, 3]}, rnd=0)
    assert "eval_loss" in metrics and meta["layers"] == [1, 3] and meta["num_examples"] == 8
    assert {layer_of(k) for k in update} == {1, 3}
    current = layer_state(s.model, [1, 3], mode)
    assert set(update) == set(current)
    assert any(not torch.equal(update[k], current[k]) for k in update)  # trained, then restored
    # after the task the site holds the global model again (its own training is only in the upload)
    assert s.digest() == digest
    # installing a global layer changes exactly that layer and records its version
    s.install({k: v for k, v in update.items() if layer_of(k) == 1}, {"layer_versions": {"1": 1}})
    assert s.versions == {1: 1}
    changed = {layer_of(k) for k, v in s.model.named_parameters() if not torch.equal(v, before_all[k])}
    assert changed == {1}


def test_site_layer_cap_from_the_site_kit_or_environment(tiny4_model_dir):
    env = {"FLARE_LORA_MAX_LAYERS": "3", "FLARE_LORA_MAX_LAYERS_SITE_2": "1"}
    cap = lambda name, environ, **kit: SiteLocal(site=name, **kit).with_environment(environ).max_layers  # noqa: E731
    assert (cap("site-2", env), cap("site-1", env), cap("site-1", {}), cap("site-2", env, max_layers=2)) == (1, 3, None, 2)
    with pytest.raises(ValueError, match="site 'site-1': FLARE_LORA_MAX_LAYERS='zero'"):
        cap("site-1", {"FLARE_LORA_MAX_LAYERS": "zero"})
    s = site(tiny4_model_dir, "full", budget=3, layer_cap=1)
    _, _, meta = s.handle("score", {}, {})
    assert (meta["budget"], meta["budget_configured"], meta["budget_cap"]) == (1, 3, 1)


def test_recipe_rejects_bad_config_naming_site_and_key(tiny4_model_dir):
    sites = {"site-1": {"budget": 2}, "site-2": {"budget": 5}}
    with pytest.raises(ValueError, match=r"site 'site-2': budget: expected an integer in \[1, 4"):
        SelectiveRecipe(sites=sites, model=tiny4_model_dir)
    with pytest.raises(ValueError, match=r"site 'site-1': budget"):
        SelectiveRecipe(sites={"site-1": {"budget": 0}}, model=tiny4_model_dir)
    with pytest.raises(ValueError, match="lam"):
        SelectiveRecipe(sites={"site-1": {}}, model=tiny4_model_dir, lam=-1)
    with pytest.raises(ConfigError, match="site 'site-2': key 'rank': mode 'lora' needs the same"):
        SelectiveRecipe(sites={"site-1": {"rank": 2}, "site-2": {"rank": 4}}, model=tiny4_model_dir)
    with pytest.raises(ConfigError, match="snr"):
        SelectiveRecipe(sites={"site-1": {}}, model=tiny4_model_dir, selection="snr", score_batches=1)
    recipe = SelectiveRecipe(sites={"site-1": {"rank": 2}, "site-2": {"rank": 4}}, model=tiny4_model_dir, mode="full")
    assert recipe.num_layers == 4


def test_server_vets_scores_and_updates_naming_the_site():
    """The controller's checks, without a running FLARE server: bad reports are rejected, logged
    in the round record with the site's name, and leave no selection behind."""
    from nvflare.app_common.abstract.fl_model import FLModel

    from flare_lora.components.flare.selective_controller import SelectiveController
    from flare_lora.components.strategies.aggregators import PlainLayers

    c = SelectiveController(num_layers=4, site_budgets={"site-2": 3})
    c.site_scores, c.assigned, c.K, c.known_shapes, c.layer_keys = {}, {}, 4, {}, None
    c.aggregator, c.log = PlainLayers(), {"num_layers": 4}

    def vet(check, entry):  # as the workflow vets every site result
        return c.vet(0, "site-2", entry, check)
    cases = [
        ({"scores": [1, float("nan"), 1, 1], "budget": 2}, "site 'site-2': scores: layer 1 is nan"),
        ({"scores": [1, 1, float("inf"), 1], "budget": 2}, "site 'site-2': scores: layer 2 is inf"),
        ({"scores": [1, 1, 1], "budget": 2}, "site 'site-2': scores: expected 4 numbers (one per layer), got 3"),
        ({"budget": 2}, "site 'site-2': scores: expected a list of 4 numbers"),
        ({"scores": [1, 1, 1, 1], "budget": 0}, "site 'site-2': budget: expected an integer in [1, 4"),
        ({"scores": [1, 1, 1, 1], "budget": 5}, "site 'site-2': budget: expected an integer in [1, 4"),
    ]
    for meta, message in cases:
        entry = {}
        vet(lambda: c.vet_scores(0, "site-2", FLModel(metrics={}, meta=meta), entry), entry)
        assert message in entry["rejected"], (meta, entry)
        assert "site-2" not in c.site_scores
    entry = {}
    vet(lambda: c.vet_scores(0, "site-2", FLModel(metrics={}, meta={"scores": [4, 3, 2, 1], "budget": 4}), entry), entry)
    assert c.site_scores["site-2"] == ([4.0, 3.0, 2.0, 1.0], 3)  # clamped to the job's budget
    # an update carrying a layer the site was not assigned is rejected; the assigned one passes
    c.assigned["site-2"] = [1]
    good = {"model.layers.1.mlp.up_proj.weight": torch.ones(2, 2)}
    entry = {}
    bad = FLModel(params={**good, "model.layers.3.mlp.up_proj.weight": torch.ones(2, 2)}, meta={"num_examples": 4})
    assert vet(lambda: c.vet_update("site-2", bad), entry) is None
    assert "returned layer(s) [3] it was not assigned (assigned [1])" in entry["rejected"]
    assert vet(lambda: c.vet_update("site-2", FLModel(params=good, meta={"num_examples": 4})), {})[0] == "site-2"


# --- FLARE simulator jobs ------------------------------------------------------------------


def run_job(tmp_path, model_dir, *args, **kwargs):
    return sim_jobs.run_job(tmp_path, model_dir, *args, job=JOB, **kwargs)


@pytest.mark.e2e
def test_selective_lora_job_with_heterogeneous_budgets_an_admin_cap_and_a_crash(tmp_path, tiny4_model_dir):
    """site-1's training process dies in its second train task (tests/sites/crashing_trainer.py): round 1
    goes on with the others; in round 2 a new process, sent every global layer (its state is
    unknown), not only those round 1 updated, scores and trains with them, so all sites end with
    the same model."""
    log, results, proc = run_job(
        tmp_path, tiny4_model_dir, "--budgets", "4,1,3", "--rounds", "3", "--lam", "0.1", "--rank", "2",
        "--min-clients", "2", "--site-script", f"site-1={CRASHING_TRAINER}",
        env_extra={"FLARE_LORA_MAX_LAYERS_SITE_3": "2",  # site-3's admin caps the job's 3 layers at 2
                   "CRASH_AFTER_TRAININGS": "1"},
    )  # fmt: skip
    assert log["selection"] == "selective" and log["mode"] == "lora" and log["num_layers"] == 4
    assert len(log["rounds"]) == 3 and len(log["selections"]) == 3
    for sel in log["selections"]:
        assert sel["budgets"] == {"site-1": 4, "site-2": 1, "site-3": 2}
        for s, layers in sel["layers"].items():
            assert len(layers) <= sel["budgets"][s]
    assert log["rounds"][1]["sites"]["site-1"].get("missing")
    # round 0 (site-1: every layer) updated a layer that round 1 (at most 1 + 2 layers) did not;
    # the new process had it too when it scored round 2: every site scored the same layers
    assert set(log["rounds"][0]["layers_updated"]) - set(log["rounds"][1]["layers_updated"])
    for record in log["rounds"]:
        assert len({e["score_digest"] for e in record["sites"].values()}) == 1, record["sites"]
    everyone = ["site-1", "site-2", "site-3"]
    for record, sel, sites in zip(log["rounds"], log["selections"], (everyone, everyone[1:], everyone)):
        assert sorted(record["aggregated"]) == sites
        trained = sorted({l for s in sites for l in sel["layers"][s]})
        assert record["layers_updated"] == trained
        for s in sites:
            entry = record["sites"][s]
            assert entry["layers"] == sel["layers"][s] and entry["budget_cap"] == (2 if s == "site-3" else None)
    # every site ends holding the same model; the adapter is a loadable PEFT adapter
    digests = {s: e["digest"] for s, e in log["final"]["sites"].items()}
    assert len(digests) == 3 and len(set(digests.values())) == 1, digests
    assert "layer selections" in proc.stdout and "site-3" in proc.stdout

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny4_model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, results / "adapter").merge_and_unload().state_dict()
    changed = {layer_of(k) for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed and changed <= {int(k) for k in log["rounds"][-1]["layer_versions"]}


@pytest.mark.e2e
def test_full_mode_rejects_a_site_that_trains_an_unassigned_layer(tmp_path, tiny4_model_dir):
    log, results, proc = run_job(
        tmp_path, tiny4_model_dir, "--mode", "full", "--selection", "snr", "--budgets", "2,1,2", "--sel-gap", "2",
        "--rounds", "2", "--min-clients", "2", "--in-process", "--site-script", f"site-3={BAD_LAYER_SITE}",
    )  # fmt: skip
    assert log["mode"] == "full" and log["selection"] == "snr"
    # --sel-gap 2: one selection (round 0); round 1 reuses it without a score task
    assert [sel["round"] for sel in log["selections"]] == [0]
    assert [e["assigned"] for e in log["rounds"][0]["sites"].values()] == [e["assigned"] for e in log["rounds"][1]["sites"].values()]
    assert "score_upload_bytes" in log["rounds"][0]["sites"]["site-1"]
    assert "score_upload_bytes" not in log["rounds"][1]["sites"]["site-1"]
    for record in log["rounds"]:
        assert sorted(record["aggregated"]) == ["site-1", "site-2"]
        rejected = record["sites"]["site-3"]["rejected"]
        assert "it was not assigned" in rejected, rejected
        assert record["layers_updated"] == sorted({l for s in ("site-1", "site-2") for l in record["sites"][s]["layers"]})
    assert "rejected update from site-3" in (proc.stdout + proc.stderr)
    digests = {s: e.get("digest") for s, e in log["final"]["sites"].items() if s != "site-3"}
    assert len(set(digests.values())) == 1 and None not in digests.values()
    from safetensors.torch import load_file

    layers = load_file(results / "layers.safetensors")
    assert {layer_of(k) for k in layers} == {int(k) for k in log["rounds"][-1]["layer_versions"]}


@pytest.mark.e2e
def test_job_config_errors_fail_before_the_job_starts(tmp_path, tiny4_model_dir):
    overrides = tmp_path / "sites.json"
    overrides.write_text(json.dumps({"site-2": {"budget": 9}}))  # K = 4
    _, _, proc = run_job(tmp_path, tiny4_model_dir, "--site-config", str(overrides), expect_ok=False)
    assert proc.returncode == 2 and not (tmp_path / "ws").exists()
    assert "site 'site-2': budget: expected an integer in [1, 4" in proc.stderr, proc.stderr[-2000:]
