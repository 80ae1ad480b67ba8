"""GateConv: ``HardSigmoid(x; a, b)`` on an (N, C, H, W) tensor becomes ``Clip(Conv_dw1x1(x; W = a, B = b), 0, 1)``.

Exact in float. Quantized, the ``Clip`` is the saturation of the gate conv's output quantizer (range
[0, 1]), so the gate — and a HardSwish ``x · gate(x)`` — runs as one ``QLinearConv`` (+ ``QLinearMul``)
instead of a float island: ONNX Runtime has no integer HardSigmoid. Its per-channel weight also lets
cross-layer equalization pass through a HardSwish exactly (:mod:`onnxlr.equalization`). In float the
depthwise conv costs more than the HardSigmoid, so this pass belongs to the int8 route only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import unique_name
from onnxlr.matching import float_constant, standard
from onnxlr.pipeline import LayerChange, Pass


@dataclass
class GateConvConfig:
    """No options."""


@dataclass
class _Gate:
    node: gs.Node
    channels: int


def channels_of(tensor: gs.Tensor) -> int | None:
    """C of an (N, C, H, W) tensor: from its shape, else from the Conv (possibly behind a Mul/Add of
    x · gate(x)) that produces it."""
    shape = tensor.shape
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0:
        return int(shape[1])
    producer = tensor.inputs[0] if tensor.inputs else None
    weight = float_constant(producer.inputs[1]) if producer is not None and producer.op == "Conv" else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 4 else None


class GateConv(Pass):
    """Every HardSigmoid on a 4-D tensor with known channels → depthwise 1×1 gate conv + Clip(0, 1)."""

    name = "gate_conv"
    config_class = GateConvConfig

    def match(self, graph: gs.Graph):
        for node in list(graph.nodes):
            if node.op != "HardSigmoid" or not standard(node):
                continue
            channels = channels_of(node.inputs[0])
            if channels is None:
                yield LayerChange(node.name, node.op, "skipped", "input is not a 4-D tensor with known channels")
            else:
                yield _Gate(node, channels)

    def rewrite(self, graph: gs.Graph, candidate: _Gate) -> LayerChange:
        node, c = candidate.node, candidate.channels
        alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
        x, y = node.inputs[0], node.outputs[0]
        linear = gs.Variable(unique_name(graph, f"{y.name}/gate_linear"), dtype=np.float32)
        weight = gs.Constant(unique_name(graph, f"{node.name}/gate_weight"), np.full((c, 1, 1, 1), alpha, np.float32))
        bias = gs.Constant(unique_name(graph, f"{node.name}/gate_bias"), np.full((c,), beta, np.float32))
        graph.nodes.append(gs.Node("Conv", name=unique_name(graph, f"{node.name}/gate"), inputs=[x, weight, bias],
                                   outputs=[linear], attrs={"group": c, "kernel_shape": [1, 1]}))
        bounds = [gs.Constant(unique_name(graph, f"{node.name}/gate_{side}"), np.array(v, np.float32))
                  for side, v in (("low", 0.0), ("high", 1.0))]
        graph.nodes.append(gs.Node("Clip", name=unique_name(graph, f"{node.name}/gate_clip"), inputs=[linear, *bounds],
                                   outputs=[y]))
        node.outputs = []  # detached: cleanup() removes it
        return LayerChange(node.name, node.op, "rewritten", details={"channels": c, "as": "depthwise 1x1 Conv + Clip(0, 1)"})
