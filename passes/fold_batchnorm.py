"""FoldBatchNorm: a ``BatchNormalization`` right after a ``Conv`` becomes part of the conv's weight and bias.

``BN(Conv(x; W, b)) = Conv(x; W · g, (b − μ) · g + β)`` with ``g = γ / sqrt(σ² + ε)`` per output channel:
exact up to float rounding. ONNX Runtime folds it too when it loads the model, but a quantizer placed
before that sees the conv output *before* the normalization — the wrong range — and the BN as a float
island between two integer kernels; converters (paddle2onnx) leave every BN in the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import unique_name
from onnxlr.matching import float_constant, optional_input, standard
from onnxlr.pipeline import LayerChange, Pass


@dataclass
class FoldBatchNormConfig:
    """No options: every foldable pair is folded."""


@dataclass
class _Pair:
    node: gs.Node  # the BatchNormalization
    conv: gs.Node


class FoldBatchNorm(Pass):
    """Fold each inference-mode BatchNormalization into the Conv that feeds it alone."""

    name = "fold_batchnorm"
    config_class = FoldBatchNormConfig

    def match(self, graph: gs.Graph):
        outputs = {t.name for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op != "BatchNormalization" or not standard(node):
                continue
            source = node.inputs[0]
            conv = source.inputs[0] if source.inputs else None
            if conv is None or conv.op != "Conv":
                yield LayerChange(node.name, node.op, "skipped", "not after a Conv: left to ONNX Runtime")
            elif len(source.outputs) != 1 or source.name in outputs:
                yield LayerChange(node.name, node.op, "skipped", "the conv output it normalizes is read elsewhere too")
            else:
                yield _Pair(node, conv)

    def check(self, graph: gs.Graph, candidate: _Pair) -> str:
        bn, conv = candidate.node, candidate.conv
        if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
            return "training-mode BatchNormalization"
        if any(float_constant(t) is None for t in bn.inputs[1:5]) or float_constant(conv.inputs[1]) is None:
            return "parameters or conv weight not float constants"
        bias = optional_input(conv, 2)
        if bias is not None and float_constant(bias) is None:
            return "conv bias is not a constant"
        if len(conv.inputs[1].outputs) != 1:
            return "conv weight shared with another node"
        return ""

    def rewrite(self, graph: gs.Graph, candidate: _Pair) -> LayerChange:
        bn, conv = candidate.node, candidate.conv
        gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in bn.inputs[1:5])
        g = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        W = np.asarray(conv.inputs[1].values)
        bias = optional_input(conv, 2)
        b = np.zeros(W.shape[0]) if bias is None else np.asarray(bias.values, np.float64)
        new_W = (W.astype(np.float64) * g.reshape((-1,) + (1,) * (W.ndim - 1))).astype(W.dtype)
        new_b = ((b - mean) * g + beta).astype(W.dtype)
        conv.inputs[1] = gs.Constant(unique_name(graph, conv.inputs[1].name + "/bn_folded"), new_W)
        folded_bias = gs.Constant(unique_name(graph, f"{conv.name}/bias_bn_folded"), new_b)
        if bias is None:
            conv.inputs.append(folded_bias)
        else:
            conv.inputs[2] = folded_bias
        conv.outputs = [bn.outputs[0]]
        bn.outputs = []  # detached: cleanup() removes it
        return LayerChange(bn.name, bn.op, "rewritten", details={"into": conv.name})
