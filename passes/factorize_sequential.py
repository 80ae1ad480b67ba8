"""FactorizeMatMulSequential: factorize layer after layer, each fitted to the drifted input it will see.

Why
---
The one-shot data-aware methods fit every layer to the activations of the *original* model. Once the
layers before it are compressed, a layer's input has drifted from ``X`` to ``X_hat`` and the errors
add up through the depth of the network. Sequential compression (SVD-LLM's sequential update,
Wang et al. 2025; GPTQ/OBC-style layer-wise propagation) fits each layer to reproduce the original
output ``X W`` from the input ``X_hat`` that the already-compressed layers produce, so each layer also
corrects part of the error made upstream. The math is ``linalg.sequential_target`` (exact closed form
for ``whitened``); this module only orders the work.

Stages
------
A layer's stage is the number of factorizable layers on the longest path from the model inputs to its
input: the Q, K and V projections of the first transformer block are stage 0, the attention output
stage 1, the two feed-forward layers stages 2 and 3, the next block's Q, K and V stage 4… Layers of one
stage cannot influence each other's input, so one ORT pass per stage gives all their statistics: the
pass runs the original model and the current partly compressed model on the same calibration batches
and accumulates the paired statistics (``runtimes.stats.PairedRuns``). A weight shared by layers of
different stages is fitted once, at the latest of them. Cost: one pass over the calibration data per
stage (24 on a 6-block transformer).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.passes.factorize_matmul import (DATA_AWARE, FactorizeMatMul, FactorizeMatMulConfig, Layer,
                                            check_rank_names, find_layers)
from onnxlr.pipeline import PassRecord, config_dict
from onnxlr.runtimes.stats import CrossStats

# (current graph, {tensor name: dtype}) -> paired statistics of those tensors, original vs current graph
CollectPaired = Callable[[gs.Graph, Mapping[str, np.dtype]], Mapping[str, CrossStats]]


def layer_stages(graph: gs.Graph, layers: Sequence[Layer]) -> list[list[Layer]]:
    """Layers grouped by stage (see module docstring), earliest stage first.

    A layer's stage is the largest number of factorizable layers on any path from a graph input to its
    input tensor; layers sharing a weight all go to the latest stage among them.
    """
    graph.toposort()
    by_node = {id(layer.node): layer for layer in layers}
    depth: dict[str, int] = defaultdict(int)  # tensor name -> factorizable layers upstream of it
    stage_of: dict[tuple[str, bool], int] = {}
    for node in graph.nodes:
        reached = max((depth[t.name] for t in node.inputs if isinstance(t, gs.Variable)), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            key = (layer.weight.name, layer.transposed)
            stage_of[key] = max(stage_of.get(key, 0), reached)
            reached += 1
        for tensor in node.outputs:
            depth[tensor.name] = reached
    stages: dict[int, list[Layer]] = defaultdict(list)
    for layer in layers:
        stages[stage_of[(layer.weight.name, layer.transposed)]].append(layer)
    return [stages[s] for s in sorted(stages)]


class FactorizeMatMulSequential:
    """``FactorizeMatMul`` applied stage by stage, each stage fitted on paired statistics of the
    original model and of the model as compressed so far.

    collect : ``(graph, tensors) -> {tensor: CrossStats}`` for the current state of ``graph``
        (``api`` builds it from ``runtimes.stats.PairedRuns``).
    sensitivity : as for ``FactorizeMatMul`` (``fisher``), measured on the original model.
    A parameter budget is allocated before (``api.choose_allocation``) and arrives as per-layer ranks:
    allocation needs every layer's spectrum at once.
    """

    name = "factorize_matmul"

    def __init__(self, config: FactorizeMatMulConfig, collect: CollectPaired,
                 sensitivity: Mapping[str, np.ndarray] | None = None):
        if config.param_budget is not None:
            raise OnnxlrError("sequential factorization takes allocated per-layer ranks, not a parameter budget")
        if config.method not in DATA_AWARE:
            raise OnnxlrError(f"sequential factorization needs a data-aware method, not {config.method!r}")
        self.config = config
        self.collect = collect
        self.sensitivity = sensitivity

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, {**config_dict(self.config), "sequential": True})
        layers, skipped = find_layers(graph)
        record.layers.extend(skipped)
        check_rank_names(self.config, layers)
        for stage in layer_stages(graph, layers):
            keys = {(layer.weight.name, layer.transposed) for layer in stage}
            cross = self.collect(graph, {layer.node.inputs[0].name: layer.W.dtype for layer in stage})
            fitted = FactorizeMatMul(self.config, sensitivity=self.sensitivity, cross=cross, only=keys)
            record.layers.extend(fitted.run(graph).layers)
            graph.cleanup()
        return record
