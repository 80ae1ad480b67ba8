"""Rank allocation under a global parameter budget: plain numpy, no ONNX.

Each layer ``l`` with a (k, n) weight can stay dense (``k*n`` parameters, no error) or be factorized
at a rank ``r < k*n/(k+n)`` (``r*(k+n)`` parameters) at a cost ``cost_l(r)``: the expected increase of
the model's output error, e.g. the tail of the layer's whitened spectrum (its calibrated output error
at rank r) times the layer's measured output sensitivity. Choosing one option per layer to minimise
the summed cost within a parameter budget is a multiple-choice knapsack, which :func:`allocate_ranks`
solves by dynamic programming over a discretised budget. No convexity is assumed, so the jump at the
break-even rank (a factorization only pays below it) is handled exactly, which a Lagrangian relaxation
(one price per parameter) does not (docs/benchmarks.md, "Design measurements").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm


def layer_options(k: int, n: int, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's choices: ``(ranks, params, costs)``, rank 0 meaning "stay dense".

    cost : (m + 1,) cost at rank r = 0..m, m = min(k, n) (``cost[m]`` is the dense cost, normally 0).
    Ranks at or above the break-even rank are not offered: they cost parameters and save nothing.
    """
    cost = np.asarray(cost, dtype=np.float64)
    m = min(k, n)
    if cost.shape != (m + 1,):
        raise ValueError(f"cost must have shape ({m + 1},) for a ({k}, {n}) weight, got {cost.shape}")
    ranks = np.arange(1, m + 1)
    useful = ranks * (k + n) < k * n
    ranks = ranks[useful]
    return (np.concatenate([[0], ranks]), np.concatenate([[k * n], ranks * (k + n)]).astype(np.float64),
            np.concatenate([[cost[m]], cost[ranks]]))


def allocate_ranks(shapes: Sequence[tuple[int, int]], costs: Sequence[np.ndarray], budget: float,
                   *, unit_costs: Sequence[float] | None = None, resolution: int = 4096,
                   max_options: int = 512) -> list[int | None]:
    """Ranks minimising the summed cost with at most ``budget`` parameters in these layers — or, with
    ``unit_costs``, at most ``budget`` in another unit where one parameter of layer l costs
    ``unit_costs[l]`` (the rows a layer multiplies per run, for a budget of multiply-adds).

    Dynamic programming over the budget cut into ``resolution`` units (each option's parameters
    rounded *up* to whole units, so the answer always fits), then the budget the rounding left unused
    is spent greedily (:func:`fill`). Exact up to that rounding: at most one unit per layer. Layers
    with more than ``max_options`` useful ranks are offered ranks on an even grid (always including
    the largest useful rank). Cost: O(layers * options * resolution).

    Parameters
    ----------
    shapes : (k, n) of each layer's weight.
    costs : per layer, an array of shape (min(k, n) + 1,): the cost at rank 0..min(k, n).
    budget : parameters (or units of ``unit_costs``) allowed for all these layers together.
    unit_costs : per layer, the budget one of its parameters takes (default 1).

    Returns
    -------
    ranks : per layer, the rank, or None to leave the layer dense. When even the smallest option of
        every layer exceeds the budget, every layer gets its smallest option (rank 1).
    """
    if len(shapes) != len(costs):
        raise ValueError(f"{len(shapes)} shapes but {len(costs)} cost arrays")
    unit_costs = [1.0] * len(shapes) if unit_costs is None else [float(u) for u in unit_costs]
    if len(unit_costs) != len(shapes) or min(unit_costs, default=1.0) <= 0:
        raise ValueError("unit_costs needs one positive value per layer")
    options = []
    for (k, n), c, unit in zip(shapes, costs, unit_costs):
        ranks, params, layer_costs = _thinned(*layer_options(k, n, c), max_options)
        # dense (rank 0, listed first) moves last: options run from most compressed to dense
        order = np.r_[1:len(ranks), 0]
        options.append((ranks[order], params[order] * unit, layer_costs[order]))
    if not options:
        return []
    picks = knapsack([p for _, p, _ in options], [c for _, _, c in options], budget, resolution=resolution)
    return [None if ranks[j] == 0 else int(ranks[j]) for (ranks, _, _), j in zip(options, picks)]


def _thinned(ranks, params, costs, max_options: int):
    """At most ``max_options`` options: dense, and ranks on an even grid ending at the largest."""
    if len(ranks) <= max_options:
        return ranks, params, costs
    keep = np.unique(np.linspace(len(ranks) - 1, 1, max_options - 1).round().astype(int))
    keep = np.concatenate([[0], keep])
    return ranks[keep], params[keep], costs[keep]


# ----------------------------------------------------------------------------------------------------
# Level tables: the general form every allocator below works on. Layer l offers options j = 0..J_l-1
# ordered from most compressed to dense (the last), each with a cost in budget units (parameters,
# bytes, MACs or milliseconds) and an error (predicted or measured). ``picks[l]`` is the option taken.


def rank_levels(k: int, n: int, levels: int = 32) -> np.ndarray:
    """Ranks offered for a (k, n) weight: an even grid of at most ``levels`` ranks below the break-even
    rank ``k*n/(k+n)`` (every multiple of the step), then 0 for "stay dense" as the last option."""
    useful = [r for r in range(1, min(k, n) + 1) if r * (k + n) < k * n]
    if not useful:
        return np.array([0])
    step = max(1, int(np.ceil(len(useful) / levels)))
    grid = list(range(useful[-1], 0, -step))[::-1]
    return np.array([*grid, 0])


def total_cost(costs: Sequence[np.ndarray], picks: Sequence[int]) -> float:
    return float(sum(c[j] for c, j in zip(costs, picks)))


def knapsack(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float, *,
             resolution: int = 4096) -> list[int]:
    """The options minimising the summed error with the summed cost within ``budget``: dynamic
    programming over the budget cut into ``resolution`` units (costs rounded *up*, so the answer
    always fits), then what the rounding left is spent by :func:`fill`. Exact up to that rounding.
    When even the cheapest options exceed the budget, the cheapest are returned."""
    cheapest = [int(np.argmin(c)) for c in costs]
    if not costs or total_cost(costs, cheapest) > budget:
        return cheapest
    unit = budget / resolution
    best = np.zeros(resolution + 1)  # least error of the layers so far within b units
    choice = np.zeros((len(costs), resolution + 1), dtype=np.int32)
    for layer, (cost, error) in enumerate(zip(costs, errors)):
        new = np.full(resolution + 1, np.inf)
        for j, (c, e) in enumerate(zip(cost, error)):
            w = int(np.ceil(c / unit - 1e-9))
            if w > resolution:
                continue
            candidate = best[:resolution + 1 - w] + e
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            choice[layer, w:][better] = j
        best = new
    if not np.isfinite(best[resolution]):  # fits only without the rounding
        return cheapest
    picks, b = [0] * len(costs), resolution
    for layer in range(len(costs) - 1, -1, -1):  # backtrack
        j = int(choice[layer, b])
        picks[layer] = j
        b -= int(np.ceil(costs[layer][j] / unit - 1e-9))
    return fill(costs, errors, picks, budget)


def fill(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], picks: Sequence[int], budget: float) -> list[int]:
    """Spend what ``picks`` leave of the budget: repeatedly move one layer to its next option with the
    best error decrease per unit of cost that still fits."""
    picks = list(picks)
    left = budget - total_cost(costs, picks)
    while True:
        best, best_gain = None, 0.0
        for layer, (cost, error, j) in enumerate(zip(costs, errors, picks)):
            if j + 1 >= len(cost):
                continue
            extra = cost[j + 1] - cost[j]
            gain = error[j] - error[j + 1]
            if extra <= left and gain > 0 and (best is None or gain / max(extra, 1e-300) > best_gain):
                best, best_gain = (layer, extra), gain / max(extra, 1e-300)
        if best is None:
            return picks
        layer, extra = best
        picks[layer] += 1
        left -= extra


def uniform(costs: Sequence[np.ndarray], budget: float) -> list[int]:
    """Every layer keeps the same share ``s`` of its dense cost (its largest option costing at most
    ``s`` times the last), with ``s`` the largest share whose total fits (bisection)."""
    def picks_at(share: float) -> list[int]:
        return [max(0, int(np.searchsorted(c, share * c[-1], side="right")) - 1) for c in costs]

    low, high = 0.0, 1.0
    if total_cost(costs, picks_at(high)) <= budget:
        return picks_at(high)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if total_cost(costs, picks_at(middle)) <= budget else (low, middle)
    return picks_at(low)


def greedy(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float) -> list[int]:
    """AIMET-style: one error threshold ``t`` for all layers, each taking its cheapest option whose
    error is at most ``t``; the smallest threshold whose total fits (bisection over the errors seen),
    then :func:`fill` spends the rest."""
    def picks_at(t: float) -> list[int]:
        out = []
        for cost, error in zip(costs, errors):
            ok = np.flatnonzero(np.asarray(error) <= t)
            out.append(int(ok[np.argmin(np.asarray(cost)[ok])]) if ok.size else len(cost) - 1)
        return out

    thresholds = np.unique(np.concatenate([np.asarray(e, np.float64) for e in errors])) if errors else np.zeros(1)
    low, high = 0, len(thresholds) - 1  # total cost falls as the threshold rises
    if total_cost(costs, picks_at(thresholds[high])) > budget:
        return [int(np.argmin(c)) for c in costs]
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if total_cost(costs, picks_at(thresholds[middle])) <= budget else (middle + 1, high)
    return fill(costs, errors, picks_at(thresholds[low]), budget)


@dataclass
class SearchLog:
    """What an evolutionary search did: generations run, fitness evaluations (each on a subset of the
    calibration batches; ``batch_runs`` counts those), and the best fitness after each generation."""

    generations: int = 0
    evaluations: int = 0
    batch_runs: int = 0
    best: list[float] = field(default_factory=list)
    stopped_early: bool = False


def evolutionary(costs: Sequence[np.ndarray], budget: float,
                 fitness: Callable[[list[tuple[tuple[int, ...], tuple[int, ...]]]], list[float]],
                 start: Sequence[int], n_batches: int, *, generations: int = 30, offspring: int = 8,
                 stages: Sequence[tuple[int, float]] = ((2, 0.25), (1, 1.0)), max_mutations: int = 3,
                 steps: Sequence[int] | None = None, patience: int = 8, seed: int = 0,
                 progress: bool | None = None) -> tuple[list[int], SearchLog]:
    """EvoPress-style search over per-layer options under a budget.

    Each generation makes ``offspring`` distinct children of the current parent by level-switch
    mutations — min(U{1..max_mutations}, U{1..max_mutations}) times: one layer down ``steps[l]``
    options (default 1; on a fine rank grid, a coarser move), another up as many options as the freed
    budget allows — so every child stays within ``budget``. Children
    are then selected in ``stages`` ``(survivors, share of the batches)``: each stage scores the
    remaining candidates on a fresh random subset of that share of the ``n_batches`` calibration
    batches and keeps the best ``survivors``; the parent joins the last stage (elitism), whose subset
    is every batch when its share is 1, so the parent's fitness never gets worse. ``fitness`` takes a
    list of ``(picks, batch_ids)`` and returns the end-to-end divergence of each (lower is better):
    the candidates of one selection stage come in one call, so an executor can score them side by
    side (:mod:`onnxlr.executors`). Stops after
    ``patience`` generations without improvement. Deterministic for a given ``seed``.

    Returns the best picks found and a :class:`SearchLog`.
    """
    search = _Evolution(costs, budget, fitness, n_batches, np.random.default_rng(seed), max_mutations,
                        [1] * len(costs) if steps is None else [max(1, int(s)) for s in steps])
    parent = tuple(int(j) for j in start)
    if total_cost(costs, parent) > budget:
        raise ValueError("the starting point exceeds the budget")
    final_ids = search.subset(stages[-1][1])
    best = search.score(parent, final_ids)
    stale = 0
    # progress=None: a bar on a terminal only, silent in logs and tests
    bar = tqdm(range(generations), desc="evolutionary search", unit="gen", leave=False,
               disable=None if progress is None else not progress)
    for _ in bar:
        children = search.children(parent, offspring)
        if not children:
            break
        winner = search.select(children, parent, stages, final_ids)
        search.log.generations += 1
        fit = search.score(winner, final_ids)
        if fit < best:
            parent, best, stale = winner, fit, 0
        else:
            stale += 1
        search.log.best.append(best)
        bar.set_postfix(fitness=f"{best:.4g}")
        if stale >= patience:
            search.log.stopped_early = True
            break
    return list(parent), search.log


class _Evolution:
    """The state of one :func:`evolutionary` search: scores already known, the random draws, the log."""

    def __init__(self, costs, budget, fitness, n_batches, rng, max_mutations, steps):
        self.costs, self.budget, self.fitness, self.n_batches = costs, budget, fitness, n_batches
        self.rng, self.max_mutations, self.steps = rng, max_mutations, steps
        self.log = SearchLog()
        self.memo: dict[tuple, float] = {}

    def score_all(self, pending: Sequence[tuple[int, ...]], ids: Sequence[int]) -> None:
        todo = [key for key in dict.fromkeys((picks, tuple(ids)) for picks in pending) if key not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.fitness(todo)))
            self.log.evaluations += len(todo)
            self.log.batch_runs += len(ids) * len(todo)

    def score(self, picks: tuple[int, ...], ids: Sequence[int]) -> float:
        self.score_all([picks], ids)
        return self.memo[(picks, tuple(ids))]

    def subset(self, share: float) -> tuple[int, ...]:
        if share >= 1.0:
            return tuple(range(self.n_batches))
        size = max(1, int(round(share * self.n_batches)))
        return tuple(sorted(self.rng.choice(self.n_batches, size=size, replace=False).tolist()))

    def mutate(self, parent: tuple[int, ...]) -> tuple[int, ...]:
        rng, costs, child = self.rng, self.costs, list(parent)
        for _ in range(min(rng.integers(1, self.max_mutations + 1), rng.integers(1, self.max_mutations + 1))):
            down = [l for l, j in enumerate(child) if j > 0]
            up = [l for l, j in enumerate(child) if j + 1 < len(costs[l])]
            if not down or not up:
                break
            i = down[rng.integers(len(down))]
            up = [l for l in up if l != i] or up
            j = up[rng.integers(len(up))]
            child[i] = max(0, child[i] - self.steps[i])
            left = self.budget - total_cost(costs, child)
            while child[j] + 1 < len(costs[j]) and costs[j][child[j] + 1] - costs[j][child[j]] <= left:
                left -= costs[j][child[j] + 1] - costs[j][child[j]]
                child[j] += 1
        return tuple(child)

    def children(self, parent: tuple[int, ...], offspring: int) -> list[tuple[int, ...]]:
        """Up to ``offspring`` distinct children of ``parent``."""
        found: list[tuple[int, ...]] = []
        for _attempt in range(20 * offspring):
            if len(found) == offspring:
                break
            child = self.mutate(parent)
            if child != parent and child not in found:
                found.append(child)
        return found

    def select(self, children, parent, stages, final_ids) -> tuple[int, ...]:
        """The best of ``children`` through the selection ``stages`` (the parent joins the last)."""
        survivors = children
        for number, (keep, share) in enumerate(stages):
            last = number == len(stages) - 1
            ids = final_ids if last else self.subset(share)
            if last:
                survivors = [*survivors, parent]
            self.score_all(survivors, ids)
            survivors = sorted(survivors, key=lambda c: self.score(c, ids))[:keep]
        return survivors[0]


def pareto_front(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the options no other beats, cheapest first: each costs more than the previous one
    and has a smaller error (ties in cost: the smaller error; an option costing more for no less error
    is never worth taking). The knapsack and :func:`fill` then see costs rising, errors falling."""
    costs, errors = np.asarray(costs, np.float64), np.asarray(errors, np.float64)
    order = np.lexsort((errors, costs))
    keep, best = [], np.inf
    for j in order:
        if errors[j] < best:
            keep.append(int(j))
            best = errors[j]
    return np.array(keep, dtype=int)
