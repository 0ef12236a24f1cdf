"""Low-rank re-projection, the bounded FLoRA global and hlora: math against dense SVD, a hand-checked
hlora case, the bounded protocol on real PEFT sites, and simulator jobs."""

import pytest
import torch
from safetensors.torch import load_file

from flare_lora.components.algorithms.lora_state import InvalidUpdate
from flare_lora.components.algorithms.low_rank import project, truncate_lora
from flare_lora.components.algorithms.merge import weights_digest
from flare_lora.components.algorithms.stacking import concat_lora
from flare_lora.components.strategies import SiteUpdate, get_method
from flare_lora.components.training.lora import base_weights
from sim_jobs import final_digests, run_job
from test_methods import site_model, trained_state

A, B = ".lora_A.weight", ".lora_B.weight"
M = "base_model.model.model.layers.0.self_attn.q_proj"


def factors(out, rank, inp, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)


def dense_svd(b, a):
    return torch.linalg.svdvals(b.double() @ a.double())


@pytest.mark.parametrize("split", ["balanced", "a"])
def test_projection_at_full_rank_is_exact_and_at_rank_k_leaves_the_svd_tail(split):
    b, a = factors(40, 12, 30, 0)
    want = b.double() @ a.double()
    b_k, a_k, s = project(b, a, rank=12, split=split)
    assert (b_k.double() @ a_k.double() - want).norm() / want.norm() <= 1e-6
    torch.testing.assert_close(s, dense_svd(b, a)[:12], rtol=1e-9, atol=1e-9)
    for k in (1, 5):
        b_k, a_k, s = project(b, a, rank=k, split=split)
        err = (b_k.double() @ a_k.double() - want).norm()
        assert err == pytest.approx(float((dense_svd(b, a)[k:] ** 2).sum().sqrt()), rel=1e-5)
    if split == "a":  # NVFlare's hlora form: B orthonormal, the singular values in A
        torch.testing.assert_close(b_k.T @ b_k, torch.eye(5), atol=1e-5, rtol=0)


def test_energy_keeps_the_smallest_rank_holding_the_share():
    b = torch.diag(torch.tensor([4.0, 2.0, 1.0]))  # σ² = 16, 4, 1: shares 0.762, 0.952, 1
    a = torch.eye(3)
    assert project(b, a, energy=0.7)[1].shape[0] == 1
    assert project(b, a, energy=0.9)[1].shape[0] == 2
    assert project(b, a, energy=0.99)[1].shape[0] == 3
    with pytest.raises(ValueError, match="give one of rank and energy"):
        project(b, a)
    with pytest.raises(ValueError, match=r"energy: expected a number in \(0, 1\]"):
        project(b, a, energy=1.5)
    state, report = truncate_lora({M + B: b, M + A: a}, rank=1)
    assert report["rank"] == 1 and report["relative"] == pytest.approx((5 / 21) ** 0.5)


def test_hlora_matches_its_description_on_a_hand_checked_case():
    """Two rank-1 sites: ΔW_1 = [[1, 0], [0, 0]], ΔW_2 = [[0, 0], [0, 2]], equal weights, s = 1:
    the weighted sum is diag(0.5, 1); at global rank 1 hlora keeps the σ = 1 direction, e_2 e_2ᵀ."""
    site_1 = {M + B: torch.tensor([[1.0], [0.0]]), M + A: torch.tensor([[1.0, 0.0]])}
    site_2 = {M + B: torch.tensor([[0.0], [1.0]]), M + A: torch.tensor([[0.0, 2.0]])}
    updates = [SiteUpdate("s1", site_1, 5, 1, 1.0), SiteUpdate("s2", site_2, 5, 1, 1.0)]
    g = get_method("hlora", rank=1).aggregate(updates)
    torch.testing.assert_close(g[M + B] @ g[M + A], torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6, rtol=0)
    assert float(g[M + B].norm()) == pytest.approx(1.0)  # B orthonormal, σ = 1 in A
    g = get_method("hlora", rank=2).aggregate(updates)
    torch.testing.assert_close(g[M + B] @ g[M + A], torch.diag(torch.tensor([0.5, 1.0])), atol=1e-6, rtol=0)
    g = get_method("hlora").aggregate([SiteUpdate("s1", site_1, 5, 1, 1.0)])  # default: the largest site rank
    assert g[M + A].shape == (1, 2)
    g = get_method("hlora", rank=4).aggregate(updates)  # a global rank past the sum's rank: zero-padded
    assert g[M + A].shape == (4, 2) and not g[M + A][2:].any()


def test_bounded_protocol_equals_exact_at_full_rank_and_keeps_sites_identical(tiny_model_dir):
    ranks = [2, 4]
    for rank, exact in ((64, True), (3, False)):
        server = get_method("flora", rank=rank)
        reference = get_method("flora")
        sites = [site_model(tiny_model_dir, r, k) for k, r in enumerate(ranks)]
        late = site_model(tiny_model_dir, 2, 9)
        w0 = {k: v.clone() for k, v in base_weights(sites[0]).items()}
        rounds, merged = [], [0, 0]
        for rnd in range(3):
            updates = []
            for k, peft in enumerate(sites):
                merged[k] = server.install(peft, server.payload(rounds, merged[k]), merged[k], seed=rnd)
                updates.append(SiteUpdate(f"site-{k}", trained_state(peft, 10 * rnd + k), 10 * (k + 1), ranks[k],
                                          2.0 * ranks[k]))
            rounds.append(server.aggregate(updates))
            report = server.commit(rounds)
            exact_global = concat_lora([server._globals[-2], rounds[-1]]) if rnd else rounds[-1]
            tail = truncate_lora(exact_global, rank=rank)[1]
            assert report == tail  # the error reported is the SVD tail of G_{t-1} + S_t
            assert report["rank"] <= rank and (report["relative"] < 1e-6) == exact
        for k, peft in enumerate(sites):
            server.install(peft, server.payload(rounds, merged[k]), merged[k], seed=3)
        payload = server.payload(rounds, 0)
        assert all(key.startswith("g2/") for key in payload)  # the latest global, whatever the site lacks
        assert server.install(late, payload, 0, seed=3) == 3
        assert len({weights_digest(base_weights(m)) for m in [*sites, late]}) == 1
        adapter, scaling = server.final(rounds)
        assert scaling == 1.0 and max(t.shape[0] for key, t in adapter.items() if key.endswith(A)) <= rank
        exact_adapter, _ = reference.final(rounds)
        for key, w in base_weights(late).items():
            prefix = "base_model.model." + key[: -len(".weight")]
            if prefix + A not in adapter:
                assert torch.equal(w, w0[key])
                continue
            bounded_w = w0[key] + adapter[prefix + B] @ adapter[prefix + A]
            torch.testing.assert_close(w, bounded_w, rtol=0, atol=1e-6)  # the sites hold W0 + G, the export
            if exact:
                torch.testing.assert_close(w, w0[key] + exact_adapter[prefix + B] @ exact_adapter[prefix + A],
                                           rtol=0, atol=1e-5)
    with pytest.raises(InvalidUpdate, match="one round"):
        server.install(late, {**payload, **{"g1/" + k[3:]: v for k, v in payload.items()}}, 0, seed=0)


@pytest.mark.e2e
def test_bounded_flora_job_records_the_truncation_and_exports_g(tmp_path, tiny_model_dir):
    log, results, _ = run_job(tmp_path, tiny_model_dir, "--ranks", "2,4,8", "--rounds", "2", "--global-rank", "4",
                              "--clients-per-round", "2", "--in-process")
    assert not log.get("error") and log["method_options"] == {"rank": 4}
    for record in log["rounds"]:
        assert record["bounded"]["rank"] == 4 and 0 < record["bounded"]["relative"] < 1
    assert len(set(final_digests(log).values())) == 1
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in adapter.items() if k.endswith(A)} == {4}


@pytest.mark.e2e
def test_hlora_job_with_mixed_ranks(tmp_path, tiny_model_dir):
    log, results, _ = run_job(tmp_path, tiny_model_dir, "--method", "hlora", "--ranks", "2,4,8", "--rounds", "2",
                              "--global-rank", "8", "--in-process")
    assert not log.get("error") and all(len(r["aggregated"]) == 3 for r in log["rounds"])
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in adapter.items() if k.endswith(A)} == {8}


def test_options_are_refused_where_they_would_not_be_honoured(tiny_model_dir):
    from flare_lora.components.cli.lora_job import fedcdd_kwargs, parser
    from flare_lora.components.flare.recipe import LoraRecipe
    from flare_lora.components.training.config import ConfigError

    for argv, match in ((["--method", "hlora", "--global-energy", "0.9"], "--global-energy: only valid with --method flora"),
                        (["--method", "zero_pad", "--global-rank", "4"], "--global-rank: only valid with --method flora or hlora")):
        with pytest.raises(ValueError, match=match):
            fedcdd_kwargs(parser().parse_args(argv))
    assert fedcdd_kwargs(parser().parse_args(["--method", "hlora", "--global-rank", "4"]))["method_options"] == {"rank": 4}
    sites = {"site-1": {"rank": 2, "alpha": 4}, "site-2": {"rank": 4, "alpha": 8}}
    with pytest.raises(ConfigError, match="bounded FLoRA global is re-projected by an SVD"):
        LoraRecipe(sites=sites, method="flora", method_options={"rank": 4}, he=True, model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="hlora.*cannot aggregate ciphertexts"):
        LoraRecipe(sites=sites, method="hlora", he=True, model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="rank: expected an int >= 1"):
        LoraRecipe(sites=sites, method="flora", method_options={"rank": 0}, model=str(tiny_model_dir))
