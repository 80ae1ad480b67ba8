"""Evaluate many per-layer weight choices with one ONNX Runtime session.

A rank search tries hundreds of allocations. Building each candidate model and a new session for it
would cost a graph rewrite, serialisation and ORT's session set-up every time; instead the model is
rewritten once so that every factorizable layer's weight — and a bias correction added after the
layer — are *graph inputs*. A candidate is then one ``session.run`` with its weights fed: the dense
equivalent ``A @ B`` of each factorized layer (what the two thin MatMuls compute, up to float
round-off) and its bias correction, or the original weight and zeros for a layer left dense.

Divergences of a candidate's outputs from the original's (``DIVERGENCES``) are what the searches
minimise: ``rel_l2`` (squared relative L2 error, summed over outputs), ``kl`` (KL divergence of the
softmax over the last axis, original ‖ candidate, mean over rows — for logits), ``cosine`` (one minus
the mean per-sample cosine).
"""

from __future__ import annotations

import copy

from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr.graph import export_model, import_graph, unique_name
from onnxlr.compare import DIVERGENCES
from onnxlr.runtimes.providers import make_session

WeightKey = tuple[str, bool]  # (weight initializer name, stored transposed: Gemm transB=1)


def swappable_model(model: onnx.ModelProto, layers: Sequence) -> tuple[onnx.ModelProto, dict[WeightKey, tuple[str, str]]]:
    """``model`` with each layer's constant weight turned into a graph input of the same stored shape,
    and an ``Add`` of a second input ``(n,)`` after every node reading it. ``layers``: the
    ``factorize_matmul.Layer`` objects of ``model``'s graph (only their weight names and nodes are used).
    Returns the model and, per weight key, the names of its (weight, bias) inputs."""
    graph = import_graph(model)
    by_name = {node.name: node for node in graph.nodes}
    names: dict[WeightKey, tuple[str, str]] = {}
    variables: dict[WeightKey, tuple[gs.Variable, gs.Variable]] = {}
    for layer in layers:
        key = (layer.weight.name, layer.transposed)
        node = by_name[layer.node.name]
        if key not in variables:
            stored = np.asarray(node.inputs[1].values)
            w = gs.Variable(unique_name(graph, f"{key[0]}/swap_weight"), dtype=stored.dtype, shape=list(stored.shape))
            d = gs.Variable(unique_name(graph, f"{key[0]}/swap_bias"), dtype=stored.dtype, shape=[layer.W.shape[1]])
            variables[key] = (w, d)
            names[key] = (w.name, d.name)
            graph.inputs.extend([w, d])
        w, d = variables[key]
        node.inputs[1] = w
        out = node.outputs[0]
        pre = gs.Variable(unique_name(graph, f"{node.name}/swap_pre"), dtype=out.dtype)
        node.outputs[0] = pre
        graph.nodes.append(gs.Node("Add", name=unique_name(graph, f"{node.name}/swap_add"), inputs=[pre, d],
                                   outputs=[out]))
    graph.cleanup().toposort()
    return export_model(graph, template=model), names


class SwapRunner:
    """Outputs of ``model`` for any choice of per-layer weights, from one ORT session.

    model : the original model (not modified); layers : its factorizable layers (``find_layers``).
    batches : calibration feed dicts; the reference outputs of the original are computed once.
    divergence : a key of ``DIVERGENCES``.

    ``runner.divergence({key: (W_stored, bias)}, batch_ids)`` runs the given batches (all by default)
    with those weights — any key not given keeps its original weight and a zero bias — and returns
    the divergence from the original's outputs, averaged over batches. ``runner.evaluations`` counts
    batch runs.
    """

    def __init__(self, model: onnx.ModelProto, layers: Sequence, batches: Sequence[Mapping[str, np.ndarray]], *,
                 divergence: str = "rel_l2", threads: int = 1, provider: str = "CPUExecutionProvider"):
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r} (choose from {', '.join(DIVERGENCES)})")
        self.metric = DIVERGENCES[divergence]
        self.batches = [dict(b) for b in batches]
        swappable, self.names = swappable_model(model, layers)
        self._swappable, self._provider, self._threads = swappable.SerializeToString(), provider, threads
        self.session = make_session(self._swappable, provider, threads)
        self.defaults: dict[WeightKey, tuple[np.ndarray, np.ndarray]] = {}
        for layer in layers:
            key = (layer.weight.name, layer.transposed)
            stored = np.asarray(layer.weight.values)
            self.defaults[key] = (stored, np.zeros(layer.W.shape[1], dtype=stored.dtype))
        reference = make_session(model.SerializeToString(), provider, threads)
        self.reference = [reference.run(None, batch) for batch in self.batches]
        self.evaluations = 0

    def with_threads(self, threads: int) -> "SwapRunner":
        """A copy for an executor's workers, whose sessions get ``threads`` intra-op threads each (so
        workers × threads stays within the cores)."""
        twin = copy.copy(self)
        twin._threads = threads
        return twin

    def __getstate__(self):
        # An ORT session does not pickle: a copy (an executor's worker) opens its own.
        state = dict(self.__dict__)
        del state["session"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session = make_session(self._swappable, self._provider, self._threads)

    def outputs(self, weights: Mapping[WeightKey, tuple[np.ndarray, np.ndarray | None]], batch: int) -> list[np.ndarray]:
        feeds = dict(self.batches[batch])
        for key, (w_name, d_name) in self.names.items():
            W, d = weights.get(key, (None, None))
            default_W, default_d = self.defaults[key]
            feeds[w_name] = default_W if W is None else np.ascontiguousarray(W, dtype=default_W.dtype)
            feeds[d_name] = default_d if d is None else np.asarray(d, dtype=default_d.dtype)
        self.evaluations += 1
        return self.session.run(None, feeds)

    def divergence(self, weights: Mapping[WeightKey, tuple[np.ndarray, np.ndarray | None]],
                   batch_ids: Sequence[int] | None = None) -> float:
        ids = range(len(self.batches)) if batch_ids is None else batch_ids
        total = 0.0
        for i in ids:
            got = self.outputs(weights, i)
            total += sum(self.metric(np.asarray(r, np.float64), np.asarray(g, np.float64))
                         for r, g in zip(self.reference[i], got) if np.issubdtype(np.asarray(r).dtype, np.floating))
        return total / max(len(ids), 1)
