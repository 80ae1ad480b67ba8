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

from onnxlr.graph import subgraph_nodes, subgraphs
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict


@dataclass
class FoldConstantsConfig:
    """size_threshold : do not fold a tensor larger than this many bytes (None: no limit)."""

    size_threshold: int | None = None


class FoldConstants(Pass):
    """Fold every computation of constants into initializers (see the module docstring); each node
    folded away is recorded."""

    name = "fold_constants"
    config_class = FoldConstantsConfig

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        before = {id(node): node for node in graph.nodes}
        _fold_dequantized_constants(graph)
        inside = any(True for _ in subgraph_nodes(graph)) and self._folds_inside_without_growing(graph)
        self._fold(graph, inside)
        if not inside and any(True for _ in subgraph_nodes(graph)):
            record.config["subgraphs"] = ("not folded: folding inside them would copy outer-scope weights into "
                                          "every branch that transforms them")
        kept = {id(node) for node in graph.nodes}
        for key, node in before.items():
            if key not in kept:
                record.layers.append(LayerChange(node.name, node.op, "rewritten", "folded into a constant"))
        return record

    def _fold(self, graph: gs.Graph, inside: bool) -> None:
        # flatten_subgraphs=False: onnx-graphsurgeon's inlining of an If with a constant condition
        # drops branch nodes that read another branch output (the affine_grid node tests).
        graph.fold_constants(fold_shapes=False, size_threshold=self.config.size_threshold, error_ok=True,
                             flatten_subgraphs=False, recurse_subgraphs=inside).cleanup()

    def _folds_inside_without_growing(self, graph: gs.Graph) -> bool:
        """Whether folding inside subgraphs keeps the weights as they were in size: where branches
        transform an outer-scope weight (Silero VAD's LSTM reorders its weights in four nested branches)
        folding copies it into each of them — the file grew 42% — and subgraphs are then left alone."""
        trial = graph.copy()
        self._fold(trial, True)
        return _weights(trial) <= _weights(graph)


def _weights(graph: gs.Graph) -> int:
    """Values held by the constants of ``graph`` and its subgraphs, each counted once however many
    subgraphs read it."""
    constants = {id(t): t for g in subgraphs(graph) for t in g.tensors().values()
                 if isinstance(t, gs.Constant) and t.shape is not None}
    return sum(int(np.prod(t.shape)) for t in constants.values())


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
