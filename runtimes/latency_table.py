"""Latency lookup table for MatMul layers, dense or factorized, for a rank allocator with a time budget.

MACs predict latency poorly (a thin rank-r product is memory-bound, small GEMMs miss the runtime's
fast kernels), so the allocator asks what ONNX Runtime actually takes: each (rows, k, n, rank) is
micro-benchmarked once as a one- or two-node model on the target provider and kept in an on-disk
cache (``runtimes.latency_cache``) keyed by provider, onnxruntime version, CPU model, intra-op
thread count and the shape, so later runs and other models with the same layer shapes look it up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.latency_cache import CACHE_DIR, DiskCache, measurement_key
from onnxlr.runtimes.providers import make_session

MIN_REPEATS = 10
MAX_REPEATS = 5000
DEFAULT_TABLE_CACHE = CACHE_DIR / "latency_table.json"


class LatencyTable:
    """Median latency (ms) of one MatMul layer as ONNX Runtime runs it on ``provider``: dense
    X[rows,k] @ W[k,n], or factorized (X @ A[k,r]) @ B[r,n]. Measured by micro-benchmarking a
    one- or two-node float32 model, cached on disk keyed by provider, onnxruntime version, CPU model,
    intra-op thread count and (rows, k, n, rank).

    rows : the product of X's leading dimensions (batch × sequence for a transformer's projections).
    cache : the JSON file, or None to keep measurements in memory only.
    min_seconds : the models of one layer are repeated until the slowest has run about this long.
    """

    def __init__(self, *, provider: str = "CPUExecutionProvider", threads: int = 1,
                 cache: Path | None = DEFAULT_TABLE_CACHE, min_seconds: float = 0.1):
        self.provider = provider
        self.threads = threads
        self.min_seconds = min_seconds
        self._cache = DiskCache(cache)  # key -> ms

    def matmul_ms(self, rows: int, k: int, n: int, rank: int | None) -> float:
        """Latency of the dense layer (``rank`` None) or of its rank-``rank`` factorization.

        A rank's cost is only meaningful next to the dense one, so the dense model is measured too
        (interleaved) if the cache lacks it.
        """
        dense, factorized = self.layer_costs(rows, k, n, [] if rank is None else [rank])
        return dense if rank is None else float(factorized[0])

    def layer_costs(self, rows: int, k: int, n: int, ranks: Sequence[int]) -> tuple[float, np.ndarray]:
        """(dense ms, ms per rank) for one layer; measures only what the cache lacks.

        The missing models of the layer are timed interleaved in one run (drifts of the machine hit
        them alike), then the cache is saved once.
        """
        ranks = [int(r) for r in ranks]
        if min(rows, k, n, *ranks) < 1:
            raise ValueError(f"shapes and ranks must be positive: rows={rows} k={k} n={n} ranks={ranks}")
        wanted: list[int | None] = [None, *dict.fromkeys(ranks)]
        keys = {r: measurement_key(self.provider, self.threads, [int(rows), int(k), int(n), r]) for r in wanted}
        missing = [r for r in wanted if not _is_ms(self._cache.get(keys[r]))]
        if missing:
            for r, ms in zip(missing, self._measure(rows, k, n, missing)):
                self._cache.put(keys[r], ms)
            self._cache.save()
        return float(self._cache.get(keys[None])), np.array([self._cache.get(keys[r]) for r in ranks], np.float64)

    def _measure(self, rows: int, k: int, n: int, ranks: Sequence[int | None]) -> list[float]:
        """Median ms of the layer at each of ``ranks`` (None = dense), timed interleaved."""
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
        sessions = {r: make_session(matmul_model(rows, k, n, r, rng).SerializeToString(), self.provider, self.threads)
                    for r in ranks}
        # Small layers run in microseconds: repeat until the slowest has run for about min_seconds.
        once = max(t.median_ms for t in measure(sessions, feeds, warmup=2, repeats=3).values()) / 1000.0
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, self.min_seconds / max(once, 1e-7))))
        found = measure(sessions, feeds, warmup=3, repeats=repeats)
        return [found[r].median_ms for r in ranks]


def matmul_model(rows: int, k: int, n: int, rank: int | None, rng: np.random.Generator) -> onnx.ModelProto:
    """x[rows,k] -> y[rows,n]: ``MatMul(x, W[k,n])``, or ``MatMul(MatMul(x, A[k,rank]), B[rank,n])``.

    Weights are random (scaled by 1/sqrt(fan-in), so no denormals or overflow skew the timing) and
    stored as initializers, as in an exported model, so ONNX Runtime may prepack them.
    """
    shapes = {"W": (k, n)} if rank is None else {"A": (k, rank), "B": (rank, n)}
    nodes, inits, source = [], [], "x"
    for i, (name, shape) in enumerate(shapes.items()):
        out = "y" if i == len(shapes) - 1 else "h"
        w = rng.standard_normal(shape) / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        nodes.append(helper.make_node("MatMul", [source, name], [out], name=f"matmul_{name}"))
        source = out
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _is_ms(value) -> bool:
    """A cached entry usable as a latency (a hand-edited or foreign file may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value >= 0
