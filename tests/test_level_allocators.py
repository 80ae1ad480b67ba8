"""Allocators on level tables (plain numpy): knapsack, uniform, greedy, evolutionary, rank grids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxlr.allocation import evolutionary, fill, greedy, knapsack, rank_levels, total_cost, uniform


def _table(rng, layers=4, options=5):
    """Random increasing costs and decreasing errors, the last option dense (error 0)."""
    costs, errors = [], []
    for _ in range(layers):
        c = np.cumsum(rng.uniform(1, 10, size=options))
        e = np.concatenate([np.sort(rng.exponential(size=options - 1))[::-1] * rng.uniform(0.1, 10), [0.0]])
        costs.append(c)
        errors.append(e)
    return costs, errors


def _upgrade_fits(costs, picks, budget):
    """Whether some layer could take its next option within the budget (the budget is then not 'met
    within one level')."""
    used = total_cost(costs, picks)
    return any(j + 1 < len(c) and used + c[j + 1] - c[j] <= budget for c, j in zip(costs, picks))


def test_rank_levels_stay_below_break_even_and_end_dense():
    ranks = rank_levels(64, 192, levels=8)
    assert ranks[-1] == 0 and len(ranks) <= 9
    assert all(r * (64 + 192) < 64 * 192 for r in ranks[:-1])
    assert ranks[-2] == max(r for r in range(1, 65) if r * 256 < 64 * 192)  # the largest useful rank is offered
    assert rank_levels(2, 2).tolist() == [0]  # nothing saves parameters: dense only
    assert rank_levels(16, 16, levels=1000).tolist() == [*range(1, 8), 0]


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        costs, errors = _table(rng, layers=3, options=4)
        budget = rng.uniform(0.3, 0.9) * sum(c[-1] for c in costs)
        best = min((p for p in itertools.product(range(4), repeat=3) if total_cost(costs, p) <= budget),
                   key=lambda p: total_cost(errors, p), default=None)
        got = knapsack(costs, errors, budget, resolution=20000)
        assert total_cost(costs, got) <= budget
        assert total_cost(errors, got) <= total_cost(errors, best) + 1e-9


@pytest.mark.parametrize("share", [0.3, 0.5, 0.8])
def test_budgets_are_met_within_one_level(share):
    rng = np.random.default_rng(1)
    costs, errors = _table(rng, layers=6, options=8)
    budget = share * sum(c[-1] for c in costs)
    for picks in (knapsack(costs, errors, budget), greedy(costs, errors, budget)):
        assert total_cost(costs, picks) <= budget
        assert not _upgrade_fits(costs, picks, budget)
    picks = uniform(costs, budget)
    assert total_cost(costs, picks) <= budget


def test_uniform_gives_every_layer_the_same_share():
    costs = [np.arange(1, 101, dtype=float) * scale for scale in (1.0, 3.0, 7.0)]
    picks = uniform(costs, 0.5 * sum(c[-1] for c in costs))
    shares = [c[j] / c[-1] for c, j in zip(costs, picks)]
    assert max(shares) - min(shares) <= 0.011  # one level of 100
    assert abs(np.mean(shares) - 0.5) < 0.011


def test_greedy_uses_one_threshold():
    rng = np.random.default_rng(2)
    costs, errors = _table(rng, layers=5, options=10)
    budget = 0.5 * sum(c[-1] for c in costs)
    picks = greedy(costs, errors, budget)
    assert total_cost(costs, picks) <= budget
    # every layer's error is at most the largest error any layer accepted
    worst = max(e[j] for e, j in zip(errors, picks))
    cheaper_ok = [[j for j in range(len(c)) if e[j] <= worst] for c, e in zip(costs, errors)]
    assert all(j >= min(ok) for j, ok in zip(picks, cheaper_ok))


def test_fill_only_moves_up_and_stays_within_budget():
    rng = np.random.default_rng(3)
    costs, errors = _table(rng, layers=4, options=6)
    start = [0, 0, 0, 0]
    budget = total_cost(costs, start) + 15
    picks = fill(costs, errors, start, budget)
    assert all(p >= s for p, s in zip(picks, start))
    assert total_cost(costs, picks) <= budget and not _upgrade_fits(costs, picks, budget)


def _additive_fitness(errors, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    calls = []

    def fitness(picks, ids):
        calls.append((picks, tuple(ids)))
        return total_cost(errors, picks) + noise * rng.standard_normal()

    return fitness, calls


def _batched(fitness):
    """evolutionary scores candidates in lists: one call per selection stage."""
    return lambda jobs: [fitness(picks, ids) for picks, ids in jobs]


def test_evolutionary_stays_in_budget_improves_and_is_deterministic():
    rng = np.random.default_rng(4)
    costs, errors = _table(rng, layers=8, options=12)
    budget = 0.5 * sum(c[-1] for c in costs)
    start = uniform(costs, budget)
    results = []
    for _ in range(2):
        fitness, calls = _additive_fitness(errors)
        picks, log = evolutionary(costs, budget, _batched(fitness), start, n_batches=8, generations=60, seed=7,
                                  progress=False)
        results.append((picks, log.best))
        assert total_cost(costs, picks) <= budget
        assert log.evaluations == len(set(calls)) and log.batch_runs == sum(len(ids) for _, ids in set(calls))
        assert all(a >= b for a, b in zip(log.best, log.best[1:]))  # elitism: never worse
    assert results[0] == results[1]
    assert total_cost(errors, results[0][0]) < total_cost(errors, start)
    # on an additive problem the search gets close to the exact optimum
    optimum = total_cost(errors, knapsack(costs, errors, budget, resolution=20000))
    assert total_cost(errors, results[0][0]) <= optimum + 0.5 * (total_cost(errors, start) - optimum)


def test_evolutionary_selects_on_growing_subsets_and_stops_early():
    costs = [np.array([1.0, 2.0, 3.0])] * 3
    fitness, calls = _additive_fitness([np.zeros(3)] * 3)  # flat: nothing ever improves
    _, log = evolutionary(costs, 6.0, _batched(fitness), [1, 1, 1], n_batches=8, generations=50, patience=3,
                          progress=False)
    assert log.stopped_early and log.generations == 3
    sizes = {len(ids) for _, ids in calls}
    assert sizes == {2, 8}  # a quarter of the batches, then all of them


def test_evolutionary_refuses_a_start_over_budget():
    with pytest.raises(ValueError, match="exceeds the budget"):
        evolutionary([np.array([1.0, 2.0])], 1.5, lambda jobs: [0.0] * len(jobs), [1], n_batches=1)
