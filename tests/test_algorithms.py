"""Math of the aggregation rules on small random LoRA states (real torch, fp32/fp64)."""

from __future__ import annotations

import re

import pytest
import torch

from flare_lora.components.algorithms.averaging import fedit, zero_pad
from flare_lora.components.algorithms.lora_state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    InvalidUpdate,
    lora_module_shapes,
    module_prefixes,
    validate_lora_update,
)
from flare_lora.components.algorithms.merge import (
    base_weight_name,
    float_masters,
    lora_delta,
    merge_lora_into,
    merge_rounds_into,
    weights_digest,
)
from flare_lora.components.algorithms.stacking import concat_lora, stack_lora

A, B = LORA_A_SUFFIX, LORA_B_SUFFIX
P = "base_model.model.model.layers.{}.self_attn.q_proj"
# {prefix: (out, in)}: non-square modules in both directions and a square one.
SHAPES = {P.format(0): (40, 24), P.format(1): (12, 40), P.format(2): (16, 16)}


def make_state(rank: int, gen: torch.Generator, shapes=SHAPES, dtype=torch.float32):
    state = {}
    for prefix, (out_dim, in_dim) in shapes.items():
        state[prefix + A] = torch.randn(rank, in_dim, generator=gen).to(dtype)
        state[prefix + B] = torch.randn(out_dim, rank, generator=gen).to(dtype)
    return state


def product(state, prefix):
    return state[prefix + B].double() @ state[prefix + A].double()


def weighted_update(states, weights, scalings, prefix):
    """Σ p_k s_k B_k A_k in float64 over the sites that have the module."""
    total = sum(weights)
    return sum(
        w / total * s * product(st, prefix)
        for st, w, s in zip(states, weights, scalings, strict=True)
        if prefix + A in st
    )


def rel_err(got, want):
    return float((got - want).norm() / want.norm())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def hetero(gen):
    """Four sites, ranks 2, 5, 8, 16; site 2 does not adapt module 1."""
    ranks = [2, 5, 8, 16]
    states = [make_state(r, gen) for r in ranks]
    del states[2][P.format(1) + A], states[2][P.format(1) + B]
    return states, [10.0, 30.0, 5.0, 55.0], [16.0 / r for r in ranks], ranks


# --- stacking ----------------------------------------------------------------------------------


def test_stack_is_exact_for_heterogeneous_ranks(hetero):
    states, weights, scalings, ranks = hetero
    g = stack_lora(states, weights, scalings)
    assert set(g) == {p + s for p in SHAPES for s in (A, B)}
    for prefix, (out_dim, in_dim) in SHAPES.items():
        present = [r for st, r in zip(states, ranks, strict=True) if prefix + A in st]
        assert g[prefix + A].shape == (sum(present), in_dim)
        assert g[prefix + B].shape == (out_dim, sum(present))
        assert g[prefix + A].dtype == torch.float32
        want = weighted_update(states, weights, scalings, prefix)
        assert rel_err(product(g, prefix), want) <= 1e-6
    assert g[P.format(1) + A].shape[0] == 2 + 5 + 16


def test_stack_rejects_mismatched_module_dims(gen):
    other = make_state(3, gen, {P.format(0): (40, 25)})
    with pytest.raises(ValueError, match=re.escape(P.format(0))):
        stack_lora([make_state(2, gen), other], [1, 1], [1, 1])


@pytest.mark.parametrize(
    "weights, scalings, message",
    [
        ([1.0, -1.0], [1.0, 1.0], "non-negative"),
        ([0.0, 0.0], [1.0, 1.0], "positive sum"),
        ([1.0], [1.0, 1.0], "1 weights for 2 sites"),
        ([1.0, 1.0], [1.0], "1 scalings for 2 sites"),
    ],
)
def test_stack_rejects_bad_weights(gen, weights, scalings, message):
    states = [make_state(2, gen), make_state(2, gen)]
    with pytest.raises(ValueError, match=message):
        stack_lora(states, weights, scalings)


def test_stack_keeps_a_shared_dtype_else_float32(gen):
    bf16 = [make_state(2, gen, dtype=torch.bfloat16) for _ in range(2)]
    assert stack_lora(bf16, [1, 1], [1, 1])[P.format(0) + A].dtype == torch.bfloat16
    mixed = [bf16[0], make_state(2, gen)]
    assert stack_lora(mixed, [1, 1], [1, 1])[P.format(0) + B].dtype == torch.float32


def test_aggregators_accept_live_parameters(gen):
    states = [{k: v.requires_grad_() for k, v in make_state(2, gen).items()} for _ in range(2)]
    for g in (
        stack_lora(states, [1, 1], [1, 1]),
        fedit(states, [1, 1]),
        zero_pad(states, [1, 1], [1, 1]),
    ):
        assert not any(t.requires_grad for t in g.values())


def test_concat_sums_updates(hetero):
    states = hetero[0]
    g = concat_lora(states)
    for prefix in SHAPES:
        want = sum(product(st, prefix) for st in states if prefix + A in st)
        assert rel_err(product(g, prefix), want) <= 1e-6


# --- averaging ---------------------------------------------------------------------------------


def test_fedit_is_not_exact(gen):
    states = [make_state(4, gen) for _ in range(4)]
    weights, scalings = [10.0, 30.0, 5.0, 55.0], [4.0] * 4
    g = fedit(states, weights)
    for prefix in SHAPES:
        want = weighted_update(states, weights, scalings, prefix)
        assert rel_err(4.0 * product(g, prefix), want) > 1e-3


def test_fedit_averages_all_sites(gen):
    states = [make_state(3, gen) for _ in range(3)]
    g = fedit(states, [1.0, 2.0, 1.0])
    for key in states[0]:
        want = 0.25 * states[0][key] + 0.5 * states[1][key] + 0.25 * states[2][key]
        torch.testing.assert_close(g[key], want)
        assert not torch.allclose(g[key], states[0][key])


def test_fedit_rejects_mismatched_sites(gen):
    key = P.format(0) + A
    short = make_state(3, gen)
    del short[P.format(2) + A], short[P.format(2) + B]
    with pytest.raises(ValueError, match=r"site 1: key .*layers\.2"):
        fedit([make_state(3, gen), short], [1, 1])
    wrong_rank = make_state(4, gen)
    with pytest.raises(
        ValueError, match=rf"site 1: {re.escape(key)} expected shape \(3, 24\), got \(4, 24\)"
    ):
        fedit([make_state(3, gen), wrong_rank], [1, 1])


def test_zero_pad_single_site_folds_scaling_exactly(gen):
    site = make_state(5, gen)
    g = zero_pad([site], [7.0], [0.5])
    for prefix in SHAPES:
        assert torch.equal(g[prefix + A], site[prefix + A])
        assert torch.equal(g[prefix + B], 0.5 * site[prefix + B])


def test_zero_pad_pads_to_max_rank_and_installs_back(gen):
    small, big = make_state(2, gen), make_state(5, gen)
    weights, scalings = [1.0, 3.0], [8.0, 2.0]
    g = zero_pad([small, big], weights, scalings)
    for prefix, (out_dim, in_dim) in SHAPES.items():
        a_g, b_g = g[prefix + A], g[prefix + B]
        assert a_g.shape == (5, in_dim) and b_g.shape == (out_dim, 5)
        # Rows/columns beyond rank 2 come from the big site only: the small one padded zeros.
        assert torch.equal(a_g[2:], 0.75 * big[prefix + A][2:])
        assert torch.equal(b_g[:, 2:], (0.75 * 2.0) * big[prefix + B][:, 2:])
        # The small site installs the first r_k rows/columns and unfolds its scaling.
        a_small, b_small = a_g[:2], b_g[:, :2] / 8.0
        torch.testing.assert_close(a_small, 0.25 * small[prefix + A] + 0.75 * big[prefix + A][:2])
        torch.testing.assert_close(
            b_small, 0.25 * small[prefix + B] + 0.75 * 2.0 / 8.0 * big[prefix + B][:, :2]
        )
        assert (
            rel_err(product(g, prefix), weighted_update([small, big], weights, scalings, prefix))
            > 1e-3
        )


# --- merging -----------------------------------------------------------------------------------


def test_base_weight_name():
    assert base_weight_name(P.format(0)) == "model.layers.0.self_attn.q_proj.weight"
    assert base_weight_name("model.proj") == "model.proj.weight"


def test_merge_adds_scaled_delta_to_parameters(gen):
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(24, 40, bias=False)})
    before = model["proj"].weight.detach().clone()
    state = make_state(3, gen, {"base_model.model.proj": (40, 24)})
    merge_lora_into(dict(model.named_parameters()), state, scaling=0.5)
    delta = lora_delta(state, 0.5)["proj.weight"]
    assert torch.equal(model["proj"].weight.detach(), before + delta)
    torch.testing.assert_close(
        delta, 0.5 * state["base_model.model.proj" + B] @ state["base_model.model.proj" + A]
    )


def test_merge_rejects_missing_or_misshaped_weight(gen):
    state = make_state(3, gen, {"base_model.model.proj": (40, 24)})
    with pytest.raises(KeyError, match="proj.weight"):
        merge_lora_into({}, state)
    with pytest.raises(ValueError, match="proj.weight"):
        merge_lora_into({"proj.weight": torch.zeros(24, 40)}, state)


def test_catch_up_is_bit_exact(gen):
    rounds = [
        stack_lora([make_state(r, gen), make_state(2 * r, gen)], [1, 2], [1.0, 0.5])
        for r in (1, 2, 3)
    ]
    base = {
        base_weight_name(p): torch.randn(shape, generator=gen).to(torch.bfloat16)
        for p, shape in SHAPES.items()
    }
    live = {k: v.clone() for k, v in base.items()}
    late = {k: v.clone() for k, v in base.items()}
    for r in rounds:
        merge_rounds_into(live, [r])
    merge_rounds_into(late, rounds)
    assert all(torch.equal(live[k], late[k]) for k in base)
    assert weights_digest(live) == weights_digest(late)
    assert weights_digest(live) != weights_digest(base)
    late[base_weight_name(P.format(1))][0, 0] += 1
    assert weights_digest(live) != weights_digest(late)


def _small_rounds(gen, n, scale=1e-2):
    """n stacked FLoRA rounds whose ΔW ≈ 1e-4 per entry (what bf16 sites merge each round)."""
    return [stack_lora([{k: v * scale for k, v in make_state(2, gen).items()}], [1], [1.0]) for _ in range(n)]


def test_bf16_merge_keeps_every_round_within_one_rounding(gen):
    """Ten rounds of ΔW ≈ 1e-4 on W ≈ N(0, 0.05²): a bf16 site holds cast(W0 + Σ ΔW) (float32
    masters), so it matches the float32 reference within one bf16 rounding per weight whatever the
    round splitting; adding each round in bf16 loses a large part of the update."""
    rounds = _small_rounds(gen, 10)
    w0 = {base_weight_name(p): (0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16).float()  # the bf16 base
          for p, shape in SHAPES.items()}
    reference = {k: v.clone() for k, v in w0.items()}
    merge_rounds_into(reference, rounds)  # float32 throughout
    ulp = {k: torch.finfo(torch.bfloat16).eps * v.abs() for k, v in reference.items()}  # ≥ one bf16 ulp

    def site(rounds_in_order, masters):
        weights = {k: v.to(torch.bfloat16) for k, v in w0.items()}
        for state in rounds_in_order:
            merge_rounds_into(weights, [state], masters)
        return weights

    model = torch.nn.Module()
    split_10 = site(rounds, float_masters(model))
    split_3 = site([concat_lora(rounds[:4]), concat_lora(rounds[4:7]), concat_lora(rounds[7:])], {})
    exported = {k: v.clone() for k, v in w0.items()}
    merge_lora_into(exported, concat_lora(rounds))  # the exported adapter on the float32 base, then cast
    for k in reference:
        assert bool(((split_10[k].float() - reference[k]).abs() <= ulp[k]).all()), k
        assert bool(((split_10[k].float() - split_3[k].float()).abs() <= ulp[k]).all()), k
        assert bool(((split_10[k].float() - exported[k].to(torch.bfloat16).float()).abs() <= ulp[k]).all()), k
    assert float_masters(model).keys() == reference.keys()
    naive = site(rounds, None)  # each round added in bf16: small updates round away
    update = sum(float((reference[k] - w0[k]).norm()) for k in w0)
    lost = sum(float((naive[k].float() - reference[k]).norm()) for k in w0)
    assert lost > 0.2 * update, (lost, update)


def test_masters_only_for_half_precision(gen):
    """float32/float64 weights merge in their own dtype: no master, no precision lost."""
    state = {k: v * 1e-9 for k, v in make_state(2, gen, {"base_model.model.proj": (4, 4)}).items()}
    weights = {"proj.weight": torch.ones(4, 4, dtype=torch.float64)}
    masters = {}
    merge_lora_into(weights, state, masters=masters)
    assert not masters and torch.equal(weights["proj.weight"], 1 + lora_delta(state)["proj.weight"].double())


def test_bf16_merge_refuses_overflow_without_touching_weights(gen):
    state = make_state(2, gen, {"base_model.model.proj": (4, 4)})
    weights = {"proj.weight": torch.full((4, 4), 3e38).to(torch.bfloat16)}
    masters = {}
    before = weights["proj.weight"].clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora_into(weights, {k: v * 1e20 for k, v in state.items()}, masters=masters)
    assert torch.equal(weights["proj.weight"], before) and not masters


# --- validation --------------------------------------------------------------------------------


def test_prefixes_and_shapes(gen):
    state = make_state(3, gen)
    assert module_prefixes(state) == sorted(SHAPES)
    assert lora_module_shapes(state) == SHAPES
    validate_lora_update(state, rank=3, expected_shapes=SHAPES)


def _corrupt(case: str, state: dict) -> str:
    """Damage `state` in place; return the key the error must name."""
    a, b = P.format(0) + A, P.format(0) + B
    if case == "not a tensor":
        state[a] = state[a].tolist()
    elif case == "integer tensor":
        state[a] = state[a].long()
    elif case == "nan":
        state[b][1, 1] = float("nan")
        return b
    elif case == "inf":
        state[a][0, 0] = float("inf")
    elif case == "A without B":
        del state[b]
    elif case == "B without A":
        del state[a]
        return b
    elif case == "stray key":
        state["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
        return "base_model.model.lm_head.weight"
    elif case == "not 2-D":
        state[a] = state[a][0]
    elif case == "rank mismatch":
        state[a] = state[a][:2]
    return a


@pytest.mark.parametrize(
    "case",
    [
        "not a tensor",
        "integer tensor",
        "nan",
        "inf",
        "A without B",
        "B without A",
        "stray key",
        "not 2-D",
        "rank mismatch",
    ],
)
def test_validate_rejects_malformed_update(gen, case):
    state = make_state(3, gen)
    key = _corrupt(case, state)
    with pytest.raises(InvalidUpdate, match=re.escape(key)):
        validate_lora_update(state)


def test_validate_rejects_empty_update():
    with pytest.raises(InvalidUpdate, match="empty"):
        validate_lora_update({})


def test_validate_checks_rank_and_expected_shapes(gen):
    state = make_state(3, gen)
    a0, b1 = P.format(0) + A, P.format(1) + B
    with pytest.raises(InvalidUpdate, match=re.escape(a0) + ".*expected rank 4, got 3"):
        validate_lora_update(state, rank=4)
    with pytest.raises(InvalidUpdate, match=re.escape(b1) + ".*expected out dim 13, got 12"):
        validate_lora_update(state, expected_shapes={**SHAPES, P.format(1): (13, 40)})
    with pytest.raises(
        InvalidUpdate, match=re.escape(P.format(1) + A) + ".*expected in dim 41, got 40"
    ):
        validate_lora_update(state, expected_shapes={**SHAPES, P.format(1): (12, 41)})
    unknown = {p: s for p, s in SHAPES.items() if p != P.format(2)}
    with pytest.raises(InvalidUpdate, match=re.escape(P.format(2) + A) + ".*unknown module"):
        validate_lora_update(state, expected_shapes=unknown)
