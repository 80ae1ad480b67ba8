"""Models that arrive already quantized.

- Weights in QDQ form (``DequantizeLinear`` of a constant integer tensor): ``FoldConstants`` turns them
  into float weights the passes can factorize; :func:`weight_quantized_nodes` remembers which layers
  read such weights, so :func:`onnxlr.api.optimize` stores them — and the factors that replace them —
  as int8 again afterwards (weight-only, the form they came in), and the output is not larger than the
  input for that reason. Activation ``QuantizeLinear → DequantizeLinear`` pairs stay where they are:
  a factorized layer still reads the dequantized input; its new inner tensor is float.
- QOperator nodes (``QLinearMatMul``, ``MatMulInteger``, ``ConvInteger``, ``QLinearConv`` and ONNX
  Runtime's fused integer contrib ops): integer ops with their own scales, not float layers; onnxlr
  leaves them as they are and lists them in the report with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.pipeline import LayerChange, PassRecord

QOPERATOR_OPS = ("QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearConv", "QGemm", "QAttention",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "GatherBlockQuantized")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Gather")


def _dequantized_constant(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is DequantizeLinear applied to a constant integer tensor."""
    producers = tensor.inputs if isinstance(tensor, gs.Variable) else []
    if len(producers) != 1 or producers[0].op != "DequantizeLinear":
        return False
    source = producers[0].inputs[0]
    return isinstance(source, gs.Constant) and np.issubdtype(np.asarray(source.values).dtype, np.integer)


def weight_quantized_nodes(graph: gs.Graph) -> set[str]:
    """Names of MatMul/Gemm/Conv/Gather nodes whose weight (or table) is a dequantized integer constant."""
    found = set()
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        weight = node.inputs[0] if node.op == "Gather" else node.inputs[1]
        if _dequantized_constant(weight):
            found.add(node.name)
    return found


def replacements(graph: gs.Graph, names: set[str]) -> set[str]:
    """Nodes of ``graph`` that are, or replaced, the nodes ``names``: factorization keeps the original
    name on one factor and names the others ``<name>/…``."""
    return {node.name for node in graph.nodes
            if node.name in names or any(node.name.startswith(name + "/") for name in names)}


def qoperator_record(graph: gs.Graph) -> PassRecord:
    """A report entry listing the QOperator nodes onnxlr leaves untouched."""
    record = PassRecord("prequantized", {})
    for node in graph.nodes:
        if node.op in QOPERATOR_OPS:
            record.layers.append(LayerChange(node.name, node.op, "skipped",
                                             "already an integer (QOperator) op: left as it is"))
    return record
