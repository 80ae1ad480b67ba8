"""``--target latency=F``: a budget in milliseconds, priced per layer from a lookup table and checked on
the whole model.

The budget is what the factorizable layers may take of ``F`` times the whole model's time on the
first provider, everything else keeping its time; each layer's levels cost what ONNX Runtime takes for
it at that rank (:class:`onnxlr.runtimes.latency_table.LatencyTable`). The table misses what a layer's
neighbours and ORT's fusions do, so the result is timed against the original and, when it misses the
target, searched again with the share lowered by the miss (:func:`meet_latency`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.feeds import synthetic_feeds
from onnxlr.macs import count_macs, node_key
from onnxlr.runtimes import latency, latency_table
from onnxlr.runtimes.providers import make_session

# Timed runs of a whole model for a latency target.
LATENCY_REPEATS = 30
# A missed latency target is searched again at a lowered share at most this many times.
LATENCY_RETRIES = 2


@dataclass
class LatencyModel:
    """What a ``--target latency=F`` budget is made of, measured once per model: the whole model's
    median time on ``provider`` (synthetic inputs at the ``--dim`` sizes), the factorizable layers'
    dense time from the lookup table, and ``cost_of(layer, ranks) -> ms per level`` from that table.
    Everything but the factorizable layers is taken to keep its time."""

    whole_ms: float
    dense_ms: float
    cost_of: Callable[[Any, np.ndarray], np.ndarray]
    provider: str

    def budget(self, share: float) -> float:
        """Milliseconds left to the factorizable layers: ``share * whole - (whole - their dense time)``."""
        rest = max(self.whole_ms - self.dense_ms, 0.0)
        budget = share * self.whole_ms - rest
        if budget <= 0:
            raise OnnxlrError(f"--target latency={share:g} is out of reach: the model takes {self.whole_ms:.3g} ms on "
                              f"{self.provider}, {rest:.3g} ms of it outside its factorizable MatMul/Gemm layers")
        return budget


def latency_model(model, layers, *, provider: str, threads: int, dims: Mapping[str, int] | None,
                  table=None) -> LatencyModel:
    """Time ``model`` once and price its ``layers`` from the lookup table
    (:class:`runtimes.latency_table.LatencyTable`, measured where its cache lacks a shape)."""
    macs = count_macs(model, dims).per_node
    rows: dict[tuple[str, bool], float] = {}
    first = {}  # weight key -> a layer reading it
    for layer in layers:
        if node_key(layer.node) not in macs:
            raise OnnxlrError(f"cannot time {node_key(layer.node)!r} for a latency target: its shapes stay unknown; "
                              f"set the model's symbolic dimensions with --dim NAME=VALUE")
        key = (layer.weight.name, layer.transposed)
        rows[key] = rows.get(key, 0.0) + macs[node_key(layer.node)] / layer.W.size
        first.setdefault(key, layer)
    table = table or latency_table.LatencyTable(provider=provider, threads=threads)

    def cost_of(layer, ranks: np.ndarray) -> np.ndarray:
        k, n = layer.W.shape
        dense, factorized = table.layer_costs(max(1, int(round(rows[(layer.weight.name, layer.transposed)]))), k, n,
                                              [int(r) for r in ranks if r > 0])
        it = iter(factorized)
        return np.asarray([dense if r == 0 else float(next(it)) for r in ranks])

    session = make_session(model.SerializeToString(), provider, threads)
    whole = latency.measure({"model": session}, synthetic_feeds(model, dict(dims or {})), warmup=3,
                            repeats=LATENCY_REPEATS)["model"].median_ms
    dense = sum(float(cost_of(layer, np.array([0]))[0]) for layer in first.values())
    return LatencyModel(whole, dense, cost_of, provider)



def latency_ratio(original, optimized, *, provider: str, threads: int, dims: Mapping[str, int] | None) -> float:
    """Median latency of ``optimized`` over ``original``'s, timed interleaved on synthetic inputs at ``dims``."""
    sessions = {name: make_session(m.SerializeToString(), provider, threads)
                for name, m in (("original", original), ("optimized", optimized))}
    found = latency.measure(sessions, synthetic_feeds(original, dict(dims or {})), warmup=3, repeats=LATENCY_REPEATS)
    return found["optimized"].median_ms / found["original"].median_ms


def meet_latency(original: onnx.ModelProto, optimized: onnx.ModelProto, build: Callable[[float], Any], share: float,
                 *, provider: str, threads: int, dims: Mapping[str, int] | None) -> tuple[Any, list[dict]]:
    """Time ``optimized`` against ``original`` (interleaved, whole model, synthetic inputs at ``dims``)
    and, while it misses ``share`` of the original's latency, rebuild it with ``build(lower share)``
    (the share lowered by the miss, at most :data:`LATENCY_RETRIES` times). Returns the last build
    (None if the first result stands) and every check: ``{"share_searched", "measured_ratio"}``."""
    asked, checks, built = share, [], None
    for attempt in range(LATENCY_RETRIES + 1):
        ratio = latency_ratio(original, optimized, provider=provider, threads=threads, dims=dims)
        checks.append({"share_searched": round(share, 4), "measured_ratio": round(ratio, 4)})
        if ratio <= asked or attempt == LATENCY_RETRIES or share - (ratio - asked) <= 0:
            break
        share -= ratio - asked
        try:
            built = build(share)
        except OnnxlrError:  # the lowered budget is out of reach: the last result stands
            break
        optimized = built.model
    return built, checks
