"""FoldConstants: evaluate the parts of the graph that depend on no model input.

Some exporters compute weights at run time from constants — ``ConstantOfShape`` fills, a
``Transpose`` or ``Reshape`` of an initializer, a ``DequantizeLinear`` of an int8 tensor — and a
weight that is computed is not a constant the factorization passes can see. Folding first turns
every such tensor into an initializer, with onnx-graphsurgeon's ``fold_constants`` (which evaluates the
constant subgraphs with ONNX Runtime). Shapes are not folded: the model keeps its dynamic dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.pipeline import LayerChange, PassRecord, config_dict


@dataclass
class FoldConstantsConfig:
    """size_threshold : do not fold a tensor larger than this many bytes (None: no limit)."""

    size_threshold: int | None = None


class FoldConstants:
    name = "fold_constants"

    def __init__(self, config: FoldConstantsConfig | None = None):
        self.config = config or FoldConstantsConfig()

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        before = {id(node): node for node in graph.nodes}
        _fold_dequantized_constants(graph)
        # flatten_subgraphs=False: onnx-graphsurgeon's inlining of an If with a constant condition
        # drops branch nodes that read another branch output (the affine_grid node tests)
        graph.fold_constants(fold_shapes=False, size_threshold=self.config.size_threshold,
                             error_ok=True, flatten_subgraphs=False).cleanup()
        kept = {id(node) for node in graph.nodes}
        for key, node in before.items():
            if key not in kept:
                record.layers.append(LayerChange(node.name, node.op, "rewritten", "folded into a constant"))
        return record


def _fold_dequantized_constants(graph: gs.Graph) -> None:
    """Evaluate ``DequantizeLinear`` of constant tensors (QDQ weights), which onnx-graphsurgeon's folding
    leaves alone on purpose (TensorRT wants them kept): ``(x - zero_point) * scale`` along ``axis``."""
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
            continue
        if node.attrs.get("block_size", 0):
            continue  # blocked quantization (opset 21): left to ONNX Runtime
        x = np.asarray(node.inputs[0].values)
        scale = np.asarray(node.inputs[1].values, dtype=np.float32)
        zero = (np.asarray(node.inputs[2].values).astype(np.int64) if len(node.inputs) > 2 and node.inputs[2].name
                else np.zeros_like(scale, dtype=np.int64))
        if scale.ndim == 1 and x.ndim > 0:  # per-axis: broadcast along ``axis``
            shape = [1] * x.ndim
            shape[node.attrs.get("axis", 1) % x.ndim] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        value = ((x.astype(np.int64) - zero) * scale).astype(scale.dtype)
        out = node.outputs[0]
        # Readers of the output now read a constant; the node loses its output and cleanup() drops it.
        for reader in list(out.outputs):
            reader.inputs[reader.inputs.index(out)] = gs.Constant(out.name + "/folded", value)
        if out in graph.outputs:
            graph.outputs[graph.outputs.index(out)] = gs.Constant(out.name + "/folded", value)
        node.outputs.clear()
