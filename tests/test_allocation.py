"""Rank allocation under a parameter budget (plain numpy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxlr.allocation import allocate_ranks, layer_options


def _tail_costs(rng, k, n, scale=1.0):
    """Cost at rank 0..m: the tail of a random decaying squared spectrum."""
    m = min(k, n)
    e = np.sort(rng.exponential(size=m))[::-1] * scale
    return np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])


def _params(shapes, ranks, units=None):
    units = units or [1.0] * len(shapes)
    return sum((k * n if r is None else r * (k + n)) * u for (k, n), r, u in zip(shapes, ranks, units))


def _cost(costs, ranks, shapes):
    return sum(c[min(k, n)] if r is None else c[r] for c, r, (k, n) in zip(costs, ranks, shapes))


def test_options_stop_below_break_even_and_include_dense():
    ranks, params, costs = layer_options(4, 12, np.arange(5, dtype=float)[::-1])
    # break-even 4*12/16 = 3: ranks 1 and 2 save parameters, 3 and 4 do not
    assert ranks.tolist() == [0, 1, 2]
    assert params.tolist() == [48, 16, 32]
    assert costs.tolist() == [0.0, 3.0, 2.0]


def test_budget_is_respected_and_no_single_upgrade_would_fit():
    rng = np.random.default_rng(0)
    shapes = [(16, 16), (16, 64), (64, 16), (32, 32), (8, 40)]
    costs = [_tail_costs(rng, k, n, scale=rng.uniform(0.1, 10)) for k, n in shapes]
    total = sum(k * n for k, n in shapes)
    for share in (0.3, 0.5, 0.8, 0.95):
        budget = share * total
        ranks = allocate_ranks(shapes, costs, budget)
        used = _params(shapes, ranks)
        assert used <= budget
        # the fill step leaves no layer that could take one more rank (or go dense) within the budget
        for (k, n), r in zip(shapes, ranks):
            if r is None:
                continue
            options, params, _ = layer_options(k, n, np.zeros(min(k, n) + 1))
            i = options.tolist().index(r)
            nxt = params[i + 1] if i + 1 < len(options) else params[0]
            assert used + (nxt - params[i]) > budget


def test_a_budget_covering_everything_keeps_every_layer_dense():
    rng = np.random.default_rng(1)
    shapes = [(8, 8), (8, 24)]
    costs = [_tail_costs(rng, k, n) for k, n in shapes]
    assert allocate_ranks(shapes, costs, sum(k * n for k, n in shapes)) == [None, None]


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    shapes = [(6, 10), (8, 8), (5, 12)]
    costs = [_tail_costs(rng, k, n, scale=rng.uniform(0.2, 5)) for k, n in shapes]
    total = sum(k * n for k, n in shapes)
    budget = rng.uniform(0.35, 0.9) * total
    choices = [[None] + layer_options(k, n, c)[0][1:].tolist() for (k, n), c in zip(shapes, costs)]
    best = min(_cost(costs, combo, shapes) for combo in itertools.product(*choices)
               if _params(shapes, combo) <= budget)
    got = allocate_ranks(shapes, costs, budget)
    assert _params(shapes, got) <= budget
    assert _cost(costs, got, shapes) <= best * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_weighted_budgets_match_the_brute_force_optimum(seed):
    """A budget of multiply-adds: a parameter of layer l costs the rows it multiplies per run."""
    rng = np.random.default_rng(100 + seed)
    shapes = [(6, 10), (8, 8), (5, 12)]
    units = rng.choice([1.0, 4.0, 16.0], size=3).tolist()
    costs = [_tail_costs(rng, k, n, scale=rng.uniform(0.2, 5)) for k, n in shapes]
    budget = rng.uniform(0.35, 0.9) * _params(shapes, [None] * 3, units)
    choices = [[None] + layer_options(k, n, c)[0][1:].tolist() for (k, n), c in zip(shapes, costs)]
    best = min(_cost(costs, combo, shapes) for combo in itertools.product(*choices)
               if _params(shapes, combo, units) <= budget)
    got = allocate_ranks(shapes, costs, budget, unit_costs=units)
    assert _params(shapes, got, units) <= budget
    assert _cost(costs, got, shapes) <= best * (1 + 1e-12)


def test_cheap_layers_give_up_rank_first():
    # Two identical shapes; the first layer's truncation costs 100x more: it keeps more rank.
    rng = np.random.default_rng(3)
    base = _tail_costs(rng, 32, 32)
    ranks = allocate_ranks([(32, 32), (32, 32)], [100 * base, base], 0.5 * 2 * 32 * 32)
    assert ranks[0] is None or (ranks[1] is not None and ranks[0] > ranks[1])


def test_many_options_are_thinned_to_a_grid_and_still_fit():
    rng = np.random.default_rng(4)
    shapes = [(300, 500), (500, 300)]
    costs = [_tail_costs(rng, k, n) for k, n in shapes]
    budget = 0.6 * sum(k * n for k, n in shapes)
    ranks = allocate_ranks(shapes, costs, budget, max_options=16)
    assert _params(shapes, ranks) <= budget
    assert all(r is None or 1 <= r < 300 * 500 / 800 for r in ranks)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError):
        allocate_ranks([(4, 4)], [], 10)
    with pytest.raises(ValueError):
        allocate_ranks([(4, 4)], [np.zeros(3)], 10)
