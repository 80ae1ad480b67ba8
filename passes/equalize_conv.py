"""EqualizeConv: cross-layer equalization of ``conv1 → f → conv2`` pairs (float, exact up to rounding).

``f`` is nothing, a ``Relu``, or a HardSwish written ``x · Clip(gate_conv(x), 0, 1)`` (:mod:`gate_conv`),
and conv2 is dense or depthwise over conv1's channels. conv1's output channel c is divided by ``s_c``,
what conv2 (and the gate) reads of it multiplied by ``s_c`` (:mod:`onnxlr.equalization` has the math and
the factors), from the per-channel ranges of conv1's output on the calibration data
(:class:`onnxlr.statistics.Activation`). Depthwise-separable nets (MobileNet, PP-LCNet, PP-OCR) have
pointwise outputs whose channel ranges differ 30×: after this one int8 scale per tensor fits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import equalization
from onnxlr.graph import unique_name
from onnxlr.integer_regions import clip_bounds
from onnxlr.matching import float_constant, optional_input
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import Activation


@dataclass
class EqualizeConvConfig:
    """min_spread : leave a pair alone when its channels' ranges are within this factor of each other."""

    min_spread: float = 1.05


@dataclass
class _Pair:
    node: gs.Node  # conv1
    conv2: gs.Node
    kind: str  # "linear", "relu" or "hardswish"
    gate: gs.Node | None = None


def _weight(node: gs.Node) -> np.ndarray | None:
    W = float_constant(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
    return W if W is not None and W.ndim == 4 else None


def _gate_of(conv1_out: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """``(gate conv, Mul)`` when conv1's output is read by exactly a HardSwish ``x · Clip(dw1x1(x), 0, 1)``."""
    readers = conv1_out.outputs
    if len(readers) != 2 or {r.op for r in readers} != {"Conv", "Mul"}:
        return None
    gate, mul = sorted(readers, key=lambda r: r.op)
    W = _weight(gate)
    clip = gate.outputs[0].outputs[0] if len(gate.outputs[0].outputs) == 1 else None
    if (W is None or W.shape[1:] != (1, 1, 1) or gate.attrs.get("group", 1) != W.shape[0] or clip is None
            or clip.op != "Clip" or clip_bounds(clip) != (0.0, 1.0)):
        return None
    return (gate, mul) if {t.name for t in mul.inputs} == {conv1_out.name, clip.outputs[0].name} else None


def find_pairs(graph: gs.Graph) -> list[_Pair]:
    """Every equalizable ``conv1 → f → conv2`` in ``graph``."""
    outputs, pairs = {t.name for t in graph.outputs}, []
    for conv1 in graph.nodes:
        W1 = _weight(conv1)
        if W1 is None or conv1.outputs[0].name in outputs or len(W1.ravel()) == W1.shape[0]:
            continue
        out, gate, kind, mid = conv1.outputs[0], None, None, None
        readers = out.outputs
        if len(readers) == 1 and readers[0].op == "Conv":
            kind, mid = "linear", out
        elif len(readers) == 1 and readers[0].op == "Relu":
            kind, mid = "relu", readers[0].outputs[0]
        elif _gate_of(out) is not None:
            (gate, mul), kind = _gate_of(out), "hardswish"
            mid = mul.outputs[0]
        if mid is None or mid.name in outputs or len(mid.outputs) != 1 or mid.outputs[0].op != "Conv":
            continue
        conv2, C = mid.outputs[0], W1.shape[0]
        W2 = _weight(conv2)
        if W2 is None or conv2.inputs[0] is not mid or len(conv2.inputs[1].outputs) != 1 or len(conv1.inputs[1].outputs) != 1:
            continue
        dense = conv2.attrs.get("group", 1) == 1 and W2.shape[1] == C
        depthwise = conv2.attrs.get("group", 1) == C and W2.shape[:2] == (C, 1)
        bias = optional_input(conv1, 2)
        if (dense or depthwise) and (bias is None or float_constant(bias) is not None):
            pairs.append(_Pair(conv1, conv2, kind, gate))
    return pairs


class EqualizeConv(Pass):
    """Equalize every pair :func:`find_pairs` finds, with factors from ``stats`` (Activation of conv1's
    output); a pair without statistics is skipped."""

    name = "equalize_conv"
    config_class = EqualizeConvConfig

    def needs(self, graph: gs.Graph) -> list:
        return [Activation(p.node.outputs[0].name) for p in find_pairs(graph)]

    def match(self, graph: gs.Graph):
        return find_pairs(graph)

    def check(self, graph: gs.Graph, candidate: _Pair) -> str:
        st = self.stats.get(candidate.node.outputs[0].name)
        if st is None or not st.count:
            return "no calibration statistics of its output"
        return ""

    def rewrite(self, graph: gs.Graph, candidate: _Pair) -> LayerChange:
        conv1, conv2 = candidate.node, candidate.conv2
        st = self.stats[conv1.outputs[0].name]
        absmax = np.maximum(np.abs(st.low), np.abs(st.high))
        W1, W2 = _weight(conv1), _weight(conv2)
        depthwise = conv2.attrs.get("group", 1) != 1
        s = equalization.equalization_factors(absmax, None if depthwise else np.abs(W2).max(axis=(0, 2, 3)))
        active = absmax[absmax > 0]
        spread = float(active.max() / np.median(active)) if active.size else 1.0
        details = {"conv2": conv2.name, "through": candidate.kind, "depthwise": bool(depthwise),
                   "spread_before": round(spread, 2)}
        if s.max() / s.min() < self.config.min_spread:
            return LayerChange(conv1.name, conv1.op, "skipped", "channel ranges already even", details)
        bias = optional_input(conv1, 2)
        gate_W = None if candidate.gate is None else _weight(candidate.gate)
        new = equalization.equalize(W1, None if bias is None else bias.values, W2, s, depthwise, gate_W)
        targets = [(conv1, 1), (conv1, 2), (conv2, 1), (candidate.gate, 1)]
        for (node, index), value in zip(targets, new):
            if node is not None and value is not None:
                old = node.inputs[index]
                node.inputs[index] = gs.Constant(unique_name(graph, old.name + "/equalized"),
                                                 value.astype(np.asarray(old.values).dtype))
        return LayerChange(conv1.name, conv1.op, "rewritten", details=details)
