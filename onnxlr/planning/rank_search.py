"""One budget, every layer's rank: the search behind ``--target`` and ``--allocator``.

The math lives in :mod:`onnxlr.allocation` (plain numpy on level tables); this module builds the
tables for a model's factorizable MatMul/Gemm layers and runs the allocators on them:

1. **Levels.** Each weight offers an even grid of ranks below its break-even rank, then "dense"
   (:func:`allocation.rank_levels`). A level costs ``r (k + n)`` parameters (``k n`` dense), times a
   per-parameter unit (bytes per value, rows multiplied per run) — or, for a latency budget, the
   milliseconds ONNX Runtime takes for the layer at that rank (``runtimes.latency_table``).
2. **Errors.** *Calibrated*: the tail of the method's spectrum beyond the rank — for ``whitened`` the
   layer's output error on the calibration data, from statistics alone. *End to end*: the divergence of
   the model output when only that layer is truncated, measured on a few calibration batches at a
   sample of its levels and interpolated between them through the calibrated error (errors compound
   through the network; a layer's own output error does not say how much the model output notices).
3. **Allocators.** ``uniform`` (each layer the same share of its cost), ``greedy`` (one threshold on
   the end-to-end curves, AIMET), ``knapsack`` (least summed end-to-end error, dynamic programming),
   ``evolutionary`` (EvoPress: level-switch mutations, multi-stage selection, end-to-end fitness,
   started from the better of uniform and knapsack), ``auto`` (uniform, knapsack on end-to-end errors
   and knapsack on calibrated errors, the one with the smallest end-to-end divergence on the
   calibration data kept). Candidates are scored with :class:`onnxlr.runtimes.swap.SwapRunner`: one
   ORT session whose weights are inputs, so no candidate rebuilds a model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import onnx

from onnxlr import allocation, linalg
from onnxlr.errors import OnnxlrError
from onnxlr.executors import SerialExecutor
from onnxlr.factorization import Decomposer, FitSettings
from onnxlr.graph import import_graph
from onnxlr.matching import find_layers
from onnxlr.planning.options import ALLOCATORS
from onnxlr.runtimes.swap import SwapRunner

# Ranks offered per layer: every rank up to this many (an even grid beyond) when costs are linear in
# the rank; this many when each level must be timed. An evolutionary mutation moves a layer down
# 1/COARSE_LEVELS of its grid.
FINE_LEVELS = 512
COARSE_LEVELS = 32
SENSITIVITY_LEVELS = 5
# Share of the calibration batches the per-layer sensitivities are measured on.
SENSITIVITY_SHARE = 0.25
# Candidate weights kept in memory between evaluations.
MEMO_BYTES = 256 * 2 ** 20
# The search scores candidates on calibration batches of this many samples (fewer, larger runs).
SEARCH_BATCH_SIZE = 32
# The end-to-end divergence each --max-error metric is searched with (onnxlr.compare.DIVERGENCES).
SEARCH_DIVERGENCE = {"cosine": "cosine", "kl": "kl", "top1": "kl"}


@dataclass
class LevelTable:
    """Per searched weight (``keys``, (weight name, transposed)): ranks per level (0 = dense, the
    last), cost per level in budget units, calibrated error per level (squared spectrum tail)."""

    keys: list[tuple[str, bool]]
    shapes: list[tuple[int, int]]
    ranks: list[np.ndarray]
    costs: list[np.ndarray]
    calibrated: list[np.ndarray]
    totals: list[float] = field(default_factory=list)  # the whole squared spectrum (the error at rank 0)
    end_to_end: list[np.ndarray] | None = None
    measured_levels: int = 0  # (layer, level) pairs whose end-to-end divergence was measured

    def ranks_of(self, picks: Sequence[int]) -> dict[tuple[str, bool], int]:
        return {key: int(r[j]) for key, r, j in zip(self.keys, self.ranks, picks)}


def level_costs(layer, ranks: np.ndarray, unit_costs: Mapping[str, float] | None = None,
                cost_of: Callable[[Any, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The cost of ``layer`` at each of ``ranks`` (0 = dense): ``cost_of(layer, ranks)`` when given,
    else its parameters ``r (k + n)`` (``k n`` dense) times ``unit_costs[weight name]`` (default 1)."""
    if cost_of is not None:
        return np.asarray(cost_of(layer, ranks), dtype=np.float64)
    k, n = layer.W.shape
    ranks = np.asarray(ranks)
    return (np.where(ranks > 0, ranks * (k + n), k * n) * (unit_costs or {}).get(layer.weight.name, 1.0)).astype(np.float64)


def level_table(layers, decompositions: Mapping, unit_costs: Mapping[str, float] | None = None, *,
                levels: int | None = None, cost_of: Callable[[Any, np.ndarray], np.ndarray] | None = None) -> LevelTable:
    """The level table of ``layers`` (one entry per weight). ``decompositions``: from
    ``FactorizeMatMul.decompositions``. Costs are parameters times ``unit_costs[weight name]``
    (default 1), or ``cost_of(layer, ranks)`` when given (e.g. measured milliseconds). ``levels``:
    ranks per layer (default FINE_LEVELS, or COARSE_LEVELS with ``cost_of``)."""
    levels = levels or (COARSE_LEVELS if cost_of is not None else FINE_LEVELS)
    table = LevelTable([], [], [], [], [])
    for layer in layers:
        key = (layer.weight.name, layer.transposed)
        if key in table.keys:
            continue
        k, n = layer.W.shape
        ranks = allocation.rank_levels(k, n, levels)
        cost = level_costs(layer, ranks, unit_costs, cost_of)
        s = decompositions[key].svd.spectrum
        tail = np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]])  # tail[r] = sum_{i >= r} s_i^2
        table.keys.append(key)
        table.shapes.append((k, n))
        table.ranks.append(ranks)
        table.costs.append(cost)
        table.calibrated.append(np.where(ranks > 0, tail[np.minimum(ranks, s.size)], 0.0))
        table.totals.append(float(tail[0]))
    return table


@dataclass
class _LayerWeight:
    """A layer as :meth:`Candidates.weight` reads it: its logical (k, n) weight and orientation."""

    W: np.ndarray
    transposed: bool


class Candidates:
    """Dense-equivalent weights of any level of any layer, for :class:`SwapRunner`, computed once each.
    ``decomposer`` (:class:`onnxlr.factorization.Decomposer`) fits them from ``decompositions``."""

    def __init__(self, decomposer: Decomposer, layers, decompositions: Mapping, table: LevelTable,
                 fixed: Mapping[tuple[str, bool], int] | None = None):
        self.decomposer = decomposer
        self.fixed = dict(fixed or {})  # weights outside the search, at the rank the user gave
        self.layer = {}
        for layer in layers:
            self.layer.setdefault((layer.weight.name, layer.transposed), layer)
        self.decompositions = decompositions
        self.table = table
        # Recently used weights, least recently used dropped past MEMO_BYTES (a search visits thousands).
        self._memo: OrderedDict[tuple, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._bytes = 0

    def weight(self, key, rank: int):
        """``(W, bias)`` of layer ``key`` at ``rank`` as stored (``W.T`` for Gemm transB), (None, None)
        for dense."""
        if rank == 0:
            return None, None
        if (key, rank) in self._memo:
            self._memo.move_to_end((key, rank))
            return self._memo[(key, rank)]
        layer = self.layer[key]
        A, B, delta = self.decomposer.factors(layer.W, rank, self.decompositions[key])
        W = (A @ B).astype(layer.W.dtype)
        found = (np.ascontiguousarray(W.T if layer.transposed else W), delta)
        self._memo[(key, rank)] = found
        self._bytes += W.nbytes
        while self._bytes > MEMO_BYTES and len(self._memo) > 1:
            _, (old, _) = self._memo.popitem(last=False)
            self._bytes -= old.nbytes
        return found

    def __getstate__(self):
        # What an executor's worker needs to build weights: the decompositions, each layer's logical
        # weight and orientation, the fit settings; not the graph, the statistics or the memo.
        state = dict(self.__dict__)
        state["layer"] = {key: _LayerWeight(layer.W, layer.transposed) for key, layer in self.layer.items()}
        state["_memo"], state["_bytes"] = OrderedDict(), 0
        return state

    def weights(self, picks: Sequence[int]) -> dict:
        chosen = {key: self.weight(key, rank) for key, rank in self.fixed.items()}
        chosen.update({key: self.weight(key, int(r[j])) for key, r, j in zip(self.table.keys, self.table.ranks, picks)})
        return chosen


def measure_end_to_end(table: LevelTable, candidates: Candidates, runner: SwapRunner, *,
                       samples: int = SENSITIVITY_LEVELS, share: float = SENSITIVITY_SHARE) -> None:
    """Fill ``table.end_to_end``: per layer, the model-output divergence with only that layer truncated,
    measured at ``samples`` evenly spread levels on the first ``share`` of the calibration batches and
    interpolated to every level through the calibrated error (0 error -> 0 divergence)."""
    ids = list(range(max(1, int(np.ceil(share * len(runner.batches))))))
    table.end_to_end = []
    for key, ranks, calibrated in zip(table.keys, table.ranks, table.calibrated):
        compressed = np.flatnonzero(ranks > 0)
        if compressed.size == 0:
            table.end_to_end.append(np.zeros(ranks.size))
            continue
        chosen = np.unique(compressed[np.linspace(0, compressed.size - 1, min(samples, compressed.size)).round().astype(int)])
        measured = np.array([runner.divergence({key: candidates.weight(key, int(ranks[j]))}, ids) for j in chosen])
        table.measured_levels += chosen.size
        x = np.concatenate([[0.0], calibrated[chosen]])
        y = np.concatenate([[0.0], np.maximum(measured, 0.0)])
        order = np.argsort(x)
        # Beyond the largest measured error, extrapolate proportionally (np.interp would clamp).
        curve = np.interp(calibrated, x[order], y[order])
        beyond = calibrated > x.max()
        if beyond.any() and x.max() > 0:
            curve[beyond] = y[order][-1] * calibrated[beyond] / x.max()
        table.end_to_end.append(curve)


@dataclass
class CandidateScorer:
    """What scores candidates end to end: the runner and the candidates' weights (an executor sends
    it to each worker once)."""

    runner: SwapRunner
    candidates: Candidates


def _score(scorer: CandidateScorer, job: tuple) -> float:
    """An executor job: the end-to-end divergence of ``job = (picks, batch ids)``."""
    picks, ids = job
    return scorer.runner.divergence(scorer.candidates.weights(picks), ids)


@dataclass
class SearchResult:
    """The allocation kept and how it was found (the report's ``allocation`` record)."""

    ranks: dict[tuple[str, bool], int]
    allocator: str
    divergence: dict[str, float] = field(default_factory=dict)  # end-to-end, on the calibration data
    seconds: float = 0.0
    batch_runs: int = 0  # model runs over one calibration batch, sensitivities included
    evaluations: int = 0  # candidate allocations scored end to end
    layers: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)

    def ranks_by_name(self) -> dict[str, int]:
        """Weight name -> rank (0: dense), as per-layer ranks of the factorization pass."""
        return {key[0]: rank for key, rank in self.ranks.items()}

    def record(self) -> dict[str, Any]:
        return {"allocator": self.allocator, "calib_divergence": self.divergence,
                "search_seconds": round(self.seconds, 2), "batch_runs": self.batch_runs,
                "evaluations": self.evaluations, "layers": self.layers, **self.search}


@dataclass
class SearchSpace:
    """A model's level table, candidate weights and end-to-end scorer (``runner``, None without
    calibration data); ``spent``: the budget the layers outside the search (user-given ranks) take."""

    table: LevelTable
    candidates: Candidates
    runner: SwapRunner | None
    spent: float = 0.0

    def search(self, budget: float, allocator: str, **options) -> SearchResult:
        """:func:`search` within ``budget`` for the whole of the factorizable layers."""
        return search(self.table, budget - self.spent, allocator, self.candidates, self.runner, **options)


def search(table: LevelTable, budget: float, allocator: str, candidates: Candidates, runner: SwapRunner | None, *,
           seed: int = 0, generations: int = 30, progress: bool | None = None, executor=None) -> SearchResult:
    """Run ``allocator`` on ``table`` within ``budget`` (see the module docstring). ``executor``
    (:mod:`onnxlr.executors`, default this process) scores the evolutionary search's candidates: each
    worker receives a copy of ``runner`` and of ``candidates`` once (:class:`CandidateScorer`), then
    each candidate's picks, and builds its weights itself. For a given ``seed`` the result does not
    depend on the executor."""
    if allocator not in ALLOCATORS:
        raise OnnxlrError(f"unknown allocator {allocator!r} (choose from {', '.join(ALLOCATORS)})")
    started = time.perf_counter()
    runs_before = runner.evaluations if runner is not None else 0
    cheapest = allocation.total_cost(table.costs, [int(np.argmin(c)) for c in table.costs])
    if cheapest > budget:
        raise OnnxlrError(f"the budget is out of reach: even the smallest rank of every layer costs "
                          f"{cheapest:,.4g} against {budget:,.4g} left to the factorizable layers")
    if allocator != "uniform" and runner is not None and table.end_to_end is None:
        measure_end_to_end(table, candidates, runner)
    # Without calibration data there is nothing end to end to judge by: the calibrated (here: weight)
    # errors drive the knapsack and greedy, and auto means the knapsack.
    errors = table.end_to_end if table.end_to_end is not None else table.calibrated
    options: dict[str, list[int]] = {}
    if allocator in ("uniform", "evolutionary") or (allocator == "auto" and runner is not None):
        options["uniform"] = allocation.uniform(table.costs, budget)
    if allocator in ("knapsack", "evolutionary", "auto"):
        options["knapsack"] = allocation.knapsack(table.costs, errors, budget)
    if allocator == "auto" and runner is not None:
        options["knapsack (calibrated errors)"] = allocation.knapsack(table.costs, table.calibrated, budget)
    if allocator == "greedy":
        options["greedy"] = allocation.greedy(table.costs, errors, budget)
    divergence: dict[str, float] = {}
    if runner is not None:
        divergence = {name: runner.divergence(candidates.weights(p)) for name, p in options.items()}
    evaluations = len(divergence)
    extra: dict[str, Any] = {}
    remote_runs = 0
    if allocator == "evolutionary":
        picks, kept, extra, runs = _evolve(table, budget, errors, candidates, runner, options, divergence,
                                           seed=seed, generations=generations, progress=progress, executor=executor)
        evaluations += extra.pop("evaluations")
        remote_runs = runs
    else:
        kept = min(divergence, key=divergence.get) if divergence else next(iter(options))
        picks = options[kept]
    result = SearchResult(table.ranks_of(picks), kept, {k: round(v, 6) for k, v in divergence.items()},
                          seconds=time.perf_counter() - started,
                          batch_runs=(runner.evaluations - runs_before + remote_runs) if runner is not None else 0,
                          evaluations=evaluations, search=extra)
    result.search["budget"] = float(budget)
    result.search["cost"] = allocation.total_cost(table.costs, picks)
    result.search["measured_levels"] = table.measured_levels
    for l, (key, ranks, costs, j) in enumerate(zip(table.keys, table.ranks, table.costs, picks)):
        # the relative error of the method's objective (for whitened: of the layer output on calib data)
        relative = np.sqrt(table.calibrated[l][j] / table.totals[l]) if table.totals[l] > 0 else 0.0
        row = {"weight": key[0], "rank": int(ranks[j]), "level": int(j), "levels": int(len(ranks)),
               "cost": float(costs[j]), "calib_error": float(relative)}
        if j + 1 < len(ranks):
            row["next_cost"] = float(costs[j + 1])  # what one level more would cost
        if table.end_to_end is not None:
            row["predicted_divergence"] = float(table.end_to_end[l][j])
        result.layers.append(row)
    return result


def _evolve(table: LevelTable, budget: float, errors, candidates: Candidates, runner: SwapRunner, options: dict,
            divergence: dict, *, seed: int, generations: int, progress, executor):
    """The evolutionary search from the best of ``options``: ``(picks, allocator kept, record, batch runs
    its workers made)``; ``divergence`` gains the kept allocation's."""
    start_name = min(divergence, key=divergence.get)
    # Hundreds of candidates selected on the same few calibration samples overfit them: the search
    # scores on all batches but the last quarter, which then judges the result against its start.
    n = len(runner.batches)
    search_ids = list(range(n - n // 4)) if n >= 4 else list(range(n))
    check_ids = list(range(n - n // 4, n)) if n >= 4 else list(range(n))
    executor = executor or SerialExecutor()
    # Workers get the runner and the decompositions once, then only each candidate's picks; they
    # share the cores: each runner copy gets the executor's threads per worker.
    scorer = CandidateScorer(runner.with_threads(executor.blas_threads) if executor.workers > 1 else runner,
                             candidates)

    def fitness(jobs):
        return executor.map(_score, [(p, [search_ids[i] for i in ids]) for p, ids in jobs], shared=scorer)

    local_before = runner.evaluations
    picks, log = allocation.evolutionary(
        table.costs, budget, fitness, options[start_name], len(search_ids), generations=generations, seed=seed,
        progress=progress, steps=[max(1, round(len(c) / COARSE_LEVELS)) for c in table.costs])
    remote_runs = log.batch_runs - (runner.evaluations - local_before)  # what workers' copies ran
    # Spend what the last mutations left of the budget (each move only raises a rank): the budget
    # is met within one level, as by the other allocators.
    picks = allocation.fill(table.costs, errors, picks, budget)
    checked = {name: runner.divergence(candidates.weights(p), check_ids)
               for name, p in ((start_name, options[start_name]), ("evolutionary", picks))}
    kept = "evolutionary" if checked["evolutionary"] <= checked[start_name] else start_name
    picks = picks if kept == "evolutionary" else options[start_name]
    divergence["evolutionary"] = runner.divergence(candidates.weights(picks))
    record = {"started_from": start_name, "generations": log.generations, "stopped_early": log.stopped_early,
              "seed": seed, "fitness_by_generation": [round(b, 6) for b in log.best],
              "check_divergence": {k: round(v, 6) for k, v in checked.items()}, "check_batches": len(check_ids),
              "evolved_kept": kept == "evolutionary", "evaluations": log.evaluations + 2}
    return picks, kept, record, remote_runs


def search_space(model: onnx.ModelProto, settings: FitSettings, stats, sensitivity, batches, *,
                 ranks: Mapping[str, int] | None = None, unit_costs: Mapping[str, float] | None = None,
                 cost_of=None, divergence: str = "rel_l2", threads: int = 1, cache: dict | None = None) -> SearchSpace:
    """What every allocator searches over for ``model``'s factorizable layers: their level table (costs
    in the units of ``unit_costs``, or of ``cost_of``: ``(layer, ranks) -> cost per rank``, 0 = dense),
    their candidate weights fitted under ``settings`` (:class:`onnxlr.factorization.Decomposer`, with a
    shared ``cache``), and — with calibration ``batches`` — one ORT session scoring candidates end to
    end with ``divergence``. Layers with a rank in ``ranks`` (by node or weight name) keep it; their
    cost is ``space.spent``. Budget-independent: one space serves many budgets."""
    layers, _ = find_layers(import_graph(model))
    decomposer = Decomposer(settings, cache)
    decompositions = decomposer.decompositions(layers, stats, sensitivity)
    given = {}  # weight key -> (layer, the user's rank; 0 where it would not save parameters: dense)
    for layer in layers:
        rank = next((int(ranks[k]) for k in (layer.node.name, layer.weight.name) if k in (ranks or {})), None)
        if rank is not None:
            given[layer.key] = (layer, rank if linalg.saves_parameters(*layer.W.shape, rank) else 0)
    searched = [layer for layer in layers if layer.key not in given]
    table = level_table(searched, decompositions, unit_costs, cost_of=cost_of)
    spent = sum(float(level_costs(layer, np.array([rank]), unit_costs, cost_of)[0]) for layer, rank in given.values())
    candidates = Candidates(decomposer, layers, decompositions, table, fixed={k: r for k, (_, r) in given.items()})
    runner = SwapRunner(model, layers, batches, divergence=divergence, threads=threads) if batches else None
    return SearchSpace(table, candidates, runner, spent)
