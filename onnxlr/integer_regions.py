"""Which nodes of a float CNN graph run as integer kernels once QuantizeLinear/DequantizeLinear pairs are
placed around them, and which tensors share one activation scale — graph analysis, no rewriting.

The forms are those ONNX Runtime's CPU graph optimizer fuses (measured on ORT 1.32, docs/benchmarks.md):

- ``Conv`` with a constant 4-D weight → ``QLinearConv`` (NHWC int8 path); a ``Relu`` or ``Clip(lo ≤ 0 ≤ hi)``
  right after it, read by nothing else, is *folded*: the output quantizer's saturation is the clamp.
- ``Add``/``Mul`` → ``QLinearAdd``/``QLinearMul``; ``Sigmoid``/``GlobalAveragePool``/``LeakyRelu`` → their
  ``QLinear`` forms; ``Concat`` → ``QLinearConcat`` (a copy when all its inputs share the scale).
- ``MaxPool``, nearest ``Resize``, ``Split``, ``Slice``, ``Reshape``, ``Transpose``, ``Flatten``,
  ``(Un)Squeeze`` with one scale on input and outputs: run on the int8 codes.
- Everything else is a float island (``DQ → op → Q``): ``AveragePool`` (ORT's integer kernel measured 3×
  slower than the island), linear ``Resize`` (no integer kernel), ``HardSigmoid`` (write it as the gate
  conv first: :mod:`onnxlr.passes.gate_conv`), ``ConvTranspose``, ``Erf``, ``ReduceMean``…

Elementwise and pass-through ops are made integer only next to an integer producer (in graph order), as
ONNX Runtime's own quantizer does, so a float region (a transformer block's LayerNorm, GELU and
attention) is not cut into islands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

PASS_THROUGH = ("MaxPool", "Resize", "Split", "Slice", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                "Identity")
# ops that read a tensor's shape or pass it on unchanged: never a float island worth reporting
NOT_COMPUTING = ("Shape", "Size", "Identity")
FUSED_UNARY = ("Sigmoid", "GlobalAveragePool", "LeakyRelu")
FUSED_BINARY = ("Add", "Mul")
FLOAT_REASONS = {
    "AveragePool": "AveragePool stays float: ONNX Runtime's QLinearAveragePool is slower than a float island",
    "Resize": "linear Resize has no integer kernel in ONNX Runtime's CPU provider",
    "HardSigmoid": "HardSigmoid has no integer kernel (its channels are unknown, so no gate conv)",
    "ConvTranspose": "ONNX Runtime's CPU provider has no integer ConvTranspose kernel",
    "MatMul": "MatMul/Gemm layers are the int8 recipe's (integer MatMul); left float here",
    "Gemm": "MatMul/Gemm layers are the int8 recipe's (integer MatMul); left float here",
}


@dataclass
class IntegerPlan:
    """integer: names of the nodes that run integer. folded: activation node name → its producer (the
    activation disappears into the producer's output quantizer). quantized: names of the tensors that get
    a Q/DQ pair, in graph order (after folding, an activation's output replaces its producer's). shared:
    tensor name → the name of the tensor whose scale it shares (its group's first)."""

    integer: set[str] = field(default_factory=set)
    folded: dict[str, gs.Node] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """The constant ``(lo, hi)`` of a Relu or Clip (attributes or inputs), None when not constant."""
    if node.op == "Relu":
        return 0.0, np.inf
    lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
    for index, default in ((1, lo), (2, hi)):
        if len(node.inputs) > index and node.inputs[index].name:
            value = constant(node.inputs[index])
            if value is None:
                return None
            lo, hi = (float(value), hi) if index == 1 else (lo, float(value))
    return float(lo), float(hi)


def _activations(node: gs.Node, ranges) -> list[gs.Tensor]:
    return [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name in ranges]


def can_be_integer(node: gs.Node, ranges, quantized: set[str]) -> bool:
    """Whether ``node`` can run integer given the tensors with a calibrated range (``ranges``) and those
    already quantized upstream."""
    if node.domain not in ("", "ai.onnx", None) or not node.outputs or any(o.name not in ranges for o in node.outputs):
        return False
    inputs = _activations(node, ranges)
    fed_by_integer = any(t.name in quantized for t in inputs)
    if node.op == "Conv":
        W, bias = constant(node.inputs[1]), node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        return (W is not None and W.ndim == 4 and np.issubdtype(W.dtype, np.floating) and node.inputs[0].name in ranges
                and (bias is None or isinstance(bias, gs.Constant)))
    if node.op in FUSED_BINARY:
        consts = [constant(t) for t in node.inputs if isinstance(t, gs.Constant)]
        return bool(inputs) and fed_by_integer and len(inputs) + len(consts) == 2 and all(
            np.issubdtype(c.dtype, np.floating) for c in consts)
    if node.op == "Concat":
        return fed_by_integer and len(inputs) == len(node.inputs)
    if node.op in FUSED_UNARY:
        return fed_by_integer
    if node.op in PASS_THROUGH:
        nearest = node.op != "Resize" or node.attrs.get("mode", "nearest") in ("nearest", b"nearest")
        return nearest and node.inputs[0].name in quantized and node.attrs.get("ceil_mode", 0) == 0
    return False


def plan_integer(graph: gs.Graph, ranges: dict[str, tuple[float, float]], float_nodes=(),
                 share_ratio: float = 4.0) -> IntegerPlan:
    """The integer plan of ``graph`` (topologically sorted) given each float activation's range.

    float_nodes: names of nodes to keep float whatever they are. share_ratio: a Concat's inputs share
    its output's scale when their ranges' spans are within this factor (QLinearConcat is then a copy);
    otherwise each keeps its own and the Concat requantizes.
    """
    plan, quantized = IntegerPlan(), set()
    for node in graph.nodes:
        if node.name in float_nodes or not can_be_integer(node, ranges, quantized):
            continue
        plan.integer.add(node.name)
        reads = [node.inputs[0]] if node.op in (*PASS_THROUGH, "Conv") else _activations(node, ranges)
        quantized.update(t.name for t in reads)
        quantized.update(o.name for o in node.outputs)
    rename = _fold_activations(graph, plan, float_nodes)
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def union(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra

    for node in graph.nodes:
        if node.name not in plan.integer:
            continue
        reads = [node.inputs[0]] if node.op in (*PASS_THROUGH, "Conv") else _activations(node, ranges)
        names = [rename.get(t.name, t.name) for t in [*reads, *node.outputs]]
        for name in names:
            if name not in plan.quantized:
                plan.quantized.append(name)
        if node.op in PASS_THROUGH:
            for out in node.outputs:
                union(rename.get(reads[0].name, reads[0].name), rename.get(out.name, out.name))
        elif node.op == "Concat":
            spans = [span(ranges[t.name]) for t in reads]
            if max(spans) <= share_ratio * max(min(spans), 1e-12):
                for t in reads:
                    union(rename.get(node.outputs[0].name, node.outputs[0].name), rename.get(t.name, t.name))
    plan.shared = {name: root(name) for name in plan.quantized}
    return plan


def _fold_activations(graph: gs.Graph, plan: IntegerPlan, float_nodes) -> dict[str, str]:
    """Relu / Clip(lo ≤ 0 ≤ hi) read only from an integer Conv/Add/… output (not a pass-through: its
    scale is its input's) join that producer. Returns producer output name → activation output name."""
    outputs, rename = {t.name for t in graph.outputs}, {}
    for node in graph.nodes:
        if node.op not in ("Relu", "Clip") or node.name in float_nodes or not node.inputs:
            continue
        bounds = clip_bounds(node)
        source = node.inputs[0]
        producer = source.inputs[0] if source.inputs else None
        if (bounds is None or not bounds[0] <= 0.0 <= bounds[1] or producer is None
                or producer.name not in plan.integer or producer.op in PASS_THROUGH or len(producer.outputs) != 1
                or len(source.outputs) != 1 or source.name in outputs):
            continue
        plan.folded[node.name] = producer
        rename[source.name] = node.outputs[0].name
    return rename


def span(value_range: tuple[float, float]) -> float:
    """Width of a range with 0 included."""
    return max(value_range[1], 0.0) - min(value_range[0], 0.0)


def range_mixing(graph: gs.Graph, ranges: dict[str, tuple[float, float]], ratio: float = 16.0) -> dict[str, str]:
    """Nodes to keep float because one scale would mix ranges: a Concat whose inputs' spans differ more
    than ``ratio``× (a YOLO head joining pixel boxes 0–640 with 0–1 scores) together with everything after
    it and the wide-range arithmetic computing its inputs (:func:`wide_producers`), and a Split whose
    outputs' spans differ so, with its producer. Returns node name → reason."""
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "Concat":
            tensors = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        elif node.op == "Split":
            tensors = list(node.outputs)
        else:
            continue
        spans = [span(ranges[t.name]) for t in tensors if t.name in ranges]
        if len(spans) < 2 or len(spans) != len(tensors) or max(spans) <= ratio * max(min(spans), 1e-12):
            continue
        why = (f"range-mixing {node.op} {node.name!r}: its {'inputs' if node.op == 'Concat' else 'outputs'} span "
               f"{min(spans):.3g} to {max(spans):.3g} ({max(spans) / max(min(spans), 1e-12):.0f}× > {ratio:g}×), "
               "one int8 scale would erase the small ones")
        found.setdefault(node.name, why)
        if node.op == "Split" and node.inputs[0].inputs:
            found.setdefault(node.inputs[0].inputs[0].name, "produces the input of " + why)
        if node.op == "Concat":
            for later in downstream(node):
                found.setdefault(later.name, "after " + why)
            for earlier in wide_producers(node, ranges, ratio * max(min(spans), 1e-12)):
                found.setdefault(earlier.name, "computes a wide input of " + why)
    return found


WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def wide_producers(concat: gs.Node, ranges: dict[str, tuple[float, float]], limit: float) -> list[gs.Node]:
    """The arithmetic before a range-mixing ``concat`` whose outputs span more than ``limit``: a YOLO
    decode's ``(raw + grid) * stride`` and ``exp(raw) * stride`` in pixels. Kept float with the Concat,
    else they run int8 on pixel coordinates (a 1.6 px step over 0–416). The walk stops at a tensor of
    narrow range (the raw regressions, fine in int8) and at weight layers."""
    found, seen = [], set()
    stack = [t for t in concat.inputs if not isinstance(t, gs.Constant)]
    while stack:
        tensor = stack.pop()
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or node.name in seen or node.op in WEIGHT_OPS or tensor.name not in ranges \
                or span(ranges[tensor.name]) <= limit:
            continue
        seen.add(node.name)
        found.append(node)
        stack += [t for t in node.inputs if not isinstance(t, gs.Constant)]
    return found


def downstream(node: gs.Node) -> list[gs.Node]:
    """Every node reading, directly or not, an output of ``node``."""
    seen, stack, order = {node.name}, [node], []
    while stack:
        for out in stack.pop().outputs:
            for reader in out.outputs:
                if reader.name not in seen:
                    seen.add(reader.name)
                    order.append(reader)
                    stack.append(reader)
    return order


def head_nodes(graph: gs.Graph, layers: int = 1) -> set[str]:
    """The detection/classification head found automatically: every node between a graph output and its
    ``layers`` nearest weight layers (Conv, ConvTranspose, MatMul, Gemm), those layers included."""
    found: set[str] = set()
    for output in graph.outputs:
        frontier, seen = [(output, 0)], set()
        while frontier:
            tensor, depth = frontier.pop()
            node = tensor.inputs[0] if tensor.inputs else None
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            found.add(node.name)
            depth += node.op in WEIGHT_OPS
            if node.op in WEIGHT_OPS and depth >= layers:
                continue
            frontier.extend((t, depth) for t in node.inputs if not isinstance(t, gs.Constant))
    return found
