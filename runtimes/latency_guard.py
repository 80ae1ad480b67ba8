"""Latency guard: keep a layer rewrite only if ONNX Runtime runs it faster than the original.

Fewer MACs often bring no speed-up (a thin 1×1 conv is memory-bound, a k×1 conv may miss the
runtime's fast path), so each candidate replacement is micro-benchmarked: a one-layer model with the
original conv and one with its replacement chain, fed a random input of the layer's real input
shape, timed interleaved (``runtimes.latency.measure``) on the target provider. The replacement is
accepted when its median is below ``max_ratio`` times the original's.

Results are cached in a JSON file (``runtimes.latency_cache``) keyed by provider, ORT version, CPU
model, thread count, input shape, and the weight shapes and attributes of both sides, so a second run
(or another model with the same layer shapes) does not measure again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.latency_cache import CACHE_DIR, DiskCache, cpu_model, measurement_key
from onnxlr.runtimes.providers import make_session

MIN_SECONDS = 0.2
MAX_REPEATS = 5000
DEFAULT_CACHE = CACHE_DIR / "latency.json"

__all__ = ["DEFAULT_CACHE", "LatencyGuard", "cpu_model"]


class LatencyGuard:
    """``guard(layer, candidate) -> (accepted, reason)`` for ``FactorizeConv``.

    shapes : input tensor name -> concrete shape (layers whose input shape is unknown are accepted
        unmeasured, and the reason says so).
    rewrite : ``rewrite(graph, layer, candidate)``, the rewrite the pass applies
        (:func:`onnxlr.passes.factorize_conv.rewrite`): the guard times what it builds.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], rewrite: Callable, *, provider: str = "CPUExecutionProvider",
                 threads: int = 1, repeats: int = 30, max_ratio: float = 1.0, cache: Path | None = DEFAULT_CACHE):
        self.shapes = dict(shapes)
        self.rewrite = rewrite
        self.provider = provider
        self.threads = threads
        self.repeats = repeats
        self.max_ratio = max_ratio
        self.cache_path = cache
        self._cache = DiskCache(cache)  # key -> [ms before, ms after]

    def __call__(self, layer, candidate) -> tuple[bool, str]:
        shape = self.shapes.get(layer.node.inputs[0].name)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return True, "latency not checked: input shape unknown (give --dim for symbolic dimensions)"
        original = _single_conv(layer, shape)
        graph = gs.import_onnx(original)
        conv = graph.nodes[0]
        clone = type(layer)(conv, conv.inputs[1], layer.W)
        self.rewrite(graph, clone, candidate)
        graph.cleanup().toposort()
        replaced = gs.export_onnx(graph)
        replaced.ir_version = original.ir_version
        key = self._key(original, replaced, shape)
        found = self._cache.get(key)
        if not (isinstance(found, (list, tuple)) and len(found) == 2):
            found = self._measure(original, replaced, shape)
            self._cache.put(key, list(found))
            self._cache.save()
        before, after = found
        ratio = after / before if before > 0 else float("inf")
        verdict = f"{before:.3f} ms -> {after:.3f} ms ({ratio:.2f}x) on {self.provider}"
        if ratio < self.max_ratio:
            return True, verdict
        return False, f"not faster: {verdict}"

    def _measure(self, original: onnx.ModelProto, replaced: onnx.ModelProto, shape) -> tuple[float, float]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sessions = {name: make_session(m.SerializeToString(), self.provider, self.threads)
                    for name, m in (("before", original), ("after", replaced))}
        # Small layers run in microseconds: repeat until each side has run for about MIN_SECONDS.
        once = measure(sessions, {"x": x}, warmup=2, repeats=3)["before"].median_ms / 1000.0
        repeats = int(min(MAX_REPEATS, max(self.repeats, MIN_SECONDS / max(once, 1e-7))))
        found = measure(sessions, {"x": x}, warmup=3, repeats=repeats)
        return found["before"].median_ms, found["after"].median_ms

    def _key(self, original, replaced, shape) -> str:
        def signature(model):
            return [(n.op_type, [(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute],
                     [list(t.dims) for t in model.graph.initializer if t.name in n.input]) for n in model.graph.node]
        return measurement_key(self.provider, self.threads, list(shape), signature(original), signature(replaced))


def _single_conv(layer, shape) -> onnx.ModelProto:
    """A model with only ``layer``'s conv (same weight, bias and attributes) on input ``x`` of ``shape``."""
    node = layer.node
    inputs = ["x", "W"]
    inits = [onnx.numpy_helper.from_array(np.asarray(layer.W, np.float32), "W")]
    if len(node.inputs) > 2 and node.inputs[2].name:
        inputs.append("b")
        inits.append(onnx.numpy_helper.from_array(np.asarray(node.inputs[2].values, np.float32), "b"))
    attrs = {k: v for k, v in node.attrs.items()}
    conv = onnx.helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = onnx.helper.make_graph([conv], "layer", [onnx.helper.make_tensor_value_info("x", 1, list(shape))],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
