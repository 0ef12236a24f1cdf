"""Encrypted aggregation with real TenSEAL/SEAL: keys, packing, every method against plaintext, bad input."""

import math

import pytest
import torch

from flare_lora.components.algorithms.layer_average import average_layers
from flare_lora.components.algorithms.lora_state import InvalidUpdate
from flare_lora.components.algorithms.one_shot import OnlineAverage, OnlineStack
from flare_lora.components.strategies import SiteUpdate, check_update, get_method, unpack_rounds
from flare_lora.privacy.client_dp import privatize
from flare_lora.privacy.he_aggregate import (
    EncryptedGlobal,
    EncryptedOnlineAverage,
    EncryptedOnlineStack,
    check_he_method,
    decrypt_payload,
)
from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, Ckks, HEContextError, load_context, provision_sim_contexts
from flare_lora.privacy.he_packing import HE_KEY, EncryptedUpdate, encrypt_state
from flare_lora.privacy.he_server import EncryptedFold, EncryptedLayers, EncryptedRounds, load_wire, open_server_context

PREFIX = "base_model.model.model.layers.{}.self_attn.{}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(server Ckks, site Ckks, contexts dir): FLARE's HEBuilder with the recommended parameters."""
    folder = provision_sim_contexts(str(tmp_path_factory.mktemp("he")))
    server = open_server_context(f"{folder}/{SERVER_CONTEXT}")
    site = Ckks(*load_context(f"{folder}/{CLIENT_CONTEXT}", "site"))
    return server, site, folder


def lora(rank, seed, layers=(0, 1), modules=("q_proj", "v_proj"), dim=64):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        for m in modules:
            p = PREFIX.format(layer, m)
            state[p + ".lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.05
            state[p + ".lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.01
    return state


def assert_rel_close(got, want, tol=1e-4):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        err = (got[key].double() - want[key].double()).norm() / want[key].double().norm().clamp_min(1e-30)
        assert err <= tol, f"{key}: relative error {err:.2e}"


def test_server_context_has_no_secret_key(keys):
    server, site, folder = keys
    assert not server.private and not server.context.has_secret_key() and not server.context.is_private()
    assert site.private
    assert EncryptedRounds(get_method("flora"), server).describe()["server_has_secret_key"] is False
    with pytest.raises(HEContextError, match="needs the site context"):
        server.decrypt([], 0)
    with pytest.raises(HEContextError, match="holds the secret key"):
        load_context(f"{folder}/{CLIENT_CONTEXT}", "server")
    with pytest.raises(HEContextError, match="holds the secret key"):
        EncryptedRounds(get_method("flora"), site)
    with pytest.raises(HEContextError, match="has no secret key"):
        load_context(f"{folder}/{SERVER_CONTEXT}", "site")
    with pytest.raises(HEContextError, match="cannot be read"):
        load_context(f"{folder}/missing.tenseal", "server")


def test_nvflare_default_context_works_and_aggregates_shrink(tmp_path):
    """`nvflare poc prepare --he` contexts (two data primes): same result, the aggregate drops one."""
    folder = provision_sim_contexts(str(tmp_path), poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                                    scale_bits=40)
    server = open_server_context(f"{folder}/{SERVER_CONTEXT}")
    site = Ckks(*load_context(f"{folder}/{CLIENT_CONTEXT}", "site"))
    params, want = run_lora_round(server, site, "zero_pad", [2, 4], n=[3, 5])
    assert_rel_close(params, want)
    he = EncryptedRounds(get_method("fedit"), server)
    up = encrypt_state(lora(4, 0), site)
    _, encrypted = he.vet({HE_KEY: up}, 4, "s")
    down = he.payload([he.aggregate([SiteUpdate("s", encrypted, 2, 4, 8.0)])], 0)[HE_KEY]["global"]["blocks"][0]
    assert len(down["groups"]["A"]["ciphertexts"][0]) < 0.7 * len(up["groups"]["A"]["ciphertexts"][0]) * 2


def test_packing_is_dense_and_round_trips_heterogeneous_shapes(keys):
    server, site, _ = keys
    state = {**lora(3, 0, layers=(0,)), **lora(16, 1, layers=(1,), modules=("o_proj",))}
    state[PREFIX.format(1, "o_proj") + ".lora_B.weight"] = state[PREFIX.format(1, "o_proj") + ".lora_B.weight"].bfloat16()
    wire = encrypt_state(state, site)
    for name, group in wire["groups"].items():  # one vector per group, 8192 values per ciphertext
        n = sum(math.prod(shape) for _, shape, _ in group["segments"])
        assert len(group["ciphertexts"]) == math.ceil(n / site.chunk), name
    update = EncryptedUpdate.from_wire(wire, server, fresh=True)  # the server loads it without the key
    assert update.shapes == {k: tuple(v.shape) for k, v in state.items()}
    back = EncryptedUpdate.from_wire(update.to_wire(server), site).decrypt(site)
    assert back[PREFIX.format(1, "o_proj") + ".lora_B.weight"].dtype == torch.bfloat16
    assert_rel_close({k: v.float() for k, v in back.items()}, {k: v.float() for k, v in state.items()}, tol=1e-6)


def run_lora_round(server, site, method, ranks, n, alphas=None, states=None):
    """One round through the server half: plan, site encryption, vetting, aggregation, payload."""
    he = EncryptedRounds(get_method(method), server)
    alphas = alphas or [2.0 * r for r in ranks]
    states = states or [lora(r, seed=k) for k, r in enumerate(ranks)]
    plan = he.plan(ranks)
    updates, plain = [], []
    for k, (state, r, a, nk) in enumerate(zip(states, ranks, alphas, n)):
        wire = encrypt_state(state, site, plan["grouping"], plan["pad_rank"], plan["bound"],
                             {"B": a / r} if plan["scale_b"] else None)  # as HEEncryptFilter does
        stubs, encrypted = he.vet({HE_KEY: wire}, r, f"site-{k}")
        check_update(SiteUpdate(f"site-{k}", stubs, nk, r, a))  # the plaintext vetting, on shapes only
        updates.append(SiteUpdate(f"site-{k}", encrypted, nk, r, a))
        plain.append(SiteUpdate(f"site-{k}", state, nk, r, a))
    params = decrypt_payload(he.payload([he.aggregate(updates)], 0)[HE_KEY], site)
    return params, get_method(method).aggregate(plain)


@pytest.mark.parametrize("method,ranks", [("flora", [2, 4, 8]), ("fedit", [4, 4, 4]), ("zero_pad", [2, 4, 8])])
def test_decrypted_aggregate_equals_plaintext(keys, method, ranks):
    server, site, _ = keys
    params, want = run_lora_round(server, site, method, ranks, n=[10, 30, 60])
    got = unpack_rounds(params)[0] if method == "flora" else params
    assert_rel_close(got, want)


def test_example_counts_beyond_the_range_budget_are_rounded(keys):
    from flare_lora.privacy.he_aggregate import VALUE_BOUND, integer_weights

    server, site, _ = keys
    budget = int(server.capacity // VALUE_BOUND)
    assert integer_weights([3, 5], budget) == [3, 5]  # exact when they fit
    big = [70_001, 250_000, 1_000_000]
    m = integer_weights(big, budget)
    assert sum(m) <= budget and max(abs(a / sum(m) - b / sum(big)) for a, b in zip(m, big)) < 1e-5
    params, want = run_lora_round(server, site, "fedit", [4, 4, 4], n=big)
    assert_rel_close(params, want)
    # a site whose share rounds to 0 still counts (SEAL refuses a ciphertext times 0 as "transparent")
    tiny = [100_000, 100_000, 1]
    m = integer_weights(tiny, budget)
    assert m[2] == 1 and sum(m) <= budget
    params, want = run_lora_round(server, site, "fedit", [4, 4, 4], n=tiny)
    assert_rel_close(params, want)  # within rounding of the true mean


def test_stacking_sites_with_different_modules(keys):
    server, site, _ = keys
    states = [lora(2, 0, modules=("q_proj",)), lora(5, 1, modules=("q_proj", "v_proj"))]
    params, want = run_lora_round(server, site, "flora", [2, 5], n=[3, 1], alphas=[16.0, 5.0], states=states)
    got = unpack_rounds(params)[0]
    assert got[PREFIX.format(0, "q_proj") + ".lora_A.weight"].shape[0] == 7
    assert_rel_close(got, want)


def test_selective_layers_average_per_layer(keys):
    server, site, _ = keys
    he = EncryptedLayers(server)
    site_layers = [(0, 1), (1,), (1, 2)]
    states = [lora(4, k, layers=layers) for k, layers in enumerate(site_layers)]
    n = [5, 7, 11]
    updates = []
    for state in states:
        stubs, encrypted = he.vet({HE_KEY: encrypt_state(state, site, "layer")})
        assert set(stubs) == set(state)
        updates.append(encrypted)
    assert he.aggregate(updates, n) == [0, 1, 2]
    params = decrypt_payload(he.payload([1, 2])[HE_KEY], site)
    want = {k: v for k, v in average_layers(states, n).items() if ".layers.0." not in k}
    assert_rel_close(params, want)


def test_one_shot_folds_match_plaintext_in_any_arrival_order(keys):
    server, site, _ = keys
    states = [lora(4, k) for k in range(3)]
    avg, enc_avg = OnlineAverage(), EncryptedOnlineAverage(server)
    stk, enc_stk = OnlineStack(), EncryptedOnlineStack(server)
    for k in (2, 0, 1):  # arrival order
        wire = encrypt_state(states[k], site)
        avg.add(states[k], k + 1, f"s{k}")
        enc_avg.add(EncryptedUpdate.from_wire(wire, server, fresh=True), k + 1, f"s{k}")
        stk.add(states[k], k + 1, 0.5 * (k + 2), f"s{k}")
        enc_stk.add(EncryptedUpdate.from_wire(wire, server, fresh=True), k + 1, 0.5 * (k + 2), f"s{k}")
    for folded, plain in ((enc_avg.result(), avg.result()), (enc_stk.result(), stk.result())):
        assert_rel_close(EncryptedGlobal.from_wire(folded.to_wire(server), site).decrypt(site), plain)
    with pytest.raises(InvalidUpdate, match="already contributed"):
        enc_avg.add(EncryptedUpdate.from_wire(wire, server), 1, "s1")


def test_he_after_client_dp(keys):
    """DP on plaintext first, then encryption: the decrypted aggregate is the aggregate of the noised updates."""
    server, site, _ = keys
    g = torch.Generator().manual_seed(0)
    reference = lora(4, 99)
    noised = [privatize(lora(4, k), reference, clip=0.5, sigma=0.8, generator=g) for k in range(3)]
    params, want = run_lora_round(server, site, "fedit", [4, 4, 4], n=[1, 2, 3], states=noised)
    assert_rel_close(params, want)


def test_fedcdd_has_no_encrypted_form():
    with pytest.raises(ValueError, match="nonlinear"):
        check_he_method(get_method("fedcdd"))


def test_bad_updates_are_rejected_with_the_reason(keys, tmp_path):
    server, site, _ = keys
    he = EncryptedRounds(get_method("fedit"), server)
    state = lora(4, 0)
    wire = encrypt_state(state, site)
    with pytest.raises(InvalidUpdate, match="plaintext update while HE is on"):
        he.vet(state, 4, "s")
    short = {**wire, "groups": {**wire["groups"], "A": {**wire["groups"]["A"], "ciphertexts": []}}}
    with pytest.raises(InvalidUpdate, match="truncated or padded"):
        he.vet({HE_KEY: short}, 4, "s")
    blob = wire["groups"]["A"]["ciphertexts"][0]
    for bad in (blob[: len(blob) // 2], blob[:40] + bytes(len(blob) - 40)):
        tampered = {**wire, "groups": {**wire["groups"], "A": {**wire["groups"]["A"], "ciphertexts": [bad]}}}
        with pytest.raises(InvalidUpdate, match="not a ciphertext of this CKKS context"):
            he.vet({HE_KEY: tampered}, 4, "s")
    # another provisioning with other parameters: named by its context id, and SEAL refuses its data
    other = Ckks(*load_context(f"{provision_sim_contexts(str(tmp_path / 'o'), coeff_mod_bit_sizes=[60, 40, 60])}/"
                               f"{CLIENT_CONTEXT}", "site"))
    foreign = encrypt_state(state, other)
    with pytest.raises(InvalidUpdate, match="another HE context"):
        he.vet({HE_KEY: foreign}, 4, "s")
    with pytest.raises(InvalidUpdate, match="not a ciphertext of this CKKS context"):
        he.vet({HE_KEY: {**foreign, "context_id": server.context_id}}, 4, "s")
    # same parameters, another key: indistinguishable to the server by design; the site's decryption catches it
    twin = Ckks(*load_context(f"{provision_sim_contexts(str(tmp_path / 't'))}/{CLIENT_CONTEXT}", "site"))
    forged = {**encrypt_state(state, twin), "context_id": server.context_id}
    _, update = he.vet({HE_KEY: forged}, 4, "s")
    with pytest.raises(InvalidUpdate, match="another key or altered"):
        EncryptedUpdate.from_wire(update.to_wire(server), site).decrypt(site)
    he.plan([4, 4])  # a new round: its first accepted update sets the layout the others must share
    subset = encrypt_state(lora(4, 1, modules=("q_proj",)), site)
    he.vet({HE_KEY: subset}, 4, "site-0")  # vetted but not accepted (say check_update rejects it): no layout set
    stubs, first = he.vet({HE_KEY: wire}, 4, "site-1")
    accepted = [SiteUpdate(site="site-1", state=first, num_examples=1, rank=4, alpha=8.0)]
    with pytest.raises(InvalidUpdate, match="differ from site-1's this round"):
        he.vet({HE_KEY: subset}, 4, "site-2", accepted)
    reordered = {**wire, "groups": {g: {**v, "segments": v["segments"][::-1]} for g, v in wire["groups"].items()}}
    with pytest.raises(InvalidUpdate, match="segments not in key order"):  # one layout per key set
        he.vet({HE_KEY: reordered}, 4, "site-0")
    padded = EncryptedRounds(get_method("zero_pad"), server)
    padded.plan([4, 8])
    with pytest.raises(InvalidUpdate, match="zero-padded to rank"):
        padded.vet({HE_KEY: encrypt_state(state, site, pad_rank=6)}, 4, "s")
    with pytest.raises(ValueError, match="exceeds ±16, the bound"):
        encrypt_state({k: v * 1e4 for k, v in state.items()}, site)


def test_persisted_global_is_ciphertext(keys, tmp_path):
    server, site, _ = keys
    he = EncryptedRounds(get_method("fedit"), server)
    wire = encrypt_state(lora(4, 0), site)
    _, encrypted = he.vet({HE_KEY: wire}, 4, "s")
    rounds = [he.aggregate([SiteUpdate("s", encrypted, 3, 4, 8.0)])]
    (name,) = he.save(str(tmp_path), rounds, False, {})["he_persisted"]
    stored = load_wire(str(tmp_path / name))
    assert EncryptedGlobal.from_wire(stored, server).kind == "sum"  # loads with the public context only
    assert_rel_close(EncryptedGlobal.from_wire(stored, site).decrypt(site), lora(4, 0))


def test_one_shot_server_half_folds_arrivals(keys):
    server, site, _ = keys
    states = [lora(2, 0), lora(4, 1)]
    he = EncryptedFold(get_method("flora"), server)
    plain = OnlineStack()

    def fold(name, params, n, rank, alpha):  # as OneShotController.fold: the plaintext checks run on the stubs
        stubs, encrypted = he.vet(params, rank, name)
        check_update(SiteUpdate(name, stubs, n, rank, alpha))
        he.add(SiteUpdate(name, encrypted, n, rank, alpha))

    for k in (1, 0):
        fold(f"s{k}", {HE_KEY: encrypt_state(states[k], site)}, 10 * (k + 1), 2 * (k + 1), 4.0 * (k + 1))
        plain.add(states[k], 10 * (k + 1), 2.0, f"s{k}")
    params = decrypt_payload(he.payload()[HE_KEY], site)
    assert_rel_close(unpack_rounds(params)[0], plain.result())
    with pytest.raises(InvalidUpdate, match="expected rank 3"):
        fold("s2", {HE_KEY: encrypt_state(lora(2, 2), site)}, 1, 3, 6.0)


def test_site_filters_fail_closed(keys):
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext

    from flare_lora.privacy.flare.he_filters import HEDecryptFilter, HEEncryptFilter

    server, site, folder = keys
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    decrypt, encrypt = HEDecryptFilter(f"{folder}/{CLIENT_CONTEXT}"), HEEncryptFilter(f"{folder}/{CLIENT_CONTEXT}")
    for f in (decrypt, encrypt):
        f.handle_event(EventType.START_RUN, fl_ctx)
    plan = EncryptedRounds(get_method("fedit"), server).plan([4])
    task = lambda params, meta: DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable()  # noqa: E731
    with pytest.raises(HEContextError, match="no HE plan"):
        decrypt.process(task({}, {}), fl_ctx)
    with pytest.raises(HEContextError, match="another HE context"):
        decrypt.process(task({}, {"he": {**plan, "context_id": "other"}}), fl_ctx)
    with pytest.raises(HEContextError, match="plaintext tensor"):
        decrypt.process(task(lora(4, 0), {"he": plan}), fl_ctx)
    fresh = FLContext()
    fresh.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    with pytest.raises(HEContextError, match="no HE plan for this task"):  # nothing leaves without a plan
        encrypt.process(task(lora(4, 0), {}), fresh)
    decrypt.process(task({}, {"he": plan}), fl_ctx)  # an empty task still hands its plan on
    sent = from_shareable(encrypt.process(task(lora(4, 0), {"rank": 4, "alpha": 8}), fl_ctx)).data
    assert list(sent) == [HE_KEY]
    assert_rel_close(EncryptedUpdate.from_wire(sent[HE_KEY], site).decrypt(site), lora(4, 0))


def test_recipe_refuses_he_it_cannot_honour(tmp_path, tiny_model_dir):
    from flare_lora.components.flare.recipe import LoraRecipe
    from flare_lora.components.training.config import ConfigError

    sites = {"site-1": {"rank": 2}, "site-2": {"rank": 2}}
    with pytest.raises(ConfigError, match="nonlinear"):
        LoraRecipe(sites=sites, model=str(tiny_model_dir), method="fedcdd", he=True)
    with pytest.raises(FileNotFoundError, match="server_context.tenseal"):
        LoraRecipe(sites=sites, model=str(tiny_model_dir), he=True, he_context_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="zero_pad with he"):
        LoraRecipe(sites={"site-1": {"rank": 2}, "site-2": {"rank": 4, "target_modules": ["q_proj"]}},
                   model=str(tiny_model_dir), method="zero_pad", he=True)
    with pytest.raises(ConfigError, match="checkpoint"):
        LoraRecipe(sites=sites, model=str(tiny_model_dir), he=True, checkpoint_dir="ckpt")
