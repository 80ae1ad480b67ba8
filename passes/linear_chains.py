"""Chains of linear layers in a graph: what :class:`~onnxlr.passes.compose_chains.ComposeLinearChains`
composes. Nothing here edits the graph.

A chain starts at a *linear layer* and follows its output while each tensor has exactly one reader
(counting subgraphs) and is not a graph output:

- linear layers: ``MatMul(X, W)`` and ``Gemm(X, B, C)`` (``transA = 0``) with a constant 2-D float
  weight, acting on the last axis; ``Conv`` with a constant 1×1 (…×1) kernel and ``group = 1``, acting
  on the channel axis. The first layer of a chain may stride and pad; a conv later in the chain must
  not (a padded border would hold the bias of a later layer only, not the chain's);
- per-feature affine ops: ``Add``/``Sub``/``Mul``/``Div`` with a constant that broadcasts over
  everything but the feature axis (biases, scales), ``BatchNormalization`` (inference) on channels;
- layout ops, which move whole feature vectors and so commute with a map on them: ``Transpose`` (the
  feature axis is followed wherever it goes), ``Reshape`` keeping the feature axis last and its size
  (an explicit size, a copied 0, or a -1 that shape inference shows keeps it), ``Flatten`` when only
  unit axes join the features, ``Identity``.

Anything else — a nonlinearity, a second reader of an intermediate tensor (a branch or residual), a
side output, a constant that varies along other axes — ends the chain there. A chain with fewer
than two linear layers is no chain. Trailing layout ops after the last linear layer stay outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import chains
from onnxlr.chains import AffineMap
from onnxlr.graph import consumer_counts
from onnxlr.matching import float_constant, standard

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
AFFINE_OPS = ("Add", "Sub", "Mul", "Div", "BatchNormalization")
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Identity")


@dataclass
class Layout:
    """Where the features are in a tensor: ``axis`` counted from the end (-1 = last), ``rank`` if known."""

    axis: int
    rank: int | None = None


@dataclass
class Step:
    """One node of a chain: a ``linear`` layer or ``affine`` op (``map`` on the features) or a
    ``layout`` op seeing features of width ``width``."""

    node: gs.Node
    kind: str
    width: int  # feature width the node reads
    map: AffineMap | None = None
    constants: list = field(default_factory=list)  # the map's constants (weights, biases, scales)
    extra: list = field(default_factory=list)  # a layout op's inputs after the data (a Reshape's shape)
    spatial: int = 0  # a conv's spatial axes


@dataclass
class Chain:
    input: gs.Tensor
    steps: list[Step]

    @property
    def linear(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "linear"]

    @property
    def output(self) -> gs.Variable:
        return self.steps[-1].node.outputs[0]

    def widths(self) -> list[int]:
        """Input width, every width between linear layers, output width."""
        linear = self.linear
        return [linear[0].map.shape[0], *(s.map.shape[1] for s in linear)]

    def composed(self) -> AffineMap:
        return chains.compose([s.map for s in self.steps if s.map is not None])


# ----------------------------------------------------------------------------------------- finding


def find_chains(graph: gs.Graph) -> list[Chain]:
    """Every maximal chain of two or more linear layers in the top-level graph, in graph order."""
    readers = consumer_counts(graph)
    outputs = {t.name for t in graph.outputs}
    shapes = _Shapes(graph)
    taken: set[int] = set()
    found = []
    for node in graph.nodes:
        if id(node) in taken or node.op not in LINEAR_OPS or not standard(node):
            continue
        start = _linear_step(node, None, first=True)
        if start is None:
            continue
        step, layout = start
        steps = [step]
        tensor = node.outputs[0]
        while readers[tensor.name] == 1 and tensor.name not in outputs and len(tensor.outputs) == 1:
            nxt = tensor.outputs[0]
            if not standard(nxt) or (nxt.inputs[0] is not tensor and nxt.op not in ("Add", "Sub", "Mul")):
                break  # only a commutative or subtracted affine op may read the chain as its second input
            if any(readers[o.name] or o.name in outputs for o in nxt.outputs[1:]):
                break  # a side output (BatchNormalization's running statistics, Dropout's mask)
            found_step = _next_step(nxt, tensor, layout, _width(steps), shapes)
            if found_step is None:
                break
            step, layout = found_step
            steps.append(step)
            tensor = nxt.outputs[0]
        if sum(s.kind == "linear" for s in steps) < 2:
            continue
        # the chain ends with its last linear layer and the affine ops right after it: a layout op
        # there, and anything past it, stays outside (the last layer's form must see its own layout)
        last = max(i for i, s in enumerate(steps) if s.kind == "linear")
        end = last + 1
        while end < len(steps) and steps[end].kind == "affine":
            end += 1
        steps = steps[:end]
        taken.update(id(s.node) for s in steps)
        found.append(Chain(node.inputs[0], steps))
    return found


def _width(steps: list[Step]) -> int:
    """The feature width after ``steps``."""
    for s in reversed(steps):
        if s.map is not None:
            return s.map.shape[1]
    raise AssertionError("a chain starts with a linear layer")


def _linear_step(node: gs.Node, layout: Layout | None, *, first: bool) -> tuple[Step, Layout] | None:
    """The map of a linear layer reading the chain tensor as ``inputs[0]`` (``layout`` None: a chain
    start, any layout its op accepts), and where its output's features are."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[0], gs.Variable):
        return None
    weight = node.inputs[1]
    values = float_constant(weight)
    if values is None:
        return None
    if node.op == "MatMul":
        if values.ndim != 2 or (layout is not None and layout.axis != -1):
            return None
        return Step(node, "linear", values.shape[0], AffineMap.linear(values), [weight]), \
            Layout(-1, layout.rank if layout else None)
    bias_input = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    bias = None if bias_input is None else float_constant(bias_input)
    if bias_input is not None and bias is None:
        return None
    if node.op == "Gemm":
        if values.ndim != 2 or node.attrs.get("transA", 0) or (layout is not None and layout.axis != -1):
            return None
        W = float(node.attrs.get("alpha", 1.0)) * (values.T if node.attrs.get("transB", 0) else values)
        b = None
        if bias is not None:
            if bias.size not in (1, W.shape[1]) or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
                return None  # a C varying along rows is no per-feature bias
            b = float(node.attrs.get("beta", 1.0)) * bias.reshape(-1)
        return Step(node, "linear", W.shape[0], AffineMap.linear(W, b), [weight] + ([bias_input] if bias is not None else [])), \
            Layout(-1, 2)
    if node.op == "Conv":
        if values.ndim < 3 or any(d != 1 for d in values.shape[2:]) or int(node.attrs.get("group", 1)) != 1:
            return None
        if layout is not None and layout.axis != 1 - values.ndim:
            return None
        if not first:
            spatial = values.ndim - 2
            if any(s != 1 for s in node.attrs.get("strides", [1] * spatial)) or \
                    any(p != 0 for p in node.attrs.get("pads", [0] * 2 * spatial)):
                return None
        W = values.reshape(values.shape[0], values.shape[1]).T
        return Step(node, "linear", W.shape[0], AffineMap.linear(W, None if bias is None else bias.reshape(-1)),
                    [weight] + ([bias_input] if bias is not None else []), spatial=values.ndim - 2), \
            Layout(1 - values.ndim, values.ndim)
    return None


def _next_step(node: gs.Node, tensor: gs.Variable, layout: Layout, width: int, shapes: "_Shapes"
               ) -> tuple[Step, Layout] | None:
    """The step ``node`` (reading the chain ``tensor``, features of ``width`` at ``layout``) adds, or
    None when it ends the chain."""
    if layout.rank is None and _needs_rank(node, layout):
        dims = shapes.dims(tensor)
        if dims is not None:
            layout = Layout(layout.axis, len(dims))
    if node.op in LINEAR_OPS:
        found = _linear_step(node, layout, first=False)
        if found is not None and found[0].map.shape[0] != width:
            return None
        return found
    if node.op in AFFINE_OPS:
        step = _affine_step(node, tensor, layout, width)
        return None if step is None else (step, layout)
    if node.op in LAYOUT_OPS:
        moved = _layout_step(node, layout, width, shapes)
        return None if moved is None else (Step(node, "layout", width, extra=list(node.inputs[1:])), moved)
    return None


def _needs_rank(node: gs.Node, layout: Layout) -> bool:
    """Whether telling if ``node`` keeps the chain needs the rank of the tensor it reads: a Reshape
    copying the last size (0), a Transpose without perm, a Flatten, a constant of more axes than the
    feature axis is from the end."""
    if node.op == "Reshape":
        target = node.inputs[1] if len(node.inputs) > 1 else None
        return isinstance(target, gs.Constant) and np.asarray(target.values).reshape(-1)[-1:].tolist() == [0]
    if node.op in ("Transpose", "Flatten"):
        return node.op == "Flatten" or node.attrs.get("perm") is None
    return node.op in ("Add", "Sub", "Mul", "Div") and any(
        isinstance(t, gs.Constant) and t.values.ndim > -layout.axis for t in node.inputs)


def _feature_vector(c: np.ndarray, layout: Layout, width: int) -> np.ndarray | None:
    """A constant operand as a per-feature vector (width,), or None when it varies along other axes
    or would broadcast the tensor to a higher rank."""
    if c.ndim > (layout.rank if layout.rank is not None else -layout.axis):
        return None
    position = c.ndim + layout.axis
    for i, d in enumerate(c.shape):
        if d != 1 and not (i == position and d == width):
            return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (width,)).copy() if c.size in (1, width) else None


def _affine_step(node: gs.Node, tensor: gs.Variable, layout: Layout, width: int) -> Step | None:
    if node.op == "BatchNormalization":
        if layout.rank is None or layout.axis != 1 - layout.rank or node.attrs.get("training_mode", 0):
            return None
        params = [float_constant(t) for t in node.inputs[1:5]]
        if any(p is None or p.size != width for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return Step(node, "affine", width, AffineMap.elementwise(scale, beta - mean * scale), list(node.inputs[1:5]))
    if len(node.inputs) != 2:
        return None
    first = node.inputs[0] is tensor
    other = node.inputs[1] if first else node.inputs[0]
    c = float_constant(other)
    if c is None:
        return None
    v = _feature_vector(c, layout, width)
    if v is None:
        return None
    ones, zeros = np.ones(width), np.zeros(width)
    if node.op == "Add":
        scale, shift = ones, v
    elif node.op == "Sub":
        scale, shift = (ones, -v) if first else (-ones, v)
    elif node.op == "Mul":
        scale, shift = v, zeros
    else:  # Div: only x / c is linear
        if not first or np.any(v == 0):
            return None
        scale, shift = 1.0 / v, zeros
    return Step(node, "affine", width, AffineMap.elementwise(scale, shift), [other])


def _layout_step(node: gs.Node, layout: Layout, width: int, shapes: "_Shapes") -> Layout | None:
    """Where the features are after a layout op, or None when it would mix them with other axes."""
    if node.op == "Identity":
        return layout
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        rank = len(perm) if perm is not None else layout.rank
        if rank is None or (layout.rank is not None and layout.rank != rank):
            return None
        perm = list(perm) if perm is not None else list(range(rank))[::-1]
        return Layout(perm.index(rank + layout.axis) - rank, rank)
    if node.op == "Reshape":
        target = node.inputs[1] if len(node.inputs) > 1 else None
        if layout.axis != -1 or not isinstance(target, gs.Constant):
            return None
        shape = [int(d) for d in np.asarray(target.values).reshape(-1)]
        last = shape[-1] if shape else None
        if last == width:
            return Layout(-1, len(shape))
        if last == 0 and not node.attrs.get("allowzero", 0) and layout.rank == len(shape):
            return Layout(-1, len(shape))
        if last == -1 and shapes.last_dim(node.outputs[0]) == width:
            return Layout(-1, len(shape))
        return None
    if node.op == "Flatten":
        dims = shapes.dims(node.inputs[0])
        if dims is None:
            return None
        rank = len(dims)
        axis = int(node.attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        position = rank + layout.axis
        joined = dims[axis:position] + dims[position + 1:]  # unknown sizes (None) are not proven 1
        if position < axis or any(d != 1 for d in joined):
            return None
        return Layout(-1, 2)
    return None


class _Shapes:
    """Inferred tensor shapes of a graph, computed once when first asked (ONNX shape inference on an
    export of the graph); unknown when inference fails."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._shapes: dict[str, list] | None = None

    def _all(self) -> dict[str, list]:
        if self._shapes is None:
            self._shapes = {}
            try:
                model = onnx.shape_inference.infer_shapes(gs.export_onnx(self.graph.copy(), do_type_check=False))
            except Exception:  # shapes are only used to prove a Reshape or Flatten harmless
                return self._shapes
            for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
                dims = value.type.tensor_type.shape.dim
                if value.type.tensor_type.HasField("shape"):
                    self._shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        return self._shapes

    def dims(self, tensor: gs.Tensor) -> list | None:
        """The tensor's dimensions (None where unknown, e.g. a symbolic batch), or None if even its
        rank is unknown."""
        if tensor.shape is not None:
            return [d if isinstance(d, int) else None for d in tensor.shape]
        return self._all().get(tensor.name)

    def last_dim(self, tensor: gs.Tensor) -> int | None:
        dims = self.dims(tensor)
        return dims[-1] if dims else None


