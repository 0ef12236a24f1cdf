"""Differential privacy: Opacus DP-SGD in the shared loop, the site ledger and budget, client-level
DP (math and FLARE filter), update references per method, DP config and job wiring.

Real Opacus, real PEFT, a tiny random Llama; every claim is measured (per-record gradients by
separate backward passes, noise by subtraction), not assumed.
"""

import json
import math
import multiprocessing
import os
import shutil
import statistics

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from flare_lora.components.data.prompts import collate, encode
from flare_lora.components.strategies import get_method
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.components.training.lora import add_lora, layer_state, lora_state, reset_lora
from flare_lora.components.training.models import load_model_and_tokenizer
from flare_lora.components.training.trainer import _sample_losses, train_lora
from flare_lora.privacy.client_dp import clip_update, client_epsilon, privatize, update_norm
from flare_lora.components.site_local import SiteLocal
from flare_lora.privacy.dp_sgd import DPSGD, DPUnsupported, PrivacyBudgetExceeded
from flare_lora.privacy.ledger import PrivacyLedger, epsilon, site_ledger, site_root
from flare_lora.privacy.dp_reference import derive_reference
from ledger_charges import charge_many

RECORDS = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 0), (4, 4), (1, 1), (2, 5), (3, 3)] * 4
]  # 40 records: δ = 1e-5 < 1/N, q = batch / 40


def dp_config(**kw) -> SiteConfig:
    base = dict(rank=4, alpha=8.0, local_steps=3, batch_size=2, max_length=32, dp_noise_multiplier=0.8)
    return SiteConfig(**{**base, **kw})


@pytest.fixture
def site(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    return add_lora(model, dp_config(), "site-1"), tokenizer


# --- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_equals_opacus_accountant_across_rounds_and_restarts(site, tmp_path, accountant):
    model, tokenizer = site
    cfg = dp_config(dp_accountant=accountant)
    ledger = tmp_path / "ledger.jsonl"
    dp = DPSGD(cfg, len(RECORDS), site="site-1", ledger=PrivacyLedger(str(ledger)), noise_seed=0)
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    rounds = 2 if accountant == "rdp" else 1  # PRV's ε takes seconds to compute
    for rnd in range(rounds):
        stats = train_lora(model, tokenizer, RECORDS, cfg, dp=dp)
        for _ in range(cfg.local_steps):
            reference.step(noise_multiplier=0.8, sample_rate=2 / 40)
        assert stats["dp"]["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
        assert stats["dp"]["steps"] == cfg.local_steps * (rnd + 1) and stats["dp"]["sample_rate"] == 2 / 40
    # a restarted site reads the same ledger back: same spent budget
    again = DPSGD(cfg, len(RECORDS), site="site-1", ledger=PrivacyLedger(str(ledger)))
    assert again.spent == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    # charged in blocks of 1, 1, 2, ... steps, each at most the steps already taken: 1, 1, 1 for 3 steps
    assert [json.loads(line)["steps"] for line in ledger.read_text().splitlines()] == [1, 1, 1] * rounds


def test_ledger_holds_the_steps_that_ran_and_noise_is_drawn_on_the_parameters_device(site, tmp_path):
    """Each step is charged just before its noise: when another job at the site spends the budget
    mid-round, the round stops at the refused step and the ledger holds only the steps taken. The
    noise generator lives on the parameters' device (a CPU generator fails on CUDA parameters)."""
    model, _ = site
    path = str(tmp_path / "ledger.jsonl")
    cfg = dp_config(local_steps=3)
    cfg = dp_config(local_steps=3, dp_epsilon_max=DPSGD(cfg, len(RECORDS)).epsilon_after(3) * 1.01)
    dp = DPSGD(cfg, len(RECORDS), site="site-1", ledger=PrivacyLedger(path))
    params = [p for p in model.parameters() if p.requires_grad]
    session = dp.session(model, torch.optim.SGD(params, lr=0.1), len(RECORDS), cfg)
    assert session.optimizer.generator.device == params[0].device
    with pytest.raises(PrivacyBudgetExceeded, match="site 'site-1'.*1 more DP step.*ledger grew"):
        with session:
            session.step()  # a noisy step (no record sampled): charged, then taken
            PrivacyLedger(path).charge(dp.noise_multiplier, dp.sample_rate, 500, site="other job")
            session.step()
    assert [e["steps"] for e in PrivacyLedger(path).entries] == [1, 500]
    assert session.noisy_steps == 1
    # a longer round is charged in doubling blocks, never ahead of more than the steps already taken
    long = dp_config(local_steps=10)
    dp = DPSGD(long, len(RECORDS), site="site-1")
    with dp.session(model, torch.optim.SGD(params, lr=0.0), len(RECORDS), long) as session:
        for taken in range(10):
            session.step()
            assert taken + 1 <= dp.ledger.steps <= max(1, 2 * taken)
    assert [e["steps"] for e in dp.ledger.entries] == [1, 1, 2, 4, 2]


def test_target_epsilon_sets_sigma_over_the_planned_steps():
    cfg = dp_config(dp_noise_multiplier=None, dp_epsilon=4.0, dp_planned_steps=30)
    dp = DPSGD(cfg, len(RECORDS))
    expected = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=2 / 40, steps=30)
    assert dp.noise_multiplier == expected
    assert 3.95 <= dp.epsilon_after(30) <= 4.0
    with pytest.raises(ConfigError, match="key 'dp_planned_steps'"):
        DPSGD(dp_config(dp_noise_multiplier=None, dp_epsilon=4.0), len(RECORDS), site="site-1")


# --- DP-SGD mechanics ---------------------------------------------------------------------------


def per_record_grads(model, tokenizer, records, params):
    """Each record's gradient by its own backward pass (no Opacus)."""
    grads = []
    for record in records:
        sums, counts = _sample_losses(model, collate([encode(tokenizer, record, 32)], tokenizer.pad_token_id))
        grads.append(torch.autograd.grad((sums / counts).sum(), params))
    return grads


@pytest.mark.parametrize("clipping", ["hooks", "functorch", "ghost", "fast"])
def test_per_record_gradients_are_clipped_and_noise_matches_sigma_c(site, clipping):
    model, tokenizer = site
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch_records = RECORDS[:4]
    grads = per_record_grads(model, tokenizer, batch_records, params)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in gs)) for gs in grads]
    clip = statistics.median(norms)  # some records clipped, some not
    assert min(norms) < clip < max(norms)
    expected = [sum(g * min(1.0, clip / n) for g, n in zip(per_param, norms)) for per_param in zip(*grads)]

    cfg = dp_config(local_steps=1, dp_max_grad_norm=clip, dp_clipping=clipping, dp_noise_multiplier=2.0)
    dp = DPSGD(cfg, len(RECORDS), noise_seed=7)
    optimizer = torch.optim.SGD(params, lr=0.0)
    captured = {}
    with dp.session(model, optimizer, len(RECORDS), cfg) as session:
        sums, counts = _sample_losses(model, collate([encode(tokenizer, r, 32) for r in batch_records],
                                                     tokenizer.pad_token_id))
        session.backward(sums / counts)
        summed = [p.summed_grad.clone() for p in params]
        session.optimizer.attach_step_hook(lambda opt: captured.update(grads=[p.grad.clone() for p in params]))
        session.step()
    for got, want in zip(summed, expected):  # Σ_i min(1, C/‖g_i‖) g_i, with the norms we measured
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    assert math.sqrt(sum(float(s.pow(2).sum()) for s in summed)) <= len(batch_records) * clip * (1 + 1e-4)
    noise = torch.cat([(g * dp.sample_rate * dp.num_records - s).flatten() for g, s in zip(captured["grads"], summed)])
    assert noise.numel() > 1000
    assert float(noise.std()) == pytest.approx(2.0 * clip, rel=0.1) and abs(float(noise.mean())) < 0.1 * 2.0 * clip
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in params)  # Opacus detached


def test_noise_is_present_and_reproducible_only_with_a_seed(tiny_model_dir):
    cfg = dp_config(local_steps=1)

    def train(noise_seed):
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        peft = add_lora(model, cfg, "site-1")
        train_lora(peft, tokenizer, RECORDS, cfg, dp=DPSGD(cfg, len(RECORDS), noise_seed=noise_seed))
        return torch.cat([v.flatten() for v in lora_state(peft).values()])

    same, again, other, secure = train(1), train(1), train(2), train(None)
    assert torch.equal(same, again)
    assert not torch.allclose(same, other) and not torch.allclose(same, secure)
    assert not torch.allclose(secure, train(None))  # OS entropy: no public seed reproduces the noise


def test_opacus_failure_is_loud_and_charges_nothing(tiny_model_dir):
    """Ghost clipping cannot handle the tied embedding of full-parameter training."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dp_config(dp_clipping="ghost", batch_size=40, local_steps=1)  # q = 1: the first draw is not empty
    dp = DPSGD(cfg, len(RECORDS), site="site-3")
    with pytest.raises(DPUnsupported, match="site 'site-3': Opacus \\(ghost\\) cannot .*refusing to train without DP"):
        train_lora(model, tokenizer, RECORDS, cfg, dp=dp)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and dp.ledger.steps == 0


# --- budget -------------------------------------------------------------------------------------


def test_budget_refuses_before_training_and_survives_restarts(site, tmp_path):
    model, tokenizer = site
    path = str(tmp_path / "ledger.jsonl")
    cfg = dp_config()
    one_round = DPSGD(cfg, len(RECORDS)).epsilon_after(cfg.local_steps)
    two_rounds = DPSGD(cfg, len(RECORDS)).epsilon_after(2 * cfg.local_steps)
    budget = dict(dp_epsilon_max=(one_round + two_rounds) / 2)
    dp = DPSGD(dp_config(**budget), len(RECORDS), site="site-2", ledger=PrivacyLedger(path))
    train_lora(model, tokenizer, RECORDS, dp_config(**budget), dp=dp)
    before = lora_state(model)
    with pytest.raises(PrivacyBudgetExceeded, match="site 'site-2': key 'dp_epsilon_max'.*refusing to train"):
        train_lora(model, tokenizer, RECORDS, dp_config(**budget), dp=dp)
    assert all(torch.equal(v, lora_state(model)[k]) for k, v in before.items())
    # a restart with a budget already spent fails before training, naming site and key
    with pytest.raises(ConfigError, match="site 'site-2': key 'dp_epsilon_max': budget .* already spent"):
        DPSGD(dp_config(dp_epsilon_max=one_round * 0.9), len(RECORDS), site="site-2", ledger=PrivacyLedger(path))
    # the site admin's budget (local/flare_lora.json) is charged at the site's own δ: the job's
    # looser budget and δ cannot stretch it
    spent = PrivacyLedger(path).epsilon(1e-5)
    admin = SiteLocal.parse('{"dp_epsilon_max": %r, "dp_delta": 1e-9}' % (spent * 1.01), "site-2", "kit/local/x.json")
    assert PrivacyLedger(path).epsilon(1e-9) > spent * 1.01
    with pytest.raises(ConfigError, match=r"budget [0-9.]+ \(dp_epsilon_max of kit/local/x.json\) already spent"):
        DPSGD(dp_config(dp_epsilon_max=100.0), len(RECORDS), site="site-2", ledger=PrivacyLedger(path), local=admin)
    # where the site names no δ or accountant: at most 1e-5 and RDP, not a looser δ and PRV the job picks
    admin = SiteLocal.parse('{"dp_epsilon_max": %r}' % (spent * 0.99), "site-2", "kit/local/x.json")
    assert PrivacyLedger(path).epsilon(0.02, "prv") < spent * 0.99
    with pytest.raises(ConfigError, match=r"dp_epsilon_max of kit/local/x.json\) already spent"):
        DPSGD(dp_config(dp_delta=0.02, dp_accountant="prv", dp_epsilon_max=100.0), len(RECORDS), site="site-2",
              ledger=PrivacyLedger(path), local=admin)
    # ... and the environment is the fallback where the file leaves the budget unset
    env = {"FLARE_LORA_DP_EPSILON_MAX_SITE_2": "0.5", "FLARE_LORA_DP_EPSILON_MAX": "9"}
    assert SiteLocal(site="site-2").with_environment(env).dp_epsilon_max == 0.5
    assert SiteLocal(site="site-1").with_environment(env).dp_epsilon_max == 9.0
    assert SiteLocal(site="site-2", dp_epsilon_max=2.0).with_environment(env).dp_epsilon_max == 2.0
    with pytest.raises(ConfigError, match="FLARE_LORA_DP_EPSILON_MAX_SITE_2='x'"):
        SiteLocal(site="site-2").with_environment({"FLARE_LORA_DP_EPSILON_MAX_SITE_2": "x"})
    (tmp_path / "bad.jsonl").write_text("{")
    with pytest.raises(ValueError, match="bad.jsonl:1: unreadable.*refusing to start from an empty budget"):
        PrivacyLedger(str(tmp_path / "bad.jsonl"))


def test_two_processes_charging_one_ledger_lose_nothing_and_never_pass_the_budget(tmp_path):
    """Jobs at one site charge one ledger: every release is in the journal, and a budget checked
    at the charge holds across processes (without the lock, both would read the same history)."""
    path, tally = str(tmp_path / "ws" / "flare_lora_privacy" / "x.jsonl"), str(tmp_path / "ws" / ".tally")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        assert pool.starmap(charge_many, [(path, tally, 30, None)] * 2) == [0, 0]
    assert len(PrivacyLedger(path).entries) == 60 and open(tally).read() == "60"
    budget = epsilon([(1.0, 0.05, 1)] * 80, 1e-5)  # room for 20 more releases, 40 tried
    with ctx.Pool(2) as pool:
        refused = pool.starmap(charge_many, [(path, tally, 20, budget)] * 2)
    assert sum(refused) == 20 and len(PrivacyLedger(path).entries) == 80
    assert PrivacyLedger(path).epsilon(1e-5) <= budget


def test_a_ledger_that_vanished_or_shrank_is_no_fresh_budget(tmp_path):
    root = str(tmp_path / "site-1")
    ledger = site_ledger(root, "dp_sgd.jsonl")
    for _ in range(3):
        ledger.charge(1.0, 0.05, 10)
    journal = tmp_path / "site-1" / "flare_lora_privacy" / "dp_sgd.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0] + "\n")  # a job's code truncates it
    with pytest.raises(ValueError, match="holds 1 release.*counts 3 at this site.*admin deletes both files"):
        site_ledger(root, "dp_sgd.jsonl")
    shutil.rmtree(journal.parent)  # ... or deletes the ledger folder
    with pytest.raises(ValueError, match="holds 0 release.*counts 3"):
        site_ledger(root, "dp_sgd.jsonl")
    os.remove(os.path.join(root, ".flare_lora_privacy_dp_sgd.jsonl.count"))  # the admin resets it on purpose
    assert site_ledger(root, "dp_sgd.jsonl").entries == []


def test_an_earlier_versions_ledger_is_carried_over_not_forgotten(tmp_path):
    folder = tmp_path / "site-1" / "flare_lora_privacy"
    folder.mkdir(parents=True)
    old = {"entries": [{"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 10, "round": 0}] * 2}
    (folder / "dp_sgd.json").write_text(json.dumps(old))
    ledger = site_ledger(str(tmp_path / "site-1"), "dp_sgd.jsonl")
    assert ledger.steps == 20 and all(e["imported_from"].endswith("dp_sgd.json") for e in ledger.entries)
    ledger.charge(1.0, 0.05, 5)
    assert site_ledger(str(tmp_path / "site-1"), "dp_sgd.jsonl").steps == 25  # imported once
    assert json.loads((folder / "dp_sgd.json").read_text()) == old  # the old file stays as it was
    (folder / "client_dp.json").write_text("{not json")
    with pytest.raises(ValueError, match="an earlier version's.*refusing to start"):
        site_ledger(str(tmp_path / "site-1"), "client_dp.jsonl")


def test_site_workspace_holds_the_ledger(tmp_path):
    root = tmp_path / "site-1"
    (root / "startup").mkdir(parents=True)
    (root / "local").mkdir()
    app = root / "job-1" / "app_site-1"
    app.mkdir(parents=True)
    assert site_root(str(app)) == str(root) and site_root(str(tmp_path)) is None
    # a job that ships its own startup/ and local/ in its app folder does not become the site's kit
    (app / "startup").mkdir()
    (app / "local").mkdir()
    assert site_root(str(app)) == str(app) and site_root(str(app), job_id="job-1") == str(root)
    dp = DPSGD.for_site(dp_config(), "site-1", len(RECORDS), SiteLocal(site="site-1", root=site_root(str(app), "job-1")))
    assert dp.ledger.path == str(root / "flare_lora_privacy" / "dp_sgd.jsonl")
    assert DPSGD.for_site(SiteConfig(), "site-1", len(RECORDS), SiteLocal(site="site-1", root=str(root))) is None


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, key", [
    ({"dp_epsilon": 0}, "dp_epsilon"),
    ({"dp_epsilon": -1.0}, "dp_epsilon"),
    ({"dp_epsilon": float("nan")}, "dp_epsilon"),
    ({"dp_noise_multiplier": 0}, "dp_noise_multiplier"),
    ({"dp_epsilon": 1.0, "dp_delta": 0}, "dp_delta"),
    ({"dp_epsilon": 1.0, "dp_delta": 1.0}, "dp_delta"),
    ({"dp_epsilon": 1.0, "dp_delta": 1.5}, "dp_delta"),
    ({"dp_epsilon": 1.0, "dp_max_grad_norm": 0}, "dp_max_grad_norm"),
    ({"dp_epsilon": 1.0, "dp_max_grad_norm": -2.0}, "dp_max_grad_norm"),
    ({"dp_epsilon": 1.0, "dp_accountant": "gdp"}, "dp_accountant"),
    ({"dp_epsilon": 1.0, "dp_clipping": "magic"}, "dp_clipping"),
    ({"dp_epsilon": 1.0, "dp_noise_multiplier": 1.0}, "dp_noise_multiplier"),
    ({"dp_max_grad_norm": 1.0}, "dp_max_grad_norm"),  # a DP option with DP off: never silently off
    ({"dp_epsilon_max": 8.0}, "dp_epsilon_max"),
    ({"dp_epsilon": 8.0, "dp_epsilon_max": 4.0}, "dp_epsilon"),
])
def test_bad_dp_settings_name_site_and_key(settings, key):
    with pytest.raises(ConfigError, match=f"site 'site-2': key '{key}'"):
        SiteConfig.from_dict(settings, "site-2")


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ConfigError, match="site 'site-1': key 'dp_delta': expected < 1 / training records"):
        DPSGD(dp_config(dp_delta=0.05), len(RECORDS), site="site-1")


# --- client-level DP ----------------------------------------------------------------------------


def state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(8, 64, generator=g) * scale, "m.lora_B.weight": torch.randn(64, 8, generator=g) * scale}


def test_client_update_is_clipped_to_c_and_noise_is_sigma_c():
    reference, change = state(0), state(1, scale=0.1)
    result = {k: reference[k] + change[k] for k in reference}
    clip = 0.3 * update_norm(change)
    clipped = privatize(result, reference, clip, 0.0)
    delta = {k: clipped[k] - reference[k] for k in clipped}
    assert update_norm(delta) == pytest.approx(clip, rel=1e-5)
    for k in delta:  # same direction, only shorter
        torch.testing.assert_close(delta[k], change[k] * (clip / update_norm(change)), rtol=1e-4, atol=1e-6)
    inside = privatize(result, reference, 2 * update_norm(change), 0.0)
    assert all(torch.allclose(inside[k], result[k], atol=1e-6) for k in result)
    noisy = privatize(result, reference, clip, 1.5, torch.Generator().manual_seed(0))
    noise = torch.cat([(noisy[k] - clipped[k]).flatten() for k in noisy])
    assert float(noise.std()) == pytest.approx(1.5 * clip, rel=0.05)
    again = privatize(result, reference, clip, 1.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(again[k], noisy[k]) for k in noisy)
    with pytest.raises(ValueError, match="missing"):
        privatize(result, {"m.lora_A.weight": reference["m.lora_A.weight"]}, clip, 1.0)


def test_client_epsilon_is_the_gaussian_mechanism_with_sensitivity_2c():
    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=3.0 / 2, sample_rate=1.0)
    assert client_epsilon(3.0, 5, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert client_epsilon(3.0, 0, 1e-5) == 0.0


def filter_call(flt, data, meta, rnd, kind=None, direction="out", task="task-0", job="job-1"):
    """``flt.process`` on a DXO in a context set as FLARE's client runner sets it (site-2, ``job``, ``task``)."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    dxo = DXO(kind or DataKind.WEIGHTS, data=data, meta={MetaKey.INITIAL_METRICS: {"eval_loss": 1.0}, **meta})
    shareable = dxo.to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, rnd)
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-2", private=False, sticky=False)
    ctx.set_prop(FLContextKey.CURRENT_RUN, job, private=False, sticky=True)
    ctx.set_prop(FLContextKey.TASK_ID, task, private=True, sticky=False)
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    return from_shareable(flt.process(shareable, ctx))


def test_flare_filter_privatizes_the_change_accounts_rounds_and_fails_closed():
    from nvflare.apis.dxo import MetaKey
    from nvflare.apis.fl_constant import FilterKey

    from flare_lora.privacy.flare.client_dp_filter import ClientDPFilter

    reference, change = state(0), state(1, scale=0.01)
    result = {k: reference[k] + change[k] for k in reference}

    def release(flt, rnd, task):
        filter_call(flt, {k: v.clone() for k, v in reference.items()}, {}, rnd, direction=FilterKey.IN, task=task)
        return filter_call(flt, {k: v.clone() for k, v in result.items()}, {}, rnd, task=task)

    out = release(ClientDPFilter(clip=0.05, sigma=1.0, seed=3), 0, "a0")
    noise = torch.cat([(out.data[k] - reference[k] - clip_update(change, 0.05)[k]).flatten() for k in result])
    assert float(noise.std()) == pytest.approx(0.05, rel=0.05)
    assert out.meta["client_dp"]["releases"] == 1
    assert out.meta[MetaKey.INITIAL_METRICS]["client_dp_epsilon"] == pytest.approx(client_epsilon(1.0, 1, 1e-5))
    # same seed reproduces, another seed differs
    flt = ClientDPFilter(clip=0.05, sigma=1.0, seed=3)
    same = release(flt, 0, "b0")
    assert all(torch.equal(same.data[k], out.data[k]) for k in result)
    other = release(ClientDPFilter(clip=0.05, sigma=1.0, seed=4), 0, "c0")
    assert not torch.equal(other.data["m.lora_A.weight"], out.data["m.lora_A.weight"])
    # accounting across rounds: the second release of the same filter composes
    second = release(flt, 1, "b1")
    assert second.meta[MetaKey.INITIAL_METRICS]["client_dp_epsilon"] == pytest.approx(client_epsilon(1.0, 2, 1e-5))
    # fail closed: a spent budget (other cases: tests/test_client_dp_filter.py)
    budget = ClientDPFilter(clip=0.05, sigma=1.0, epsilon_max=client_epsilon(1.0, 1, 1e-5) * 1.1)
    release(budget, 0, "d0")
    with pytest.raises(RuntimeError, match="refusing to send the update"):
        release(budget, 1, "d1")


@pytest.mark.parametrize("kwargs, key", [
    (dict(clip=0, sigma=1.0), "clip"), (dict(clip=1.0, sigma=-1), "sigma"), (dict(clip=1.0, sigma=1.0, delta=1.0), "delta"),
    (dict(clip=1.0, sigma=1.0, epsilon_max=0), "epsilon_max"), (dict(clip=float("inf"), sigma=1.0), "clip"),
])
def test_client_filter_bad_options_name_the_key(kwargs, key):
    from flare_lora.privacy.flare.client_dp_filter import ClientDPFilter

    with pytest.raises(ValueError, match=f"client DP {key}"):
        ClientDPFilter(**kwargs)


def test_a_job_cannot_fix_the_client_dp_noise_seed(tiny_model_dir):
    from flare_lora.components.flare.recipe import LoraRecipe

    with pytest.raises(ConfigError, match="client_dp: seed: .*a job cannot fix it"):
        LoraRecipe(sites=["site-1"], model=str(tiny_model_dir), client_dp={"clip": 0.1, "sigma": 1.0, "seed": 7})


# --- the filter's own reference is where local training started, for every method -----------------


@pytest.mark.parametrize("method_name, rank", [("flora", 4), ("fedit", 4), ("zero_pad", 2), ("fedcdd", 2)])
def test_derived_reference_is_the_installed_start_for_each_method(tiny_model_dir, method_name, rank):
    """What the DP filter derives from the task (received global, handed-out seed) is exactly what the
    site installed, so clipping the change loses nothing of training and none of it is spent on A₀."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    cfg = SiteConfig(rank=rank, alpha=3.0 * rank, local_steps=3, batch_size=4, max_length=32, lr=1e-2)
    peft = add_lora(model, cfg, "site-1")
    method, seed = get_method(method_name), 1234567
    donor = add_lora(load_model_and_tokenizer(tiny_model_dir)[0], SiteConfig(rank=4, alpha=8.0), "g")
    reset_lora(donor, 5)
    global_state = {k: v + 0.05 if "lora_B" in k else v for k, v in lora_state(donor).items()}
    received = {f"r0/{k}": v for k, v in global_state.items()} if method_name == "flora" else global_state
    method.install(peft, received, 0 if method_name == "flora" else 1, seed=seed)
    start = lora_state(peft)
    derived = derive_reference({k: tuple(v.shape) for k, v in start.items()},
                               {} if method_name == "flora" else global_state, method_name, seed, cfg.alpha / rank)
    assert sorted(derived) == sorted(start)
    for key in start:
        torch.testing.assert_close(derived[key], start[key], rtol=1e-6, atol=1e-7)
    train_lora(peft, tokenizer, RECORDS, cfg)
    result = lora_state(peft)
    change = {k: result[k] - derived[k] for k in result}
    assert 0 < update_norm(change) < 0.5 * update_norm(result)
    kept = privatize(result, derived, update_norm(change) * 1.001, 0.0)
    assert all(torch.allclose(kept[k], result[k], atol=1e-6) for k in result)
    raw = clip_update(result, update_norm(change))  # clipping the raw factors instead destroys them
    assert update_norm({k: raw[k] - result[k] for k in result}) > update_norm(change)
    # round 0 of an averaging method: an empty task, the shared fresh adapter of the handed-out seed
    if method_name != "flora":
        method.install(peft, {}, 0, seed=seed)
        fresh = derive_reference({k: tuple(v.shape) for k, v in start.items()}, {}, method_name, seed, None)
        assert all(torch.equal(fresh[k], lora_state(peft)[k]) for k in fresh)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_selective_site_reference_and_dp(tiny_model_dir, mode):
    from flare_lora.components.flare.client_train import SelectiveSite

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    cfg = SiteConfig(rank=4, alpha=8.0, local_steps=2, batch_size=2, max_length=32, lr=1e-2)
    if mode == "lora":
        model = add_lora(model, cfg, "site-1")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    handler = SelectiveSite(model, tokenizer, RECORDS, RECORDS[:4], cfg, site="site-1", mode=mode)
    handler.install(layer_state(model, [1], mode), {"layer_versions": {"1": 1}})  # the server sent layer 1
    global_layer = layer_state(model, [1], mode)
    update, _ = handler.train([1], init_seed=99)
    derived = derive_reference({k: tuple(v.shape) for k, v in update.items()}, global_layer, "selective", 99)
    assert all(torch.equal(derived[k], global_layer[k]) for k in update)  # the global values it was sent
    assert 0 < update_norm({k: update[k] - derived[k] for k in update})
    if mode == "lora":  # layer 0 never reached by a global: it starts from the handed-out seed's fresh adapter
        update, _ = handler.train([0], init_seed=99)
        fresh = derive_reference({k: tuple(v.shape) for k, v in update.items()}, {}, "selective", 99)
        assert all(torch.equal(fresh[k], layer_state(model, [0], mode)[k]) for k in update)
        assert 0 < update_norm({k: update[k] - fresh[k] for k in update}) < 0.5 * update_norm(update)
    else:  # full weights never sent: no data-independent start is known, the filter refuses
        with pytest.raises(ValueError, match="never sent by the server"):
            derive_reference({k: tuple(v.shape) for k, v in update.items()}, {}, "selective", 99)

    dp_cfg = SiteConfig(**{**cfg.to_dict(), "dp_noise_multiplier": 1.0, "dp_clipping": "hooks"})
    private = SelectiveSite(model, tokenizer, RECORDS, RECORDS[:4], dp_cfg, site="site-1", mode=mode,
                            dp=DPSGD(dp_cfg, len(RECORDS), site="site-1"))
    scored = private.score("grad_norm")
    assert scored["scores"] == [0.0] * handler.num_layers and scored["dp_scores"] == "withheld"
    params, metrics, meta = private.handle("train", {}, {"layers": [0]})
    assert set(params) == {k for k in layer_state(model, [0], mode)}
    assert meta["train"]["dp"]["steps"] == 2 and metrics["dp_epsilon"] == pytest.approx(private.dp.spent)


# --- job wiring ---------------------------------------------------------------------------------


def test_recipes_plan_steps_add_the_filter_and_refuse_score_selection_with_dp(tmp_path, tiny_model_dir):
    from flare_lora.components.flare.one_shot_recipe import OneShotRecipe
    from flare_lora.components.flare.recipe import LoraRecipe
    from flare_lora.components.flare.selective_recipe import SelectiveRecipe

    sites = {f"site-{k}": {"rank": 2, "local_steps": 3, "dp_epsilon": 8.0} for k in (1, 2)}
    recipe = LoraRecipe(sites=sites, num_rounds=4, model=tiny_model_dir, client_dp={"clip": 0.1, "sigma": 1.0})
    assert {c["dp_planned_steps"] for c in recipe.sites.values()} == {12}
    recipe.export(str(tmp_path / "job"))
    for path in sorted((tmp_path / "job").rglob("config_fed_client.json")):
        config = json.loads(path.read_text())
        (entry,) = config["task_result_filters"]
        assert entry["tasks"] == ["train"]
        (flt,) = entry["filters"]
        assert flt["path"] == "flare_lora.privacy.flare.client_dp_filter.ClientDPFilter"
        assert flt["args"]["clip"] == 0.1 and flt["args"]["sigma"] == 1.0
        assert "dp_planned_steps=12" in json.dumps(config["executors"])
    for app in (tmp_path / "job").rglob("app_site-*"):  # the whole package ships, not a partial copy
        assert (app / "custom" / "flare_lora" / "privacy" / "dp_sgd.py").is_file()
    with pytest.raises(ValueError, match="client DP sigma"):
        LoraRecipe(sites=sites, model=tiny_model_dir, client_dp={"clip": 0.1, "sigma": 0})
    with pytest.raises(ConfigError, match="site 'site-1'.*selection 'selective' needs them"):
        SelectiveRecipe(sites=sites, model=tiny_model_dir, selection="selective")
    SelectiveRecipe(sites=sites, model=tiny_model_dir, selection="top", client_dp={"clip": 0.1, "sigma": 1.0})
    plain = {f"site-{k}": {"rank": 2} for k in (1, 2)}  # client DP alone: its filter derives the reference
    with pytest.raises(ConfigError, match="client_dp: mode 'full' trains layers the server has not sent"):
        SelectiveRecipe(sites=plain, model=tiny_model_dir, selection="top", mode="full", client_dp={"clip": 0.1, "sigma": 1.0})
    with pytest.raises(ConfigError, match="client_dp: selection 'selective' reads layer scores"):
        SelectiveRecipe(sites=plain, model=tiny_model_dir, client_dp={"clip": 0.1, "sigma": 1.0})
    with pytest.raises(ConfigError, match="client_dp: method 'full' trains from the sites' base weights"):
        OneShotRecipe(sites=plain, model=tiny_model_dir, method="full", client_dp={"clip": 0.1, "sigma": 1.0})


def test_job_flags_map_to_site_keys_and_filter_options():
    import argparse

    from flare_lora.privacy.dp_config import add_dp_args, client_dp_options, dp_site_settings

    p = argparse.ArgumentParser()
    add_dp_args(p)
    args = p.parse_args(["--dp-epsilon", "4", "--dp-clipping", "ghost", "--client-dp-clip", "0.1", "--client-dp-sigma", "2"])
    assert dp_site_settings(args) == {"dp_epsilon": 4.0, "dp_clipping": "ghost"}
    assert client_dp_options(args) == {"clip": 0.1, "sigma": 2.0}
    assert client_dp_options(p.parse_args([])) is None and dp_site_settings(p.parse_args([])) == {}
    with pytest.raises(ConfigError, match="--client-dp-sigma"):
        client_dp_options(p.parse_args(["--client-dp-clip", "0.1"]))
