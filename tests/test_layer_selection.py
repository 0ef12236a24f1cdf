"""Layer selection (solver, baselines, bad input) and per-layer aggregation: pure torch/numpy, fast."""

import itertools
import time

import numpy as np
import pytest
import torch

from flare_lora.components.algorithms.layer_average import (
    average_layers,
    layer_of,
    relative_key,
    split_by_layer,
    validate_layer_update,
)
from flare_lora.components.algorithms.layer_selection import (
    SelectionError,
    check_problem,
    choose_layers,
    normalize_scores,
    select_layers,
    upper_bound,
)
from flare_lora.components.algorithms.layer_solver import inconsistency, objective
from flare_lora.components.algorithms.lora_state import InvalidUpdate


def scores(n, k, seed, shape=0.5):
    rng = np.random.default_rng(seed)
    return rng.gamma(shape, size=(n, k)) * np.linspace(1.0, rng.uniform(0.3, 3.0), k)


def brute_force(scores, budgets, lam: float, costs=None, *, normalize: bool = True) -> tuple[np.ndarray, float]:
    """Exhaustive search over every site's feasible sets: the optimum the solvers must reach (tiny problems)."""
    g, b, lam, cost = check_problem(scores, budgets, lam, costs, normalize=normalize)
    n, k = g.shape
    rows = [np.array(bits, dtype=bool) for bits in itertools.product((0, 1), repeat=k)]
    feasible = [np.stack([r for r in rows if int(cost[r].sum()) <= b[i]]) for i in range(n)]
    # broadcast over the product of the sites' options: [S_0, ..., S_{N-1}, K] counts
    counts = np.zeros([len(f) for f in feasible] + [k])
    gains = np.zeros([len(f) for f in feasible])
    for i, f in enumerate(feasible):
        shape = [1] * n + [k]
        shape[i] = len(f)
        counts = counts + f.reshape(shape)
        gshape = [1] * n
        gshape[i] = len(f)
        gains = gains + (f.astype(np.float64) @ g[i]).reshape(gshape)
    values = gains - lam * (counts * (n - counts)).sum(axis=-1)
    flat = int(np.argmax(values))
    index = np.unravel_index(flat, values.shape)
    mask = np.stack([feasible[i][index[i]] for i in range(n)])
    return mask, float(values[index])


def _grid():
    """(n, k, budgets) covering 1-4 sites x 3-6 layers, equal and unequal budgets."""
    cases = []
    for n, k in [(1, 4), (2, 3), (2, 5), (3, 4), (3, 6), (4, 5), (4, 6)]:
        top = 2 if (n, k) == (4, 6) else (3 if n == 4 else k)
        patterns = {tuple([1] * n), tuple([min(2, top)] * n), tuple((i % top) + 1 for i in range(n)),
                    tuple(top - (i % top) for i in range(n))}
        cases += [(n, k, list(b)) for b in sorted(patterns)]
    return cases


LAMS = [0.0, 0.02, 0.1, 0.3, 1.0, 5.0]


@pytest.mark.parametrize("n,k,budgets", _grid())
def test_solver_equals_brute_force_on_every_grid_instance(n, k, budgets):
    for seed, lam in itertools.product(range(2), LAMS):
        g = scores(n, k, seed=100 * n + 10 * k + seed)
        best_mask, best = brute_force(g, budgets, lam)
        norm = normalize_scores(g)
        for method in ("auto", "exact", "heuristic"):
            mask = select_layers(g, budgets, lam, method=method)
            assert mask.dtype == torch.bool and mask.shape == (n, k)
            assert (mask.sum(dim=1).numpy() <= np.array(budgets)).all()
            assert objective(mask, norm, lam) == pytest.approx(best, abs=1e-9), (method, lam, budgets)


def test_solver_with_layer_costs_equals_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(12):
        costs = [int(c) for c in rng.integers(1, 4, size=5)]
        budgets = [int(b) for b in rng.integers(max(costs) - 1, sum(costs) + 1, size=3)]
        budgets = [max(b, min(costs)) for b in budgets]
        g = scores(3, 5, seed=trial)
        for lam in (0.0, 0.1, 1.0):
            _, best = brute_force(g, budgets, lam, costs)
            for method in ("exact", "heuristic"):
                mask = select_layers(g, budgets, lam, costs, method=method).numpy()
                assert (mask.astype(int) @ np.array(costs) <= np.array(budgets)).all()
                assert objective(mask, normalize_scores(g), lam) == pytest.approx(best, abs=1e-9)


def test_knapsack_best_responses_are_exact_and_bounded_in_memory(monkeypatch):
    """The vectorised knapsack equals brute force per site, also when large budgets make it split
    the sites into chunks (a site reporting budget Σcost cannot make it allocate without bound)."""
    from flare_lora.components.algorithms import layer_solver

    rng = np.random.default_rng(5)
    w = rng.normal(size=(7, 6))
    cost = np.array([100, 200, 300, 100, 250, 150])
    b = np.array([100, 300, 450, 1100, 620, 99 + 1, 480])
    want = []
    for i in range(7):
        best = max((subset for r in range(7) for subset in itertools.combinations(range(6), r)
                    if cost[list(subset)].sum() <= b[i]), key=lambda sub: (w[i, list(sub)].sum(), -len(sub)))
        want.append(w[i, list(best)].sum())
    for cells in (10**9, 5000):  # one DP call, then chunks of a few sites
        monkeypatch.setattr(layer_solver, "KNAPSACK_CELLS", cells)
        rows = layer_solver._best_rows(w, cost, b)
        assert ((rows * cost).sum(axis=1) <= b).all()
        np.testing.assert_allclose((rows * w).sum(axis=1), want, atol=1e-12)


@pytest.mark.parametrize("n,k", [(3, 6), (20, 12), (100, 32)])
def test_budgets_never_exceeded(n, k):
    rng = np.random.default_rng(n)
    for lam in (0.0, 0.01, 0.1, 2.0):
        budgets = [int(b) for b in rng.integers(1, k + 1, size=n)]
        mask = select_layers(scores(n, k, seed=n), budgets, lam)
        assert (mask.sum(dim=1).numpy() <= np.array(budgets)).all()


@pytest.mark.parametrize("n,k", [(3, 6), (100, 32)])
def test_lambda_zero_gives_each_site_its_top_budget(n, k):
    g = scores(n, k, seed=7)
    budgets = [(i % k) + 1 for i in range(n)]
    mask = select_layers(g, budgets, 0.0).numpy()
    for i in range(n):
        top = set(np.argsort(-g[i], kind="stable")[: budgets[i]].tolist())
        assert set(np.nonzero(mask[i])[0].tolist()) == top


def test_large_lambda_makes_selections_consistent_where_budgets_allow():
    # equal budgets: every site trains the same layers, as many as the budget
    for n, k in [(4, 6), (100, 32)]:
        mask = select_layers(scores(n, k, seed=1), [3] * n, lam=10.0)
        assert inconsistency(mask) == 0
        assert (mask.sum(dim=1) == 3).all()
    # unequal budgets: the shared part is consistent; a layer one site alone could add is dropped
    mask = select_layers(scores(3, 6, seed=2), [2, 2, 3], lam=10.0)
    assert inconsistency(mask) == 0 and (mask.sum(dim=1) == 2).all()
    # and the sites agree on the layers with the most total (normalised) score
    g = normalize_scores(scores(3, 6, seed=2))
    assert set(np.nonzero(mask[0].numpy())[0]) == set(np.argsort(-g.sum(axis=0))[:2])
    # λ trades mass for consistency monotonically on this instance
    values = [inconsistency(select_layers(scores(5, 8, seed=4), [1, 2, 3, 4, 5], lam)) for lam in (0, 0.05, 0.2, 1)]
    assert values == sorted(values, reverse=True) and values[-1] < values[0]


def test_scores_are_normalised_per_site():
    g = scores(3, 6, seed=5)
    scaled = g * np.array([[1e-6], [1.0], [1e4]])  # different loss scales per site / model
    for lam in (0.0, 0.2):
        assert torch.equal(select_layers(g, [2, 3, 1], lam), select_layers(scaled, [2, 3, 1], lam))
    assert normalize_scores(g).sum(axis=1) == pytest.approx([6.0, 6.0, 6.0])
    assert (normalize_scores(np.zeros((1, 4))) == 1).all()


def test_hundred_sites_by_32_layers_returns():
    g = scores(100, 32, seed=11)
    budgets = [int(b) for b in np.random.default_rng(0).integers(1, 9, size=100)]
    for lam in (0.005, 0.05):
        start = time.perf_counter()
        mask = select_layers(g, budgets, lam)
        seconds = time.perf_counter() - start
        print(f"100 x 32, lam={lam}: {seconds * 1e3:.0f} ms")  # timing is a benchmark, not an assert
        assert mask.shape == (100, 32)
        assert (mask.sum(dim=1).numpy() <= np.array(budgets)).all()
        value = objective(mask, normalize_scores(g), lam)
        assert value <= upper_bound(g, budgets, lam) + 1e-9
        assert value >= objective(select_layers(g, budgets, 0.0), normalize_scores(g), lam) - 1e-9


def test_upper_bound_is_an_upper_bound():
    for seed in range(5):
        g = scores(3, 5, seed)
        for lam in (0.0, 0.1, 1.0):
            _, best = brute_force(g, [1, 2, 3], lam)
            assert upper_bound(g, [1, 2, 3], lam) >= best - 1e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budgets=[2, 0, 2]), r"site 'b': budget: expected an integer in \[1, 4"),
        (dict(budgets=[2, 5, 2]), r"site 'b': budget: .* got 5"),
        (dict(budgets=[2, 2.5, 2]), r"site 'b': budget"),
        (dict(scores=[[1, 2, 3, 4], [1, float("nan"), 3, 4], [1, 1, 1, 1]]), r"site 'b': scores: layer 1 is nan"),
        (dict(scores=[[1, 2, 3, 4], [1, 2, 3, 4], [1, float("inf"), 1, 1]]), r"site 'c': scores: layer 1 is inf"),
        (dict(scores=[[1, 2, 3, 4], [1, 2, 3], [1, 1, 1, 1]]), r"site 'b': scores: expected 4 numbers .* got 3"),
        (dict(scores=[[1, 2, 3, 4], [1, 2, 3, 4], [1, -1, 1, 1]]), r"site 'c': scores: layer 1 is -1"),
        (dict(lam=-0.1), r"lam: expected a finite number >= 0"),
        (dict(lam=float("nan")), r"lam: expected a finite number >= 0"),
        (dict(costs=[1, 0, 1, 1]), r"costs: layer 1"),
    ],
)
def test_bad_input_raises_naming_the_site(kwargs, match):
    args = dict(scores=[[1, 2, 3, 4], [4, 3, 2, 1], [1, 1, 1, 1]], budgets=[2, 2, 2], lam=0.1)
    args.update(kwargs)
    with pytest.raises(SelectionError, match=match):
        select_layers(args["scores"], args["budgets"], args["lam"], args.get("costs"), sites=["a", "b", "c"])


def test_baselines_fill_the_same_budgets():
    budgets = [1, 2, 3]
    top = choose_layers("top", budgets, 5).numpy()
    bottom = choose_layers("bottom", budgets, 5).numpy()
    assert [list(np.nonzero(r)[0]) for r in top] == [[4], [3, 4], [2, 3, 4]]
    assert [list(np.nonzero(r)[0]) for r in bottom] == [[0], [0, 1], [0, 1, 2]]
    rand = choose_layers("random", budgets, 5, seed=3)
    assert rand.sum(dim=1).tolist() == budgets
    assert torch.equal(rand, choose_layers("random", budgets, 5, seed=3))
    assert choose_layers("full", budgets, 5).all()
    g = scores(3, 5, seed=0)
    # rgn / snr: each site's own top-b (λ = 0) on the criterion the sites report
    assert torch.equal(choose_layers("rgn", budgets, 5, scores=g, lam=9.0), select_layers(g, budgets, 0.0))
    assert not torch.equal(choose_layers("selective", budgets, 5, scores=g, lam=9.0), select_layers(g, budgets, 0.0))
    with pytest.raises(SelectionError, match="needs the sites' scores"):
        choose_layers("selective", budgets, 5)
    with pytest.raises(SelectionError, match="selection: expected one of"):
        choose_layers("best", budgets, 5)


# --- per-layer aggregation ------------------------------------------------------------------


def layer_tensors(layers, value, lora=False):
    out = {}
    for l in layers:
        if lora:
            base = f"base_model.model.model.layers.{l}.self_attn.q_proj"
            out[f"{base}.lora_A.weight"] = torch.full((2, 4), float(value))
            out[f"{base}.lora_B.weight"] = torch.full((4, 2), float(-value))
        else:
            out[f"model.layers.{l}.mlp.up_proj.weight"] = torch.full((3, 2), float(value))
            out[f"model.layers.{l}.input_layernorm.weight"] = torch.full((2,), float(value))
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_each_layer_is_averaged_over_the_sites_that_trained_it(lora):
    states = [layer_tensors([0, 1], 1.0, lora), layer_tensors([1, 2], 4.0, lora), layer_tensors([1], 10.0, lora)]
    weights = [10, 30, 60]
    global_state = layer_tensors([0, 1, 2, 3], 0.0, lora)
    new = average_layers(states, weights)
    assert sorted({layer_of(k) for k in new}) == [0, 1, 2]  # layer 3: nobody trained it
    sign = {True: lambda k: -1.0 if "lora_B" in k else 1.0, False: lambda k: 1.0}[lora]
    for key, value in new.items():
        expected = {0: 1.0, 1: (10 * 1 + 30 * 4 + 60 * 10) / 100, 2: 4.0}[layer_of(key)] * sign(key)
        torch.testing.assert_close(value, torch.full_like(value, expected))
    global_state.update(new)
    for key in layer_tensors([3], 0.0, lora):
        assert (global_state[key] == 0).all()


def test_validate_rejects_unassigned_missing_nan_and_shape_changes():
    good = layer_tensors([1, 3], 1.0)
    validate_layer_update(good, [1, 3])
    with pytest.raises(InvalidUpdate, match=r"returned layer\(s\) \[2\] it was not assigned \(assigned \[1, 3\]\)"):
        validate_layer_update({**good, **layer_tensors([2], 1.0)}, [1, 3])
    with pytest.raises(InvalidUpdate, match=r"missing assigned layer\(s\) \[3\]"):
        validate_layer_update(layer_tensors([1], 1.0), [1, 3])
    bad = layer_tensors([1, 3], 1.0)
    bad["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        validate_layer_update(bad, [1, 3])
    known = {"model.layers.1.mlp.up_proj.weight": (9, 9)}
    with pytest.raises(InvalidUpdate, match=r"expected shape \(9, 9\)"):
        validate_layer_update(good, [1, 3], known_shapes=known)
    partial = layer_tensors([1, 3], 1.0)
    del partial["model.layers.3.input_layernorm.weight"]
    with pytest.raises(InvalidUpdate, match="layer 3: tensors differ"):
        validate_layer_update(partial, [1, 3])
    with pytest.raises(InvalidUpdate, match="no layer index"):
        validate_layer_update({"lm_head.weight": torch.ones(2, 2)}, [])


def test_layer_keys():
    assert layer_of("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("model.embed_tokens.weight") is None
    assert relative_key("model.layers.12.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
    assert list(split_by_layer(layer_tensors([2, 0], 1.0))) == [0, 2]
