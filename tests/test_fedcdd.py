"""FedCDD: decomposition, consensus/divergence aggregation, duplicate robustness, noise mask, job."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flare_lora.components.algorithms.averaging import fedit
from flare_lora.components.algorithms.consensus_divergence import (
    aggregate_matrix,
    compose,
    decompose,
    direction_similarity,
    direction_weights,
    fedcdd_aggregate,
)
from flare_lora.components.algorithms.noise_mask import keep_mask, mask_seed, mask_update
from flare_lora.components.strategies import SiteUpdate, get_method

ROOT = Path(__file__).resolve().parents[1]
A_KEY, B_KEY = "m.lora_A.weight", "m.lora_B.weight"


def state(seed, rank=4, d_in=12, d_out=10, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {A_KEY: torch.randn(rank, d_in, generator=g) * scale, B_KEY: torch.randn(d_out, rank, generator=g) * scale}


def finite(s):
    return all(bool(torch.isfinite(v).all()) for v in s.values())


# --- decomposition ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["column", "row"])
def test_decomposition_round_trips_with_unit_or_zero_directions(axis):
    t = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    t[:, 2] = 0  # a zero column
    t[3] = 0  # and a zero row
    m, v = decompose(t, axis)
    assert m.shape == ((5,) if axis == "column" else (7,))
    torch.testing.assert_close(compose(m, v, axis), t, rtol=0, atol=1e-6)
    norms = torch.linalg.vector_norm(v, dim=0 if axis == "column" else 1)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0)) and torch.isfinite(v).all()
    assert (norms == 0).sum() == 1 and m[norms == 0].item() == 0


# --- aggregation ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [(True, True), (True, False), (False, True)])
def test_identical_sites_give_that_sites_update(variant):
    s = state(1)
    out = fedcdd_aggregate([s, s, s], [10, 20, 30], scalings=[2.0] * 3, consensus=variant[0], divergence=variant[1])
    torch.testing.assert_close(out[A_KEY], s[A_KEY], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[B_KEY], 2.0 * s[B_KEY], rtol=1e-5, atol=1e-6)  # s folded into B
    delta = fedcdd_aggregate([s, s], [1, 1], scalings=[2.0, 2.0], target="delta")
    torch.testing.assert_close(delta[B_KEY] @ delta[A_KEY], 2.0 * s[B_KEY] @ s[A_KEY], rtol=1e-4, atol=1e-5)


def test_both_steps_off_is_exactly_fedit_and_full_differs():
    states = [state(k) for k in range(3)]
    weights = [10, 30, 60]
    plain = fedcdd_aggregate(states, weights, weighting="data", consensus=False, divergence=False)
    reference = fedit(states, weights)
    for key in reference:
        torch.testing.assert_close(plain[key], reference[key], rtol=1e-5, atol=1e-6)
    full = fedcdd_aggregate(states, weights, weighting="data", shrink="none")
    # consensus keeps the mean column norm; averaging shrinks it when directions disagree
    mean_norm = sum(w / 100 * torch.linalg.vector_norm(s[A_KEY], dim=0) for w, s in zip(weights, states))
    torch.testing.assert_close(torch.linalg.vector_norm(full[A_KEY], dim=0), mean_norm, rtol=1e-5, atol=1e-6)
    assert torch.all(torch.linalg.vector_norm(reference[A_KEY], dim=0) < mean_norm)
    # the default guard keeps it wherever the directions do not cancel (weighted cosines >= 0)
    guarded = fedcdd_aggregate(states, weights, weighting="data")
    norms = torch.linalg.vector_norm(guarded[A_KEY], dim=0)
    assert torch.all(norms <= mean_norm * (1 + 1e-6)) and bool((norms < mean_norm * 0.999).any())
    agreement = torch.linalg.vector_norm(fedcdd_aggregate(states, weights, weighting="data", shrink="agreement")[A_KEY], dim=0)
    assert torch.all(agreement <= norms * (1 + 1e-6))


@pytest.mark.parametrize("variant", [(True, True), (True, False)])
def test_nearly_cancelling_sites_give_a_column_as_small_as_fedit(variant):
    """Two sites whose updates nearly cancel: the consensus magnitude is shrunk with the
    cancellation (norms ~1e-6 like FedIT's mean), not kept at the sites' mean length (~4)."""
    a = state(3)
    b = {k: -v + 1e-6 * torch.randn(v.shape, generator=torch.Generator().manual_seed(4)) for k, v in a.items()}
    mean = fedit([a, b], [1, 1])
    kept = fedcdd_aggregate([a, b], [1, 1], shrink="none", consensus=variant[0], divergence=variant[1])
    out = fedcdd_aggregate([a, b], [1, 1], consensus=variant[0], divergence=variant[1])
    for key in (A_KEY, B_KEY):
        assert float(kept[key].norm()) > 1.0
        assert float(out[key].norm()) < 10 * float(mean[key].norm()) + 1e-6


def test_huge_finite_updates_stay_finite_or_are_refused():
    """Entries of 3e19 square past float32's range: the norms run in float64, the result is finite;
    a result beyond float32 is refused naming the key."""
    big = [state(k, scale=3e19) for k in range(3)]
    out = fedcdd_aggregate(big, [1, 1, 1])
    assert finite(out) and float(out[A_KEY].abs().max()) > 1e19
    huge = [{k: v.double() * 1e100 for k, v in state(j).items()} for j in range(2)]
    assert finite(fedcdd_aggregate(huge, [1, 1]))  # float64 sites aggregate in float64
    with pytest.raises(ValueError, match="lora_[AB].weight: the FedCDD aggregate is not finite in torch.float32"):
        fedcdd_aggregate([{k: v * 1e38 for k, v in state(j).items()} for j in range(2)] , [1, 1], shrink="none",
                         scalings=[100.0, 100.0])


def duplicate_sites():
    """The reviewers' example: sites A and A' (a near-copy of A) and an unrelated site C."""
    a, c = torch.zeros(6, 4), torch.zeros(6, 4)
    a[:3] = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))  # A lives in rows 0-2,
    c[3:] = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))  # C in rows 3-5: orthogonal
    a_dup = a + 1e-3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    return a, a_dup, c


def test_duplicated_sites_do_not_dominate():
    a, a_dup, c = duplicate_sites()
    dirs = [decompose(t)[1] for t in (a, a_dup, c)]
    sim = direction_similarity(dirs)
    assert sim[0, 1] > 0.99 and abs(sim[0, 2]) < 0.05
    prior = [1 / 3] * 3
    w = direction_weights(sim, prior, temperature=0.1, mode="uniqueness")
    assert w[0] + w[1] == pytest.approx(0.5, abs=0.01) and w[2] == pytest.approx(0.5, abs=0.01)
    for tau in (0.01, 0.1, 1.0, 10.0):  # never the 2/3 a head count gives (closed form in the docs)
        w = direction_weights(sim, prior, temperature=tau, mode="uniqueness")
        e = math.exp((float(sim[0, 2]) - 1) / tau)
        assert float(w[0] + w[1]) < 2 / 3
        assert float(w[0] + w[1]) == pytest.approx((2 + 4 * e) / (4 + 5 * e), abs=0.02)
    # the literal "agreement" reading rewards the duplicates: more than their head count
    assert float(sum(direction_weights(sim, prior, temperature=0.1, mode="agreement")[:2])) > 2 / 3
    # the aggregate's direction is as close to C as to A (each column)
    out, _ = aggregate_matrix([a, a_dup, c], prior)
    u = decompose(out)[1]
    va, vc = decompose(a)[1], decompose(c)[1]
    cos_a, cos_c = (u * va).sum(0), (u * vc).sum(0)
    torch.testing.assert_close(cos_a, cos_c, rtol=0, atol=0.02)
    # plain averaging of directions leans towards the duplicated site
    plain, _ = aggregate_matrix([a, a_dup, c], prior, similarity="none")
    up = decompose(plain)[1]
    assert torch.all((up * va).sum(0) > (up * vc).sum(0) + 0.2)


def test_zero_updates_never_give_nan():
    s, t = state(1), state(2)
    zero = {k: torch.zeros_like(v) for k, v in s.items()}
    out = fedcdd_aggregate([s, zero, t], [1, 1, 1])
    assert finite(out)
    # the zero site adds no direction and magnitude 0: the result is 2/3 of the 2-site consensus
    two = fedcdd_aggregate([s, t], [1, 1])
    for key in out:
        torch.testing.assert_close(out[key], two[key] * 2 / 3, rtol=1e-4, atol=1e-6)
    all_zero = fedcdd_aggregate([zero, zero], [1, 1])
    assert finite(all_zero) and all(v.abs().sum() == 0 for v in all_zero.values())
    assert finite(fedcdd_aggregate([zero, zero], [1, 1], target="delta"))
    cols = {k: v.clone() for k, v in s.items()}
    cols[A_KEY][:, :5] = 0  # some zero columns at one site only
    assert finite(fedcdd_aggregate([cols, t], [1, 1], axis="row")) and finite(fedcdd_aggregate([cols, t], [1, 1]))


def test_delta_target_handles_heterogeneous_ranks_factors_refuses():
    states = [state(0, rank=2), state(1, rank=4), state(2, rank=8)]
    out = fedcdd_aggregate(states, [1, 1, 1], scalings=[2.0] * 3, target="delta")
    assert out[A_KEY].shape == (8, 12) and out[B_KEY].shape == (10, 8)
    # the SVD orders components: the first r rows are the best rank-r part of the global
    full = out[B_KEY] @ out[A_KEY]
    top2 = out[B_KEY][:, :2] @ out[A_KEY][:2]
    s = torch.linalg.svdvals(full)
    assert torch.linalg.matrix_norm(full - top2) ** 2 == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-3)
    with pytest.raises(ValueError, match="target='delta'"):
        fedcdd_aggregate(states, [1, 1, 1])


def test_bad_options_name_the_key():
    s = state(0)
    for kwargs, key in [
        (dict(temperature=0), "temperature"),
        (dict(weighting="size"), "weighting"),
        (dict(axis="diag"), "axis"),
        (dict(target="W"), "target"),
        (dict(similarity="x"), "similarity"),
    ]:
        with pytest.raises(ValueError, match=key):
            fedcdd_aggregate([s, s], [1, 1], **kwargs)
    with pytest.raises(ValueError, match="variant"):
        get_method("fedcdd", variant="both")
    with pytest.raises(ValueError, match="unknown option 'temp'"):
        get_method("fedcdd", temp=1.0)


def test_strategy_variants_and_install(tiny_model_dir):
    from flare_lora.components.training.config import SiteConfig
    from flare_lora.components.training.lora import add_lora, lora_state
    from flare_lora.components.training.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    site = add_lora(model, SiteConfig(rank=4, alpha=8.0))
    shapes = {k: v.shape for k, v in lora_state(site).items()}
    g = torch.Generator().manual_seed(0)
    updates = [
        SiteUpdate(f"site-{k}", {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}, 10, 4, 8.0)
        for k in range(3)
    ]
    outs = {v: get_method("fedcdd", variant=v).aggregate(updates) for v in ("full", "consensus", "divergence")}
    assert all(finite(o) for o in outs.values())
    key = next(iter(shapes))
    assert not torch.allclose(outs["full"][key], outs["consensus"][key])
    method = get_method("fedcdd")
    assert method.install(site, outs["full"], 0, seed=0) == 1
    installed = lora_state(site)
    for k, v in outs["full"].items():  # A as is, B divided by the site's scaling 8/4
        torch.testing.assert_close(installed[k], v if "lora_A" in k else v / 2.0)


# --- noise mask -------------------------------------------------------------------------------


def test_mask_keeps_exactly_the_top_rho_entries():
    t = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    out = mask_update({"x": t}, 0.3, 0.5, torch.Generator().manual_seed(1))["x"]
    kept = out == t
    assert int(kept.sum()) == 24  # ceil(0.3 * 80)
    threshold = t.abs().flatten().sort(descending=True).values[23]
    assert torch.equal(kept, t.abs() >= threshold)
    # replaced entries are N(0, sigma^2) draws, not the original values
    assert torch.all(out[~kept] != t[~kept]) and 0.25 < float(out[~kept].std()) < 0.8
    # sigma 0: the rest is zeroed; perturb adds noise to the rest instead of replacing it
    assert torch.all(mask_update({"x": t}, 0.3, 0.0)["x"][~kept] == 0)
    perturbed = mask_update({"x": t}, 0.3, 1e-3, torch.Generator().manual_seed(1), mode="perturb")["x"]
    assert torch.equal(perturbed[kept], t[kept]) and (perturbed[~kept] - t[~kept]).abs().max() < 0.01
    # column importance keeps whole columns by L2 norm
    cols = keep_mask(t, 0.3, "column")
    top = torch.linalg.vector_norm(t, dim=0).topk(3).indices
    assert torch.equal(cols.all(0).nonzero().flatten().sort().values, top.sort().values) and cols.sum() == 24
    assert torch.equal(mask_update({"x": t}, 1.0, 1.0)["x"], t)


def test_mask_is_redrawn_per_round_and_site_but_reproducible():
    s = {"x": torch.randn(6, 6, generator=torch.Generator().manual_seed(0))}

    def masked(site, rnd):
        return mask_update(s, 0.5, 0.1, torch.Generator().manual_seed(mask_seed(0, site, rnd)))["x"]

    assert torch.equal(masked("site-1", 0), masked("site-1", 0))
    assert not torch.equal(masked("site-1", 0), masked("site-1", 1))
    assert not torch.equal(masked("site-1", 0), masked("site-2", 0))
    zero = mask_update({"x": torch.zeros(4, 4)}, 0.5, 0.1)
    assert torch.isfinite(zero["x"]).all()


@pytest.mark.parametrize("rho,sigma,key", [(0, 0.1, "mask_rho"), (1.5, 0.1, "mask_rho"), (0.5, -1, "mask_sigma"),
                                           (float("nan"), 0.1, "mask_rho"), (0.5, float("inf"), "mask_sigma")])
def test_mask_bad_input_names_the_key(rho, sigma, key):
    with pytest.raises(ValueError, match=key):
        mask_update({"x": torch.ones(2, 2)}, rho, sigma)


def test_flare_filter_masks_the_result_dxo():
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    from flare_lora.components.flare.noise_mask import NoiseMaskFilter

    s = state(3)
    shareable = DXO(DataKind.WEIGHTS, data={k: v.clone() for k, v in s.items()}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 2)
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-2", private=False, sticky=False)
    out = from_shareable(NoiseMaskFilter(rho=0.25, sigma=0.01, seed=5).process(shareable, ctx)).data
    expected = mask_update(s, 0.25, 0.01, torch.Generator().manual_seed(mask_seed(5, "site-2", 2)))
    for k in s:
        assert torch.equal(out[k], expected[k]) and int((out[k] == s[k]).sum()) == math.ceil(0.25 * s[k].numel())
    with pytest.raises(ValueError, match="mask_sigma"):
        NoiseMaskFilter(rho=0.5, sigma=-0.1)


def test_recipe_validates_options_and_adds_the_site_filter(tmp_path):
    import json

    from flare_lora.components.flare.recipe import LoraRecipe

    sites = {f"site-{k}": {"rank": 4, "alpha": 8.0} for k in (1, 2)}
    with pytest.raises(ValueError, match="mask_rho"):
        LoraRecipe(sites=sites, method="fedcdd", mask_rho=0.0)
    with pytest.raises(ValueError, match="variant"):
        LoraRecipe(sites=sites, method="fedcdd", method_options={"variant": "both"})
    with pytest.raises(ValueError, match="site-2.*rank.*fedcdd"):
        LoraRecipe(sites={"site-1": {"rank": 4}, "site-2": {"rank": 8}}, method="fedcdd")
    recipe = LoraRecipe(sites=sites, method="fedcdd", mask_rho=0.5, mask_sigma=0.01, mask_mode="perturb", seed=3)
    recipe.export(str(tmp_path / "job"))
    configs = sorted((tmp_path / "job").rglob("config_fed_client.json"))
    assert len(configs) == 2
    for path in configs:  # every site masks its outgoing train result, nothing else
        (entry,) = json.loads(path.read_text())["task_result_filters"]
        assert entry["tasks"] == ["train"]
        (flt,) = entry["filters"]
        assert flt["path"] == "flare_lora.components.flare.noise_mask.NoiseMaskFilter"
        assert flt["args"] == {"rho": 0.5, "sigma": 0.01, "mode": "perturb", "seed": 3}
    assert not any("NoiseMaskFilter" in p.read_text() for p in (tmp_path / "job").rglob("config_fed_server.json"))
    # the site gets the whole package, not a partial copy that would shadow the installed one
    for app in (tmp_path / "job").rglob("app_site-*"):
        assert (app / "custom" / "flare_lora" / "components" / "__init__.py").is_file()
        assert (app / "custom" / "flare_lora" / "components" / "algorithms" / "merge.py").is_file()


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_fedcdd_job_with_options_and_noise_mask_end_to_end(tmp_path, tiny_model_dir):
    """The real FLARE simulator: FedCDD on the server with --fedcdd-* options reaching the strategy
    (consensus variant, delta target, agreement shrink, mixed ranks), and the noise-mask filter on every site."""
    from safetensors.torch import load_file

    from flare_lora.components.report import load_metrics

    results = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "nvflare_jobs" / "fedcdd" / "job.py"), "--method", "fedcdd"]
    cmd += ["--fedcdd-variant", "consensus", "--fedcdd-target", "delta", "--fedcdd-shrink", "agreement"]
    cmd += ["--ranks", "2,4,4", "--mask-rho", "0.5", "--mask-sigma", "0.01", "--model", str(tiny_model_dir)]
    cmd += ["--rounds", "2", "--steps", "2", "--batch-size", "2", "--threads", "1"]
    cmd += ["--workspace", str(tmp_path / "ws"), "--results", str(results)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = load_metrics(results / "metrics.json")
    assert log["method"] == "fedcdd" and len(log["rounds"]) == 2
    assert log["method_options"] == {"variant": "consensus", "target": "delta", "shrink": "agreement"}
    assert all(sorted(r["aggregated"]) == ["site-1", "site-2", "site-3"] for r in log["rounds"])
    for entry in log["final"]["sites"].values():
        assert math.isfinite(entry["metrics"]["eval_loss"])
    # every site's filter masked each round's upload (logged by the site's FLARE client)
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "ws").rglob("log.txt"))
    for site in ("site-1", "site-2", "site-3"):
        for rnd in (0, 1):
            assert f"noise mask: {site} round {rnd}: kept top 0.5" in logs, (site, rnd)
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in adapter.items() if "lora_A" in k} == {4} and finite(adapter)
