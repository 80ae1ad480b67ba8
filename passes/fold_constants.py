"""FoldConstants: evaluate the parts of the graph that depend on no model input.

Some exporters compute weights at run time from constants — ``ConstantOfShape`` fills, a
``Transpose`` or ``Reshape`` of an initializer, a ``DequantizeLinear`` of an int8 tensor — and a
weight that is computed is not a constant the factorization passes can see. Folding first turns
every such tensor into an initializer, with onnx-graphsurgeon's ``fold_constants`` (which evaluates the
constant subgraphs with ONNX Runtime). Shapes are not folded: the model keeps its dynamic dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        graph.fold_constants(fold_shapes=False, size_threshold=self.config.size_threshold,
                             error_ok=True).cleanup()
        kept = {id(node) for node in graph.nodes}
        for key, node in before.items():
            if key not in kept:
                record.layers.append(LayerChange(node.name, node.op, "rewritten", "folded into a constant"))
        return record
