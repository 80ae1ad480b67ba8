"""FuseActivations: activations that converters write as arithmetic become the ops they are (float, exact).

- ``Div(x, c)`` by a float constant without zeros → ``Mul(x, 1/c)`` (what ONNX Runtime's fused
  elementwise kernels and the integer ``QLinearMul`` take; within one float rounding).
- paddle2onnx's hard_swish ``x · Clip(x + 3, 0, 6) / 6`` (the ``/ 6`` a Div or a Mul by 1/6, on either
  side) and the ``HardSwish`` op → ``x · HardSigmoid(x; 1/6, 1/2)``. Four elementwise kernels become two
  (the layout detector runs 2× faster in float from this alone, docs/benchmarks.md), and a quantizer is
  never placed on ``x · relu6(x + 3)``, whose range (hundreds) wipes out every small output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import unique_name
from onnxlr.matching import float_constant, standard
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict


@dataclass
class FuseActivationsConfig:
    """divisions : rewrite Div by a constant as Mul. hardswish : fuse the decomposed HardSwish forms."""

    divisions: bool = True
    hardswish: bool = True


def _scalar(tensor: gs.Tensor) -> float | None:
    value = float_constant(tensor)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _only_reader(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 and tensor.name not in graph_outputs else None


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


class FuseActivations(Pass):
    """Div by constants to Mul, decomposed HardSwish to ``x · HardSigmoid(x)`` (module docstring)."""

    name = "fuse_activations"
    config_class = FuseActivationsConfig

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        if self.config.divisions:
            record.layers += [_div_to_mul(graph, node) for node in list(graph.nodes) if _is_const_div(node)]
        if self.config.hardswish:
            outputs = {t.name for t in graph.outputs}
            for node in list(graph.nodes):
                if node.op == "HardSwish" and standard(node):
                    record.layers.append(_hardswish_op(graph, node))
                elif node.op == "Add" and standard(node):
                    found = _hardswish_pattern(node, outputs)
                    if found is not None:
                        record.layers.append(_fuse(graph, node, *found))
        return record


def _is_const_div(node: gs.Node) -> bool:
    value = float_constant(node.inputs[1]) if node.op == "Div" and standard(node) and len(node.inputs) == 2 else None
    return value is not None and bool(np.all(value != 0)) and not isinstance(node.inputs[0], gs.Constant)


def _div_to_mul(graph: gs.Graph, node: gs.Node) -> LayerChange:
    value = np.asarray(node.inputs[1].values)
    node.op = "Mul"
    node.inputs[1] = gs.Constant(unique_name(graph, node.inputs[1].name + "/reciprocal"),
                                 np.asarray(1.0 / value.astype(np.float64), dtype=value.dtype))
    return LayerChange(node.name, "Div", "rewritten", details={"as": "Mul by the reciprocal"})


def _hardswish_pattern(add: gs.Node, outputs: set[str]):
    """``(x, final node)`` when ``add`` starts ``x · Clip(x + 3, 0, 6) · (1/6)`` (in either grouping)."""
    x = next((t for t in add.inputs if not isinstance(t, gs.Constant)), None)
    if x is None or _scalar(_other(add, x)) != 3.0:
        return None
    clip = _only_reader(add.outputs[0], outputs)
    if clip is None or clip.op != "Clip" or len(clip.inputs) < 3 or (_scalar(clip.inputs[1]), _scalar(clip.inputs[2])) != (0.0, 6.0):
        return None
    first = _only_reader(clip.outputs[0], outputs)
    if first is None or first.op != "Mul":
        return None
    last = _only_reader(first.outputs[0], outputs)
    if last is None or last.op != "Mul":
        return None
    sixth = abs((_scalar(_other(first, clip.outputs[0])) or 0) - 1 / 6) < 1e-6
    if _other(first, clip.outputs[0]) is x and abs((_scalar(_other(last, first.outputs[0])) or 0) - 1 / 6) < 1e-6:
        return x, last  # (x · clip) · 1/6
    if sixth and _other(last, first.outputs[0]) is x:
        return x, last  # x · (clip · 1/6)
    return None


def _fuse(graph: gs.Graph, add: gs.Node, x: gs.Tensor, last: gs.Node) -> LayerChange:
    gate = gs.Variable(unique_name(graph, f"{x.name}/hard_sigmoid"), dtype=x.dtype)
    graph.nodes.append(gs.Node("HardSigmoid", name=unique_name(graph, f"{add.name}/HardSigmoid"), inputs=[x],
                               outputs=[gate], attrs={"alpha": 1 / 6, "beta": 0.5}))
    graph.nodes.append(gs.Node("Mul", name=unique_name(graph, f"{add.name}/hard_swish"), inputs=[x, gate],
                               outputs=list(last.outputs)))
    last.outputs = []  # the old chain is detached: cleanup() removes it
    return LayerChange(add.name, "HardSwish", "rewritten", details={"as": "x * HardSigmoid(x)", "from": "Add/Clip/Mul/Mul"})


def _hardswish_op(graph: gs.Graph, node: gs.Node) -> LayerChange:
    x = node.inputs[0]
    gate = gs.Variable(unique_name(graph, f"{x.name}/hard_sigmoid"), dtype=x.dtype)
    graph.nodes.append(gs.Node("HardSigmoid", name=unique_name(graph, f"{node.name}/HardSigmoid"), inputs=[x],
                               outputs=[gate], attrs={"alpha": 1 / 6, "beta": 0.5}))
    node.op, node.inputs, node.attrs = "Mul", [x, gate], {}
    return LayerChange(node.name, "HardSwish", "rewritten", details={"as": "x * HardSigmoid(x)"})
