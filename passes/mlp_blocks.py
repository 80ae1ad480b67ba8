"""Two-layer blocks whose hidden units can be removed — what :class:`~onnxlr.passes.prune_structured.PruneStructured`
matches: a first layer (MatMul/Gemm, or Conv), a small DAG of per-unit ops, a second layer reading the
units. Nothing here edits the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.matching import float_constant, standard

# Ops applied to every unit independently (output unit j depends on input unit j only).
UNARY_OPS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
             "HardSwish", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity",
             "Neg", "Abs", "Exp", "Sqrt", "Clip"}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow"}
DENSE_OPS = ("MatMul", "Gemm")

@dataclass
class Block:
    """A matched two-layer block; ``unit_constants`` are (constant, axis) pairs indexed by hidden unit
    along ``axis`` (W1, its bias, per-unit constants of the chain, BN parameters)."""

    first: gs.Node
    chain: list[gs.Node]
    second: gs.Node
    hidden: gs.Variable
    tensors: list[gs.Variable]
    unit_constants: list[tuple[gs.Constant, int]]
    units: int
    unit_scale: np.ndarray | None = None  # BN gain of a conv block, for data-free scores

    @property
    def conv(self) -> bool:
        return self.first.op == "Conv"

    def W1(self) -> np.ndarray:
        """The first layer as a (k, h) matrix (current values)."""
        values = np.asarray(self.first.inputs[1].values)
        if self.conv:
            return values.reshape(self.units, -1).T
        return values.T if self.first.op == "Gemm" and self.first.attrs.get("transB", 0) else values

    def W2(self) -> np.ndarray:
        """The second layer as an (h, n) matrix; for a conv (Cin, Cout·∏kernel), one column per
        output channel and kernel tap."""
        values = np.asarray(self.second.inputs[1].values)
        if self.conv:
            return np.moveaxis(values, 1, 0).reshape(self.units, -1)
        return values.T if self.second.op == "Gemm" and self.second.attrs.get("transB", 0) else values

    def W2_values(self, W2: np.ndarray) -> np.ndarray:
        """Inverse of ``W2()``: the second layer's weight tensor from an (h', n) matrix."""
        old = np.asarray(self.second.inputs[1].values)
        if self.conv:
            return np.moveaxis(W2.reshape(W2.shape[0], old.shape[0], *old.shape[2:]), 0, 1)
        return W2.T if self.second.op == "Gemm" and self.second.attrs.get("transB", 0) else W2


def _unit_axis(shape: tuple[int, ...], units: int, from_end: int) -> int | None | str:
    """Axis of a constant (broadcast against an activation whose unit axis is ``from_end`` places from
    the end) that indexes units: an int, None if it broadcasts over them, or the reason it cannot."""
    if len(shape) < from_end or shape[len(shape) - from_end] == 1:
        return None
    if shape[len(shape) - from_end] == units:
        return len(shape) - from_end
    return f"constant of shape {list(shape)} does not broadcast over {units} hidden units"


def _first_layer(node: gs.Node) -> tuple[list[tuple[gs.Constant, int]], int] | str | None:
    """The unit constants and hidden size of a first layer, the reason it cannot be pruned, or None
    when the node is no candidate at all."""
    if not standard(node) or node.op not in (*DENSE_OPS, "Conv") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    values = float_constant(weight)
    if values is None:
        return None if node.op != "Conv" else "first conv weight is not a float constant"
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return f"first conv is grouped (group={node.attrs['group']})"
        constants = [(weight, 0)]
        units = values.shape[0]
        if len(node.inputs) > 2 and node.inputs[2].name:
            if float_constant(node.inputs[2]) is None:
                return "first conv bias is not a constant"
            constants.append((node.inputs[2], 0))
        return constants, units
    if values.ndim != 2:
        return None  # a batched MatMul is no dense layer
    transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
    units = values.shape[0] if transposed else values.shape[1]
    constants = [(weight, 0 if transposed else 1)]
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        C = node.inputs[2]
        if not isinstance(C, gs.Constant):
            return "first Gemm bias C is not a constant"
        axis = _unit_axis(np.shape(C.values), units, 1)
        if isinstance(axis, str):
            return axis
        if axis is not None:
            constants.append((C, axis))
    return constants, units


def _second_layer_problem(node: gs.Node, units: int) -> str | None:
    weight = float_constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return f"second layer {node.name!r} has no float constant weight"
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return f"second conv {node.name!r} is grouped (group={node.attrs['group']})"
        expected = weight.shape[1]
    else:
        if weight.ndim != 2:
            return f"second layer {node.name!r} has a {weight.ndim}-D weight"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return f"second Gemm {node.name!r} has transA=1: the hidden units are not its input features"
        expected = weight.shape[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else weight.shape[0]
    if expected != units:
        return f"second layer {node.name!r} expects {expected} inputs, the first layer gives {units}"
    return None


def _chain_constants(node: gs.Node, units: int, from_end: int) -> list[tuple[gs.Constant, int]] | str:
    """Constants of a chain node that are indexed by unit, or the reason the node is not per-unit."""
    if node.op == "BatchNormalization":
        if node.attrs.get("training_mode", 0) or len(node.outputs) != 1:
            return f"BatchNormalization {node.name!r} is in training mode"
        params = node.inputs[1:5]
        if any(float_constant(p) is None or np.shape(p.values) != (units,) for p in params):
            return f"BatchNormalization {node.name!r} parameters are not constants of shape ({units},)"
        return [(p, 0) for p in params]
    found = []
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant):
            axis = _unit_axis(np.shape(tensor.values), units, from_end)
            if isinstance(axis, str):
                return f"{node.op} node {node.name!r}: {axis}"
            if axis is not None:
                found.append((tensor, axis))
    return found


def _is_chain_op(node: gs.Node, conv: bool) -> bool:
    if not standard(node) or len(node.outputs) != 1:
        return False
    return node.op in UNARY_OPS or node.op in BINARY_OPS or (conv and node.op == "BatchNormalization")


def match_block(graph: gs.Graph, first: gs.Node) -> Block | str | None:
    """The prunable block starting at ``first``, the reason it cannot be pruned, or None when no
    second layer follows ``first`` (then it is no block at all)."""
    found = _first_layer(first)
    if found is None:
        return None
    conv = first.op == "Conv"
    tensors, chain, seconds, problems = _walk(graph, first.outputs[0], conv)
    if not seconds:
        return None
    if len(seconds) > 1:
        return f"the hidden units reach two layers, {seconds[0][0].name!r} and {seconds[1][0].name!r}"
    second, hidden = seconds[0]
    if isinstance(found, str):
        return found
    if problems:
        return problems[0]
    unit_constants, units = found
    problem = _second_layer_problem(second, units)
    if problem:
        return problem
    unit_scale = _collect_chain(first, chain, tensors, units, unit_constants)
    if isinstance(unit_scale, str):
        return unit_scale
    # Sliced constants and W2 must be private to the block: slicing a shared one would break its
    # other readers.
    block_nodes = {id(n) for n in (first, *chain, second)}
    for constant in [c for c, _ in unit_constants] + [second.inputs[1]]:
        others = [n for n in constant.outputs if id(n) not in block_nodes]
        if others:
            return f"constant {constant.name!r} is also read by {others[0].op} node {others[0].name!r}"
    return Block(first, chain, second, hidden, tensors, unit_constants, units, unit_scale)


def _walk(graph: gs.Graph, start: gs.Variable, conv: bool):
    """Every tensor downstream of the first layer's output through per-unit ops, until second layers:
    ``(tensors, chain nodes, [(second layer, the tensor it reads)], problems)``."""
    graph_outputs = {t.name for t in graph.outputs}
    tensors, chain, seconds, problems = [start], [], [], []
    visited: set[int] = set()  # ids of the nodes already placed (gs nodes compare by value, not identity)
    queue = [start]
    while queue:
        tensor = queue.pop(0)
        if tensor.name in graph_outputs:
            problems.append(f"tensor {tensor.name!r} is a graph output")
        for reader in tensor.outputs:
            if id(reader) in visited:
                continue
            visited.add(id(reader))
            is_second = standard(reader) and reader.op in (("Conv",) if conv else DENSE_OPS) \
                and reader.inputs[0] is tensor
            if is_second:
                seconds.append((reader, tensor))
            elif _is_chain_op(reader, conv):
                chain.append(reader)
                tensors.append(reader.outputs[0])
                queue.append(reader.outputs[0])
            else:
                problems.append(f"tensor {tensor.name!r} is also read by {reader.op} node {reader.name!r}")
    return tensors, chain, seconds, problems


def _collect_chain(first: gs.Node, chain: list[gs.Node], tensors: list, units: int,
                   unit_constants: list) -> np.ndarray | None | str:
    """Add the chain's per-unit constants to ``unit_constants``; the BN gain of a conv block (or None),
    or the reason the chain is not per-unit."""
    names = {t.name for t in tensors}
    from_end = 1 if first.op != "Conv" else np.ndim(first.inputs[1].values) - 1
    unit_scale = None
    for node in chain:
        outside = [t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name and t.name not in names]
        if outside:
            return f"{node.op} node {node.name!r} also reads {outside[0]!r} from outside the block"
        constants = _chain_constants(node, units, from_end)
        if isinstance(constants, str):
            return constants
        unit_constants += [c for c in constants if all(c[0] is not u for u, _ in unit_constants)]
        if node.op == "BatchNormalization" and unit_scale is None:
            scale, _, _, var = (np.asarray(p.values, dtype=np.float64) for p in node.inputs[1:5])
            unit_scale = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return unit_scale
