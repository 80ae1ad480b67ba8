"""Multiply-accumulate counts of a model's Conv, ConvTranspose, MatMul and Gemm nodes.

Shapes come from ONNX shape inference once the model inputs' symbolic dimensions are fixed
(``dims``; a leading batch dimension defaults to 1). A node whose shapes stay unknown is not counted
and is listed in ``MacCount.unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from onnxlr.shapes import input_shapes


@dataclass
class MacCount:
    total: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def count_macs(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> MacCount:
    """MACs of one run of ``model`` at the given input dimensions."""
    shapes = input_shapes(model, dims)
    for init in model.graph.initializer:
        shapes.setdefault(init.name, list(init.dims))
    out = MacCount()
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
                out.unknown.append(node_key(node))
            continue
        out.per_node[node_key(node)] = macs
        out.total += macs
    return out


def node_key(node) -> str:
    """How :class:`MacCount` names a node (an ONNX or onnx-graphsurgeon one): its name, else its first
    output's (node names are optional)."""
    if hasattr(node, "op_type"):
        return node.name or node.output[0]
    return node.name or node.outputs[0].name


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, list[int]]) -> int | None:
    op = node.op_type
    if op not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
        return None
    ins = [shapes.get(name) for name in node.input[:2]]
    y = shapes.get(node.output[0])
    if any(s is None for s in ins):
        return None
    x, w = ins
    if op == "Conv":
        if y is None:
            return None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return int(np.prod(y, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64)) if group else None
    if op == "ConvTranspose":
        # every input pixel is multiplied by the whole (Cin, Cout/g, *k) kernel slice of its group
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64)) // max(group, 1) * group
    if op == "MatMul":
        if y is None or len(x) < 1:
            return None
        return int(np.prod(y, dtype=np.int64)) * int(x[-1])
    trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
    k = x[0] if trans_a else x[-1]
    return None if y is None else int(np.prod(y, dtype=np.int64)) * int(k)
