"""Choosing every layer's rank under one global parameter budget (plain numpy, no ONNX).

Each layer ``i`` has a weight of shape ``(k_i, n_i)`` and a spectrum ``s_i`` whose tail gives the error
of keeping rank r: ``err_i(r) = sum(s_i[r:]**2) / energy_i`` — for the calibrated (whitened) spectrum
this is exactly the layer's relative squared output error on calibration data (SVD-LLM, Thm 3.2).
A layer costs ``r*(k+n)`` parameters when factorized, ``k*n`` when left dense (the rank at which the
factorization stops paying).

``greedy_ranks`` removes parameters where they cost the least error: starting from every layer
dense, it repeatedly takes the step (rank reduction by ``step``, or the jump from dense to the largest
rank that saves parameters) with the smallest error increase per parameter saved, until the total
fits the budget. This is the marginal-cost greedy for a separable, roughly convex objective
(AIMET's per-layer curves with a global threshold, ASVD's sensitivity-sorted cut); the summed
relative errors are a proxy for the end-to-end change, which issue #6's allocators refine.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class LayerCurve:
    """One layer's shape and spectrum. ``energy`` normalises its error (default: the whole spectrum)."""

    k: int
    n: int
    spectrum: np.ndarray
    energy: float | None = None

    def cost(self, rank: int) -> int:
        """Parameters at ``rank``; a rank that would not save parameters means the dense layer."""
        return min(rank * (self.k + self.n), self.k * self.n)

    def error(self, rank: int) -> float:
        s = np.asarray(self.spectrum, dtype=np.float64)
        total = self.energy if self.energy is not None else float(np.sum(s**2))
        return float(np.sum(s[rank:] ** 2) / total) if total > 0 else 0.0

    @property
    def dense_rank(self) -> int:
        return min(self.k, self.n)

    @property
    def largest_saving_rank(self) -> int:
        """The largest rank whose factorization has fewer parameters than the dense layer."""
        return max(0, math.ceil(self.k * self.n / (self.k + self.n)) - 1)


def greedy_ranks(layers: list[LayerCurve], budget: float, *, step: int = 8) -> list[int]:
    """Ranks for ``layers`` whose total parameters are at most ``budget``.

    Parameters
    ----------
    layers : per-layer curves.
    budget : total parameters allowed for these layers (e.g. 0.9 * their dense total).
    step : rank granularity of each move (ranks stay multiples-friendly and the search fast).

    Returns
    -------
    list of ranks, one per layer; ``layer.dense_rank`` means "leave dense". Raises ValueError when
    even rank 1 everywhere exceeds the budget.
    """
    if sum(layer.cost(1) for layer in layers) > budget:
        raise ValueError("the budget is below what rank 1 in every layer costs")
    ranks = [layer.dense_rank for layer in layers]
    total = sum(layer.cost(r) for layer, r in zip(layers, ranks))

    def next_move(i: int):
        layer, r = layers[i], ranks[i]
        if r <= 1:
            return None
        target = layer.largest_saving_rank if layer.cost(r) == layer.k * layer.n else r - step
        target = max(1, min(target, r - 1))
        if target < 1 or layer.largest_saving_rank < 1:
            return None
        saved = layer.cost(r) - layer.cost(target)
        if saved <= 0:
            return None
        return (layer.error(target) - layer.error(r)) / saved, i, target

    heap = [m for m in (next_move(i) for i in range(len(layers))) if m is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        _, i, target = heapq.heappop(heap)
        total -= layers[i].cost(ranks[i]) - layers[i].cost(target)
        ranks[i] = target
        move = next_move(i)
        if move is not None:
            heapq.heappush(heap, move)
    return ranks
