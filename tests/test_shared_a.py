"""Nested shared-A: exactness for mixed ranks, the protocol on a real PEFT model, HE (real TenSEAL)
and a simulator job with HE and partial participation."""

import glob
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flare_lora.components.algorithms.lora_init import fresh_lora_a, init_seed
from flare_lora.components.algorithms.lora_state import InvalidUpdate
from flare_lora.components.algorithms.merge import weights_digest
from flare_lora.components.algorithms.shared_a import b_only, shared_a_sum, with_shared_a
from flare_lora.components.strategies import SiteUpdate, check_update, get_method, unpack_rounds
from flare_lora.components.training.config import SiteConfig
from flare_lora.components.training.lora import add_lora, base_weights, freeze_lora_a, linear_shapes, lora_state
from flare_lora.components.training.models import load_model_and_tokenizer
from flare_lora.privacy.dp_reference import derive_reference, expected_layout
from flare_lora.privacy.he_aggregate import EncryptedGlobal, decrypt_payload, payload_model
from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, Ckks, load_context, provision_sim_contexts
from flare_lora.privacy.he_packing import HE_KEY, encrypt_state
from flare_lora.privacy.he_server import EncryptedRounds, load_wire, open_server_context
from sim_jobs import final_digests, run_job

A, B = ".lora_A.weight", ".lora_B.weight"
Q, V = "base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.v_proj"


def b_state(rank, seed, modules=(Q, V), out=48):
    g = torch.Generator().manual_seed(seed)
    return {m + B: torch.randn(out, rank, generator=g) for m in modules}


def test_weighted_sum_of_padded_bs_is_exact_for_mixed_ranks():
    shapes = {Q: (48, 32), V: (48, 32)}
    ranks, n, alphas = [2, 4, 8], [10, 30, 60], [4.0, 16.0, 8.0]
    states = [with_shared_a(b_state(r, k, modules=(Q,) if k == 0 else (Q, V)), 123, shapes, r)
              for k, r in enumerate(ranks)]
    scalings = [a / r for a, r in zip(alphas, ranks)]
    glob_ = shared_a_sum(states, n, scalings)
    for m in (Q, V):  # every site's A is a prefix of the one shared matrix
        widest = glob_[m + A]
        assert widest.shape == (8, 32) and torch.equal(widest, fresh_lora_a(123, m, (8, 32)))
        for s in states:
            if m + A in s:
                assert torch.equal(s[m + A], widest[: s[m + A].shape[0]])
        want = sum(nk / 100 * sk * s[m + B].double() @ s[m + A].double()
                   for nk, sk, s in zip(n, scalings, states) if m + B in s)  # site 0 adds nothing to V
        got = glob_[m + B].double() @ glob_[m + A].double()
        assert (got - want).abs().max() / want.abs().max() <= 1e-6


def test_server_draws_the_a_itself_and_refuses_anything_else():
    shapes = {Q: (48, 32)}
    with pytest.raises(InvalidUpdate, match="send only their B"):
        with_shared_a({Q + A: torch.zeros(2, 32)}, 1, shapes)
    with pytest.raises(InvalidUpdate, match="not one the job adapts"):
        with_shared_a(b_state(2, 0, modules=(V,)), 1, shapes)
    # the width of B sets the size of the A drawn for it: checked first, against the declared rank
    with pytest.raises(InvalidUpdate, match=r"expected shape \(48, 2\), got \(0, 10000000\)"):
        with_shared_a({Q + B: torch.zeros(0, 10**7)}, 1, shapes, rank=2)
    with pytest.raises(InvalidUpdate, match=r"expected shape \(48, 2\), got \(48, 4\)"):
        with_shared_a(b_state(4, 0, modules=(Q,)), 1, shapes, rank=2)
    with pytest.raises(InvalidUpdate, match=r"expected shape \(48, r\) with r >= 1, got \(47, 2\)"):
        with_shared_a({Q + B: torch.zeros(47, 2)}, 1, shapes)  # a site's check of a global: out rows
    forged = with_shared_a(b_state(2, 0, modules=(Q,)), 1, shapes, 2)
    forged[Q + A] = forged[Q + A] + 1.0  # an A that is not the round's draw
    with pytest.raises(ValueError, match="not a prefix"):
        shared_a_sum([forged, with_shared_a(b_state(4, 1, modules=(Q,)), 1, shapes, 4)], [1, 1], [1.0, 1.0])


def test_client_dp_reference_is_b_only_and_zero():
    layout = expected_layout("shared_a", {}, [[Q, 48, 32], [V, 48, 32]], 4)
    assert layout == {Q + B: (48, 4), V + B: (48, 4)}
    assert all(not t.any() for t in derive_reference(layout, {}, "shared_a", seed=5).values())


def site(model_dir, rank):
    model, _ = load_model_and_tokenizer(str(model_dir))
    peft = add_lora(model, SiteConfig(rank=rank, alpha=2.0 * rank))
    freeze_lora_a(peft)
    return peft


def train_b(peft, seed):
    """A stand-in for local training: B moves, A stays the round's draw."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora_state(peft)


def test_protocol_on_peft_sites_keeps_them_identical_and_exact(tiny_model_dir):
    server = get_method("shared_a")
    ranks = [2, 4, 8]
    sites = [site(tiny_model_dir, r) for r in ranks]
    server.bind("job-1", linear_shapes(sites[0], {k.rsplit(".lora_", 1)[0] for k in lora_state(sites[0])}))
    before = {k: v.clone() for k, v in base_weights(sites[0]).items()}
    clients = [get_method("shared_a") for _ in sites]
    rounds, expected, merged = [], {k: v.double() for k, v in before.items()}, [0, 0, 0]
    for rnd in range(2):
        updates = []
        for k, (peft, method) in enumerate(zip(sites, clients)):
            method.key = server.key
            merged[k] = method.install(peft, server.payload(rounds, merged[k]), merged[k], seed=method.round_seed(rnd))
            assert all(not p.requires_grad for n, p in peft.named_parameters() if "lora_A" in n)
            full = train_b(peft, 10 * rnd + k)
            upload = b_only(full)
            assert all(k.endswith(B) for k in upload)
            state = server.expand(upload, rnd, ranks[k])
            assert all(torch.equal(state[key], full[key]) for key in full)  # the server's A is the site's
            update = SiteUpdate(f"site-{k}", state, 10 * (k + 1), ranks[k], 2.0 * ranks[k])
            check_update(update)
            updates.append(update)
        rounds.append(server.aggregate(updates))
        for u in updates:
            for key in u.state:
                if key.endswith(A):
                    prefix = key[: -len(A)]
                    name = prefix.removeprefix("base_model.model.") + ".weight"
                    expected[name] += u.num_examples / 60 * u.scaling * (
                        u.state[prefix + B].double() @ u.state[key].double())
    payload = server.payload(rounds, 0)
    assert all(k.endswith(B) and v.shape[1] == 8 for k, v in payload.items())  # R x out per module and round
    for k, (peft, method) in enumerate(zip(sites, clients)):
        assert method.install(peft, server.payload(rounds, merged[k]), merged[k], seed=method.round_seed(2)) == 2
    late = site(tiny_model_dir, 4)
    latecomer = get_method("shared_a")
    latecomer.key = server.key
    assert latecomer.install(late, payload, 0, seed=latecomer.round_seed(2)) == 2
    assert len({weights_digest(base_weights(m)) for m in [*sites, late]}) == 1
    for name, w in base_weights(late).items():
        torch.testing.assert_close(w.double(), expected[name], rtol=1e-5, atol=1e-6)
    adapter, scaling = server.final(rounds)  # the exported adapter is the same update, applied with scaling 1
    assert scaling == 1.0 and {t.shape[0] for k, t in adapter.items() if k.endswith(A)} == {16}


def test_a_site_merges_modules_only_other_sites_adapt(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    narrow = add_lora(model, SiteConfig(rank=2, alpha=4.0, target_modules=("q_proj",)))
    wide = site(tiny_model_dir, 4)
    server, clients = get_method("shared_a"), [get_method("shared_a"), get_method("shared_a")]
    server.bind("job-m", linear_shapes(wide, {k.rsplit(".lora_", 1)[0] for k in lora_state(wide)}))
    updates = []
    for k, (peft, method, r) in enumerate(zip((narrow, wide), clients, (2, 4))):
        method.key = server.key
        method.install(peft, {}, 0, seed=method.round_seed(0))
        state = server.expand(b_only(train_b(peft, k)), 0, r)
        updates.append(SiteUpdate(f"site-{k}", state, 5, r, 2.0 * r))
    rounds = [server.aggregate(updates)]
    assert any(".v_proj." in key for key in rounds[0])
    for peft, method in zip((narrow, wide), clients):
        assert method.install(peft, server.payload(rounds, 0), 0, seed=method.round_seed(1)) == 1
    assert weights_digest(base_weights(narrow)) == weights_digest(base_weights(wide))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = provision_sim_contexts(str(tmp_path_factory.mktemp("he")))
    return open_server_context(f"{folder}/{SERVER_CONTEXT}"), Ckks(*load_context(f"{folder}/{CLIENT_CONTEXT}", "site"))


def test_he_server_and_sites_see_only_the_aggregate(keys, tmp_path):
    server_ckks, site_ckks = keys
    strategy = get_method("shared_a")
    strategy.bind("job-he", {Q: (48, 32), V: (48, 32)})
    he = EncryptedRounds(strategy, server_ckks)
    ranks, n = [2, 4, 8], [100000, 100000, 1]
    plan = he.plan(ranks)
    assert plan["pad_rank"] == 8 and plan["scale_b"]
    uploads, plain = [], []
    for k, r in enumerate(ranks):
        b = {key: v * 0.01 for key, v in b_state(r, k).items()}
        wire = encrypt_state(b, site_ckks, plan["grouping"], plan["pad_rank"], plan["bound"], {"B": 2.0})
        assert set(wire["groups"]) == {"B"}
        stubs, encrypted = he.vet({HE_KEY: wire}, r, f"site-{k}")
        check_update(SiteUpdate(f"site-{k}", strategy.expand(stubs, 0, r), n[k], r, 2.0 * r))
        uploads.append(SiteUpdate(f"site-{k}", encrypted, n[k], r, 2.0 * r))
        plain.append(SiteUpdate(f"site-{k}", strategy.expand(b, 0, r), n[k], r, 2.0 * r))
    rounds = [he.aggregate(uploads)]
    saved = he.save(str(tmp_path), rounds, final=False, spec={})
    wire = load_wire(str(tmp_path / saved["he_persisted"][0]))
    blobs = wire["blocks"][0]["groups"]["B"]["ciphertexts"]
    assert len(wire["blocks"]) == 1 and all(b[:2] == b"\x5e\xa1" for b in blobs)  # one summed block, ciphertexts
    EncryptedGlobal.from_wire(wire, server_ckks)
    params = decrypt_payload(he.payload(rounds, 0)[HE_KEY], site_ckks)
    got, want = unpack_rounds(params)[0], strategy.aggregate(plain)
    assert sorted(got) == sorted(b_only(want))
    for key, value in got.items():
        assert (value - want[key]).norm() / want[key].norm() <= 1e-4, key
        for u in plain:  # the aggregate, not one site's (padded, scaled) B
            own = torch.nn.functional.pad(u.state[key] * u.scaling, (0, 8 - u.rank))
            assert (value - own).norm() / own.norm() > 1e-2
    model = payload_model(params, lambda r, s: with_shared_a(s, init_seed("job-he", r), {Q: (48, 32), V: (48, 32)}))
    for m in (Q, V):
        got_delta, want_delta = model[m + B] @ model[m + A], want[m + B] @ want[m + A]
        assert (got_delta - want_delta).norm() / want_delta.norm() <= 1e-4


@pytest.mark.e2e
def test_simulator_job_with_he_partial_participation_and_mixed_ranks(tmp_path, tiny_model_dir):
    log, results, _ = run_job(tmp_path, tiny_model_dir, "--method", "shared_a", "--ranks", "2,4,8", "--rounds", "3",
                              "--clients-per-round", "2", "--he", "--in-process")
    assert not log.get("error") and len(log["rounds"]) == 3
    assert any(len(r["aggregated"]) == 2 for r in log["rounds"])
    digests = final_digests(log)
    assert len(digests) == 3 and len(set(digests.values())) == 1  # every site holds the same merged weights
    server_dir = Path(glob.glob(str(tmp_path / "ws" / "shared_a" / "server" / "**" / "flare_lora"), recursive=True)[0])
    assert log["he"]["server_has_secret_key"] is False and not (server_dir / "adapter").exists()
    for name in log["he_persisted"]:
        wire = load_wire(str(server_dir / name))
        assert set(wire["blocks"][0]["groups"]) == {"B"} and len(wire["blocks"]) == 1
    for r in log["rounds"]:  # a site uploads its B only: r_k x out per module
        for s, entry in r["sites"].items():
            assert entry["upload_bytes"] > 0
    adapters = glob.glob(str(tmp_path / "ws" / "shared_a" / "site-*" / "**" / "flare_lora" / "adapter"), recursive=True)
    written = [load_file(Path(a) / "adapter_model.safetensors") for a in adapters]
    assert len(written) == 3
    for state in written[1:]:  # every site decrypted and wrote the same adapter
        assert all((state[k] - written[0][k]).abs().max() <= 1e-6 for k in written[0])


@pytest.mark.e2e
def test_simulator_job_with_dp_sgd_on_b_and_client_dp(tmp_path, tiny_model_dir):
    """DP-SGD noises B only (A is frozen: Opacus sees only B), client-level DP clips the B upload
    against a zero start; the exported adapter holds every round, each with its shared A."""
    log, results, _ = run_job(tmp_path, tiny_model_dir, "--method", "shared_a", "--ranks", "2,4", "--rounds", "2",
                              "--in-process", "--dp-epsilon", "8", "--dp-max-grad-norm", "0.5",
                              "--client-dp-clip", "0.05", "--client-dp-sigma", "2")
    assert not log.get("error") and all(r["aggregated"] == ["site-1", "site-2"] for r in log["rounds"])
    assert len(set(final_digests(log).values())) == 1
    for rnd, record in enumerate(log["rounds"]):
        for entry in record["sites"].values():
            assert entry["metrics"]["dp_epsilon"] > 0 and entry["metrics"]["client_dp_epsilon"] > 0
            assert entry["merged_rounds"] == rnd  # as the filter counts it: the rounds the site was sent
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    ranks = {t.shape[0] for k, t in adapter.items() if k.endswith(A)}
    assert ranks == {4 + 4}  # two rounds, each at the round's largest rank
    assert all(bool(t.isfinite().all()) for t in adapter.values())


def test_one_shot_fold_is_the_round_sum_in_any_order_and_refuses_a_bad_update():
    strategy = get_method("shared_a")
    strategy.bind("job-1s", {Q: (48, 32), V: (48, 32)})
    updates = [SiteUpdate(f"site-{k}", strategy.expand(b_state(r, k), 0, r), 10 * (k + 1), r, 2.0 * r)
               for k, r in enumerate([2, 4, 8])]
    forward, backward = strategy.fold(), strategy.fold()
    for u in updates:
        forward.add(u)
    for u in reversed(updates):
        backward.add(u)
    want = strategy.aggregate(updates)
    for fold in (forward, backward):
        state, scaling = fold.result()
        assert scaling == 1.0 and all(torch.allclose(state[k], want[k], atol=1e-6) for k in want)
    bad = SiteUpdate("site-9", dict(updates[0].state), 5, 2, 4.0)
    bad.state[Q + A] = bad.state[Q + A] * 2  # not the round's A
    with pytest.raises(ValueError, match="not a prefix"):
        forward.add(bad)
    with pytest.raises(InvalidUpdate, match="already contributed"):
        forward.add(updates[0])
    assert forward.sites == ["site-0", "site-1", "site-2"]


@pytest.mark.e2e
def test_one_shot_job_with_mixed_ranks(tmp_path, tiny_model_dir):
    log, results, _ = run_job(tmp_path, tiny_model_dir, "--method", "shared_a", "--ranks", "2,4,8", "--in-process",
                              "--evaluate-global", job=Path(__file__).resolve().parents[1] / "nvflare_jobs" / "one_shot" / "job.py")
    assert log["protocol"] == "one_shot" and not log.get("error")
    assert sorted(log["rounds"][0]["aggregated"]) == ["site-1", "site-2", "site-3"]
    adapter = load_file(results / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in adapter.items() if k.endswith(A)} == {8}  # one round at the largest rank
    final = log["final"]["sites"]  # every site installed the B-only global on its redrawn A and evaluated it
    assert sorted(final) == ["site-1", "site-2", "site-3"] and all("eval_loss" in e["metrics"] for e in final.values())
