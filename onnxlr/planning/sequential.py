"""Sequential factorization: layer after layer, each fitted to the drifted input it will see.

The one-shot data-aware methods fit every layer to the activations of the *original* model. Once the
layers before it are compressed, a layer's input has drifted from ``X`` to ``X_hat`` and the errors
add up through the depth of the network. Sequential compression (SVD-LLM's sequential update, Wang et
al. 2025; GPTQ/OBC-style layer-wise propagation) fits each layer to reproduce the original output
``X W`` from the input ``X_hat`` the already-compressed layers produce, so each layer also corrects part
of the error made upstream (``linalg.sequential_target``, exact in closed form for ``whitened``).

A layer's *stage* is the number of factorizable layers on the longest path from the model inputs to its
input: the Q, K and V projections of the first transformer block are stage 0, the attention output
stage 1, the two feed-forward layers stages 2 and 3, the next block's Q, K and V stage 4… Layers of one
stage cannot influence each other's input, so one ONNX Runtime pass per stage gives all their paired
statistics (the original and the partly compressed model on the same batches). A weight shared by
layers of different stages is fitted once, at the latest of them. Cost: one pass over the calibration
data per stage (24 on a 6-block transformer).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.factorization import DATA_AWARE
from onnxlr.graph import import_graph, truncated
from onnxlr.matching import Layer, find_layers
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig, check_rank_names
from onnxlr.pipeline import Pass, PassRecord, config_dict


def layer_stages(graph: gs.Graph, layers: Sequence[Layer]) -> list[list[Layer]]:
    """Layers grouped by stage (see the module docstring), earliest stage first. Layers sharing a weight
    all go to the latest stage among them."""
    graph.toposort()
    by_node = {id(layer.node): layer for layer in layers}
    depth: dict[str, int] = defaultdict(int)  # tensor name -> factorizable layers upstream of it
    stage_of: dict[tuple[str, bool], int] = {}
    for node in graph.nodes:
        reached = max((depth[t.name] for t in node.inputs if isinstance(t, gs.Variable)), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            stage_of[layer.key] = max(stage_of.get(layer.key, 0), reached)
            reached += 1
        for tensor in node.outputs:
            depth[tensor.name] = reached
    stages: dict[int, list[Layer]] = defaultdict(list)
    for layer in layers:
        stages[stage_of[layer.key]].append(layer)
    return [stages[s] for s in sorted(stages)]


class FactorizeInStages(Pass):
    """:class:`~onnxlr.passes.factorize_matmul.FactorizeMatMul` applied stage by stage, each stage fitted
    on paired statistics of ``original`` and of the model as compressed so far, collected by ``service``
    (:class:`onnxlr.runtimes.calibration.StatisticsService`). It runs ONNX Runtime between rewrites, so it
    is a step of the planner, not a pass of ``passes/``. ``sensitivity``: as for ``fisher``, measured on
    the original model. A whole-model budget is allocated before and arrives as per-layer ranks."""

    name = "factorize_matmul"

    def __init__(self, config: FactorizeMatMulConfig, original: onnx.ModelProto, service,
                 sensitivity: Mapping[str, np.ndarray] | None = None):
        super().__init__(config)
        if config.method not in DATA_AWARE:
            raise OnnxlrError(f"sequential factorization needs a data-aware method, not {config.method!r}")
        self.original = original
        self.reference = import_graph(original)
        self.service = service
        self.sensitivity = sensitivity

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, {**config_dict(self.config), "sequential": True})
        layers, skipped = find_layers(graph)
        record.layers.extend(skipped)
        check_rank_names(self.config, layers)
        for stage in layer_stages(graph, layers):
            tensors = {layer.input.name: layer.W.dtype for layer in stage}
            cross = self.service.paired(truncated(self.reference, tensors, self.original),
                                        truncated(graph, tensors, self.original), list(tensors))
            fitted = FactorizeMatMul(self.config, sensitivity=self.sensitivity, cross=cross,
                                     only={layer.key for layer in stage})
            record.layers.extend(fitted.run(graph).layers)
            graph.cleanup()
        return record
