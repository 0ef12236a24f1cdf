"""Strategy objects, update vetting, wire helpers and the adapter artefact — real torch and peft."""

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flare_lora.components.adapter_export import save_adapter
from flare_lora.components.algorithms.lora_state import InvalidUpdate, lora_module_shapes, product_norms
from flare_lora.components.algorithms.merge import weights_digest
from flare_lora.components.flare.site_args import from_args, to_args
from flare_lora.components.strategies import SiteUpdate, check_update, get_method, pack_rounds, unpack_rounds
from flare_lora.components.strategies.base import UpdateLimits, check_limits
from flare_lora.components.report import comm_totals, format_table, per_round
from flare_lora.components.training.config import SiteConfig
from flare_lora.components.training.lora import add_lora, base_weights, lora_state
from flare_lora.components.training.models import load_model_and_tokenizer
from flare_lora.components.training.module_shapes import target_module_shapes


def site_model(model_dir, rank, seed=0):
    model, _ = load_model_and_tokenizer(str(model_dir))
    return add_lora(model, SiteConfig(rank=rank, alpha=2.0 * rank, seed=seed))


def trained_state(peft_model, seed):
    """A stand-in for local training: random non-zero factors of the model's own shapes."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in lora_state(peft_model).items()}


def test_flora_round_trip_keeps_sites_identical_and_equals_stacked_sum(tiny_model_dir):
    method = get_method("flora")
    sites = [site_model(tiny_model_dir, r, seed=i) for i, r in enumerate((2, 4, 8))]
    before = {k: v.clone() for k, v in base_weights(sites[0]).items()}
    updates = [
        SiteUpdate(f"site-{i}", trained_state(m, i), 10 * (i + 1), m.peft_config["default"].r, 2.0 * m.peft_config["default"].r)
        for i, m in enumerate(sites)
    ]
    rounds = [method.aggregate(updates)]
    merged = [method.install(m, method.payload(rounds, 0), 0, seed=7) for m in sites]
    assert merged == [1, 1, 1]
    assert len({weights_digest(base_weights(m)) for m in sites}) == 1
    # the merged delta is exactly sum_k p_k s_k B_k A_k
    p = [u.num_examples / 60 for u in updates]
    for name, w in base_weights(sites[0]).items():
        prefix = "base_model.model." + name[: -len(".weight")]
        if prefix + ".lora_A.weight" not in updates[0].state:
            assert torch.equal(w, before[name])
            continue
        expected = before[name] + sum(
            pk * u.scaling * u.state[prefix + ".lora_B.weight"] @ u.state[prefix + ".lora_A.weight"]
            for pk, u in zip(p, updates)
        )
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    # after install the fresh adapter adds nothing: B is zero
    assert all(v.abs().sum() == 0 for k, v in lora_state(sites[0]).items() if "lora_B" in k)


def test_flora_late_site_catches_up_to_identical_weights(tiny_model_dir):
    method = get_method("flora")
    early, late = site_model(tiny_model_dir, 2), site_model(tiny_model_dir, 4)
    rounds = []
    for r in range(3):
        rounds.append(method.aggregate([SiteUpdate("a", trained_state(early, 100 + r), 5, 2, 4.0)]))
        method.install(early, method.payload(rounds, r), r, seed=r)
    assert method.install(late, method.payload(rounds, 0), 0, seed=0) == 3
    assert weights_digest(base_weights(late)) == weights_digest(base_weights(early))
    # rounds already merged are skipped; a payload that skips a round is refused, not applied
    assert method.install(late, method.payload(rounds, 0), 3, seed=0) == 3
    assert weights_digest(base_weights(late)) == weights_digest(base_weights(early))
    with pytest.raises(InvalidUpdate, match="do not continue"):
        method.install(late, pack_rounds({5: rounds[0]}), 3, seed=0)


def test_zero_pad_install_truncates_and_unscales(tiny_model_dir):
    method = get_method("zero_pad")
    small, big = site_model(tiny_model_dir, 2), site_model(tiny_model_dir, 4)
    updates = [SiteUpdate("s", trained_state(small, 1), 1, 2, 4.0), SiteUpdate("b", trained_state(big, 2), 3, 4, 8.0)]
    glob = method.aggregate(updates)
    method.install(small, glob, 1, seed=0)
    installed = lora_state(small)
    for key, value in glob.items():
        expected = value[:2] if key.endswith("lora_A.weight") else value[:, :2] / 2.0
        torch.testing.assert_close(installed[key], expected)
    assert method.final([glob])[1] == 1.0


def test_fedit_needs_one_scaling_and_sites_start_equal(tiny_model_dir):
    method = get_method("fedit")
    a, b = site_model(tiny_model_dir, 4, seed=1), site_model(tiny_model_dir, 4, seed=2)
    method.install(a, {}, 0, seed=3)
    method.install(b, {}, 0, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(lora_state(a).values(), lora_state(b).values()))
    with pytest.raises(ValueError, match="one alpha/rank"):
        method.aggregate([SiteUpdate("a", lora_state(a), 1, 4, 8.0), SiteUpdate("b", lora_state(b), 1, 4, 4.0)])


def test_check_update_rejects_bad_updates_naming_the_problem(tiny_model_dir):
    good = trained_state(site_model(tiny_model_dir, 2), 0)
    check_update(SiteUpdate("s", good, 4, 2, 4.0))
    with pytest.raises(InvalidUpdate, match="rank"):
        check_update(SiteUpdate("s", good, 4, 3, 6.0))  # factors are rank 2, site declared 3
    nan = copy.deepcopy(good)
    next(iter(nan.values()))[0, 0] = float("inf")
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        check_update(SiteUpdate("s", nan, 4, 2, 4.0))
    key = next(k for k in good if k.endswith("lora_A.weight"))
    prefix = key[: -len(".lora_A.weight")]
    learned = {prefix: (999, good[key].shape[1])}
    with pytest.raises(InvalidUpdate, match="expected \\(out, in\\)"):
        check_update(SiteUpdate("s", good, 4, 2, 4.0), learned=learned)
    with pytest.raises(InvalidUpdate, match="num_examples"):
        check_update(SiteUpdate("s", good, 0, 2, 4.0))
    with pytest.raises(InvalidUpdate, match="alpha must be a finite number"):
        check_update(SiteUpdate("s", good, 4, 2, float("inf")))


def test_update_limits_pin_modules_bound_weight_and_norm(tiny_model_dir):
    """The base model's shapes, not the first site, decide what a site may send; a site's declared
    weight and each module's ||s*B@A|| are bounded; what torch cannot check for finiteness is refused."""
    shapes = target_module_shapes(str(tiny_model_dir), ["q_proj", "v_proj"])
    model = site_model(tiny_model_dir, 2)
    assert shapes == lora_module_shapes(lora_state(model))  # exactly what PEFT adapts
    limits = UpdateLimits(module_shapes=shapes)
    good = trained_state(model, 0)
    check_update(SiteUpdate("s", good, 4, 2, 4.0), limits, targets=["q_proj", "v_proj"])
    embed = {**good, "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(InvalidUpdate, match="unknown module base_model.model.model.embed_tokens"):
        check_update(SiteUpdate("s", embed, 4, 2, 4.0), limits)
    with pytest.raises(InvalidUpdate, match="not one of the site's target_modules"):
        check_update(SiteUpdate("s", good, 4, 2, 4.0), targets=["q_proj"])  # v_proj too, shapes not pinned
    with pytest.raises(InvalidUpdate, match="exceeds max_examples=1000"):
        check_update(SiteUpdate("s", good, 1001, 2, 4.0), UpdateLimits(shapes, max_examples=1000))
    huge = {k: torch.full_like(v, 1e30) for k, v in good.items()}  # finite; B @ A is inf in float32
    with pytest.raises(InvalidUpdate, match="exceeds max_update_norm=100"):
        check_update(SiteUpdate("s", huge, 4, 2, 4.0), limits)
    norms = product_norms(good, 2.0)
    exact = {p: float(torch.linalg.norm(2.0 * good[p + ".lora_B.weight"] @ good[p + ".lora_A.weight"])) for p in norms}
    assert norms == pytest.approx(exact, rel=1e-5)
    loose = UpdateLimits(shapes, max_update_norm=0)  # 0: no bound
    check_update(SiteUpdate("s", {k: v * 1e6 for k, v in good.items()}, 4, 2, 4.0), loose)
    with pytest.raises(InvalidUpdate, match="float8"):
        check_update(SiteUpdate("s", {k: v.to(torch.float8_e4m3fn) for k, v in good.items()}, 4, 2, 4.0), limits)
    with pytest.raises(InvalidUpdate, match="str key"):
        check_update(SiteUpdate("s", {i: v for i, v in enumerate(good.values())}, 4, 2, 4.0), limits)
    with pytest.raises(ValueError, match="max_update_norm: expected a finite number"):
        check_limits(10, float("inf"))
    with pytest.raises(ValueError, match="target_modules: 'nope' names no linear module"):
        target_module_shapes(str(tiny_model_dir), ["q_proj", "nope"])


def test_a_site_refuses_to_merge_a_bad_global(tiny_model_dir):
    """Behind the server's checks, the site's own: no merging into a non-linear weight, no
    non-finite values, and no half-merged round when one module would overflow."""
    model = site_model(tiny_model_dir, 2)
    before = {k: v.clone() for k, v in base_weights(model).items()}
    good = trained_state(model, 0)
    vocab = model.get_base_model().config.vocab_size  # the embeddings' (out, in) is (vocab, hidden)
    embed = {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(vocab, 2)}
    flora = get_method("flora")
    with pytest.raises(InvalidUpdate, match="embed_tokens.*not a linear layer"):
        flora.install(model, pack_rounds({0: embed}), 0, seed=0)
    overflow = dict(good)
    last = sorted(k for k in good if k.endswith("lora_A.weight"))[-1]
    overflow[last] = torch.full_like(good[last], 1e30)
    overflow[last.replace("lora_A", "lora_B")] = torch.full_like(good[last.replace("lora_A", "lora_B")], 1e30)
    with pytest.raises(ValueError, match="non-finite"):
        flora.install(model, pack_rounds({0: overflow}), 0, seed=0)
    assert all(torch.equal(before[k], v) for k, v in base_weights(model).items())  # nothing merged
    nan = {k: v.clone() for k, v in good.items()}
    nan[last][0, 0] = float("nan")
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        get_method("fedit").install(model, nan, 1, seed=0)


def test_rounds_and_site_args_round_trip():
    state = {"x.lora_A.weight": torch.ones(2, 3)}
    assert list(unpack_rounds(pack_rounds({4: state, 3: state}))) == [3, 4]
    with pytest.raises(InvalidUpdate, match="r<round>"):
        unpack_rounds({"bogus": torch.ones(1)})
    config = {"rank": 4, "alpha": 8.0, "lr": 0.0005, "target_modules": ["q_proj", "v_proj"], "threads": None}
    assert from_args(to_args(config)) == config
    with pytest.raises(ValueError, match="cannot be passed"):
        to_args({"name": "has space"})


def test_saved_adapter_with_mixed_ranks_loads_in_peft_and_applies_exactly(tiny_model_dir, tmp_path):
    flora = get_method("flora")
    m = site_model(tiny_model_dir, 2)
    states = [trained_state(m, 1), trained_state(m, 2)]
    # two rounds where only q_proj of layer 0 got a second site: per-module ranks differ
    extra = {k: v for k, v in trained_state(site_model(tiny_model_dir, 3), 3).items() if "layers.0.self_attn.q_proj" in k}
    r1 = flora.aggregate([SiteUpdate("a", states[0], 1, 2, 4.0), SiteUpdate("b", states[1], 1, 2, 4.0)])
    r2 = flora.aggregate([SiteUpdate("c", extra, 1, 3, 6.0)])
    state, scaling = flora.final([r1, r2])
    save_adapter(str(tmp_path / "adapter"), state, scaling, str(tiny_model_dir))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = {k: v.clone() for k, v in base.state_dict().items()}
    for r in (r1, r2):
        flora.install(m, pack_rounds({0: r}), 0, seed=0)
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    mine = base_weights(m)
    for name in mine:
        torch.testing.assert_close(merged[name], mine[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[n], expected[n]) for n in mine)


def test_report_rows_and_totals():
    log = {
        "rounds": [
            {"round": 0, "sites": {"a": {"metrics": {"eval_loss": 2.0}, "upload_bytes": 10, "download_bytes": 1, "train": {"train_loss": 1.5}}}},
        ],
        "final": {"round": 1, "sites": {"a": {"metrics": {"eval_loss": 1.0, "exact_match": 0.5}, "upload_bytes": 2, "download_bytes": 12}}},
    }
    rows = per_round(log)
    assert [(r["round"], r["eval_loss"], r["train_loss"], r["upload_bytes"]) for r in rows] == [(0, 2.0, None, None), (1, 1.0, 1.5, 10)]
    assert comm_totals(log) == {"upload_bytes": 12, "download_bytes": 13}
    assert "0.500" in format_table(rows)


def test_a_vetted_update_that_spoils_the_aggregate_is_left_out_and_the_rest_aggregated():
    """The server's last guard (LoraController.aggregate): an aggregate beyond the norm bound (or not
    finite) is never stored; the site without which it is fine is rejected and the round goes on."""
    from flare_lora.components.flare.controller import LoraController
    from flare_lora.components.flare.workflow import JobFailed
    from flare_lora.components.strategies.aggregators import PlainRounds

    def update(site, a, b):
        return SiteUpdate(site=site, state={"m.lora_A.weight": torch.full((1, 4), a), "m.lora_B.weight": torch.full((4, 1), b)},
                          num_examples=1, rank=1, alpha=1.0)

    controller = LoraController(method="fedit", max_update_norm=10.0)
    controller.strategy = get_method("fedit")
    controller.aggregator = PlainRounds(controller.strategy)
    record = {"sites": {s: {} for s in ("a", "b", "bad")}}
    honest = [update("a", 0.5, 0.5), update("b", 0.4, 0.6)]
    state, kept = controller.aggregate(0, [*honest, update("bad", 3e30, 1.0)], record)
    assert [u.site for u in kept] == ["a", "b"] and "exceeds a bound" in record["sites"]["bad"]["rejected"]
    torch.testing.assert_close(state["m.lora_A.weight"], torch.full((1, 4), 0.45))
    assert "rejected" not in record["sites"]["a"]
    with pytest.raises(JobFailed, match="min_clients=2"):  # too few left: the job fails with the reason
        controller.min_clients = 2
        controller.aggregate(1, [honest[0], update("bad", 3e30, 1.0)], {"sites": {"a": {}, "bad": {}}})
