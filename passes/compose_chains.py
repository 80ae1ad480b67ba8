"""ComposeLinearChains: rewrite consecutive linear layers as one map at the width its rank needs.

Math in :mod:`onnxlr.chains`; this module finds the chains and edits the graph.

Pattern
-------
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

Rewrite
-------
The chain's affine maps compose to ``y = x W + b`` (``W`` (k, n)); :func:`onnxlr.chains.fit_chain`
picks the cheaper of ``W`` dense and a pair ``A (k, r) · B (r, n)`` at the smallest width ``r`` whose
error stays within ``max_error``: the chain's output error on the calibration data when the chain's
input has statistics with at least ``MIN_ROWS_PER_INPUT`` rows per feature, else the weight error. The dense map is
emitted in the first layer's form (its strides and pads), followed by the chain's layout ops; the
pair as the first layer's form with ``A``, the layout ops (now on width ``r``), and the last layer's
form with ``B`` and the bias. A chain is rewritten only when this saves parameters; the record lists
every chain found, rewritten or not, with its widths before and after and its error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import chains
from onnxlr.chains import AffineMap
from onnxlr.errors import OnnxlrError
from onnxlr.graph import consumer_counts, make_constant, unique_name
from onnxlr.pipeline import LayerChange, PassRecord, config_dict
from onnxlr.runtimes.stats import TensorStats

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
AFFINE_OPS = ("Add", "Sub", "Mul", "Div", "BatchNormalization")
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Identity")


@dataclass
class ComposeChainsConfig:
    """max_error : the largest relative error of a chain's output a reduced width may cost — on the
    calibration data with statistics (the calibrated spectrum of the composed map), of the composed
    weight without. 0 keeps the exact rank (round-off aside)."""

    max_error: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.max_error < 1.0:
            raise OnnxlrError(f"chain max error must be in [0, 1), got {self.max_error}")


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


def stats_tensors(graph: gs.Graph, config: ComposeChainsConfig) -> list[str]:
    """Names of the tensors whose statistics the pass uses: the input of every chain."""
    return sorted({chain.input.name for chain in find_chains(graph)})


class ComposeLinearChains:
    """Compose chains of linear layers (see the module docstring); ``stats``: TensorStats of chain
    inputs by tensor name (rows along the feature axis; channel vectors for a conv's input)."""

    name = "compose_chains"
    stats_tensors = staticmethod(stats_tensors)

    def __init__(self, config: ComposeChainsConfig | None = None, stats: Mapping[str, TensorStats] | None = None):
        self.config = config or ComposeChainsConfig()
        self.stats = dict(stats or {})

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        found = find_chains(graph)
        readers = consumer_counts(graph)
        for chain in found:
            record.layers.append(self._rewrite(graph, chain, readers))
        return record

    def _rewrite(self, graph: gs.Graph, chain: Chain, readers) -> LayerChange:
        composed = chain.composed()
        st = self.stats.get(chain.input.name)
        note = None
        if st is not None and st.k != composed.shape[0]:
            st = None  # rows of another axis than the chain's features: fit data-free
        elif st is not None and st.count < chains.MIN_ROWS_PER_INPUT * st.k:
            note = (f"{st.count} calibration rows for {st.k} inputs: too few to trust their spectrum, the width is "
                    f"the weights' own")
            st = None
        fit = chains.fit_chain(composed, max_error=self.config.max_error,
                               **({} if st is None else {"gram": st.gram, "total": st.sum, "count": st.count}))
        first = chain.linear[0]
        widths = chain.widths()
        # what the rewrite removes: the chain's constants no node outside it reads
        reads = Counter(c.name for s in chain.steps for c in s.constants)
        removed = {c.name: c for s in chain.steps for c in s.constants if readers[c.name] == reads[c.name]}
        params = sum(int(np.prod(c.shape)) for c in removed.values())
        details = {
            "nodes": [s.node.name for s in chain.steps], "ops": [s.node.op for s in chain.steps],
            "widths": widths, "new_widths": [widths[0], widths[-1]] if fit.dense else [widths[0], fit.width, widths[-1]],
            "form": "dense" if fit.dense else "pair", "params": params, "params_after": fit.params,
            "macs_per_row": int(sum(s.map.W.size for s in chain.linear)),
            "macs_per_row_after": int(fit.A.size + (0 if fit.dense else fit.B.size)),
            "calibrated": fit.calibrated,
            "calib_error" if fit.calibrated else "weight_error": float(fit.error),
        }
        if note:
            details["note"] = note
        if fit.params >= params:
            return LayerChange(first.node.name, "chain", "skipped",
                               f"composing saves no parameters ({params:,} -> {fit.params:,} at width {fit.width})",
                               details)
        _emit(graph, chain, fit)
        return LayerChange(first.node.name, "chain", "rewritten", details=details)


# ----------------------------------------------------------------------------------------- finding


def find_chains(graph: gs.Graph) -> list[Chain]:
    """Every maximal chain of two or more linear layers in the top-level graph, in graph order."""
    readers = consumer_counts(graph)
    outputs = {t.name for t in graph.outputs}
    shapes = _Shapes(graph)
    taken: set[int] = set()
    found = []
    for node in graph.nodes:
        if id(node) in taken or node.op not in LINEAR_OPS or not _standard(node):
            continue
        start = _linear_step(node, None, first=True)
        if start is None:
            continue
        step, layout = start
        steps = [step]
        tensor = node.outputs[0]
        while readers[tensor.name] == 1 and tensor.name not in outputs and len(tensor.outputs) == 1:
            nxt = tensor.outputs[0]
            if not _standard(nxt) or (nxt.inputs[0] is not tensor and nxt.op not in ("Add", "Sub", "Mul")):
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


def _standard(node: gs.Node) -> bool:
    return node.domain in ("", "ai.onnx", None)


def _float_constant(tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if np.issubdtype(values.dtype, np.floating) and values.dtype.name != "bfloat16":
            return values
    return None


def _linear_step(node: gs.Node, layout: Layout | None, *, first: bool) -> tuple[Step, Layout] | None:
    """The map of a linear layer reading the chain tensor as ``inputs[0]`` (``layout`` None: a chain
    start, any layout its op accepts), and where its output's features are."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[0], gs.Variable):
        return None
    weight = node.inputs[1]
    values = _float_constant(weight)
    if values is None:
        return None
    if node.op == "MatMul":
        if values.ndim != 2 or (layout is not None and layout.axis != -1):
            return None
        return Step(node, "linear", values.shape[0], AffineMap.linear(values), [weight]), \
            Layout(-1, layout.rank if layout else None)
    bias_input = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    bias = None if bias_input is None else _float_constant(bias_input)
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
        params = [_float_constant(t) for t in node.inputs[1:5]]
        if any(p is None or p.size != width for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return Step(node, "affine", width, AffineMap.elementwise(scale, beta - mean * scale), list(node.inputs[1:5]))
    if len(node.inputs) != 2:
        return None
    first = node.inputs[0] is tensor
    other = node.inputs[1] if first else node.inputs[0]
    c = _float_constant(other)
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


# ---------------------------------------------------------------------------------------- emitting


def _emit(graph: gs.Graph, chain: Chain, fit: chains.ChainFit) -> None:
    """Replace the chain's nodes by the fitted map: the dense op in the first layer's form then the
    layout ops, or the first factor, the layout ops at the new width, and the second factor."""
    first, last = chain.linear[0], chain.linear[-1]
    dtype = np.asarray(first.constants[0].values).dtype
    layouts = [s for s in chain.steps if s.kind == "layout"]
    output = chain.output
    for s in chain.steps:  # detach the old nodes; cleanup drops them and their constants
        s.node.outputs.clear()
        s.node.inputs.clear()
    graph.nodes = [n for n in graph.nodes if n.outputs or n.inputs]
    label = first.node.name or first.node.inputs[0].name
    weight_name = first.constants[0].name
    taken: set[str] = set()
    if fit.dense:
        width = fit.A.shape[1]
        tensor = output if not layouts else gs.Variable(unique_name(graph, f"{label}/chain_out"), dtype=dtype)
        _emit_linear(graph, first, chain.input, fit.A, fit.bias, tensor, f"{label}/chain", weight_name, dtype, taken)
    else:
        width = fit.width
        tensor = gs.Variable(unique_name(graph, f"{label}/chain_hidden"), dtype=dtype)
        _emit_linear(graph, first, chain.input, fit.A, None, tensor, f"{label}/chain_A", f"{weight_name}/chain_A",
                     dtype, taken)
    for i, step in enumerate(layouts):
        end = output if fit.dense and i == len(layouts) - 1 else \
            gs.Variable(unique_name(graph, f"{label}/chain_layout"), dtype=dtype)
        graph.nodes.append(gs.Node(step.node.op, name=unique_name(graph, step.node.name or f"{label}/layout"),
                                   attrs=dict(step.node.attrs), inputs=[tensor, *_layout_inputs(graph, step, width, taken)],
                                   outputs=[end]))
        tensor = end
    if not fit.dense:
        _emit_linear(graph, last, tensor, fit.B, fit.bias, output, f"{label}/chain_B", f"{weight_name}/chain_B",
                     dtype, taken)


def _layout_inputs(graph: gs.Graph, step: Step, width: int, taken: set[str]):
    """The inputs after the data of a re-emitted layout op: a Reshape's explicit feature size becomes
    ``width``."""
    if step.node.op == "Reshape":
        shape = np.asarray(step.extra[0].values).copy()
        if shape[-1] == step.width and width != step.width:
            shape[-1] = width
            return [make_constant(graph, f"{step.extra[0].name}/chain", shape.astype(np.int64), taken)]
    return step.extra


def _emit_linear(graph: gs.Graph, form: Step, x: gs.Tensor, W: np.ndarray, bias: np.ndarray | None,
                 y: gs.Variable, name: str, weight_name: str, dtype, taken: set[str]) -> None:
    """``y = x W + bias`` (W (k, m)) as a node of the kind of ``form`` (a linear step of the chain):
    MatMul (+ Add), Gemm or a 1×1 Conv with its strides and pads."""
    has_bias = bias is not None and np.any(bias != 0)
    op = form.node.op
    if op == "Conv":
        kernel = W.T.reshape(W.shape[1], W.shape[0], *([1] * form.spatial))
        inputs = [x, make_constant(graph, weight_name, kernel.astype(dtype), taken)]
        if has_bias:
            inputs.append(make_constant(graph, f"{weight_name}/bias", bias.astype(dtype), taken))
        graph.nodes.append(gs.Node("Conv", name=unique_name(graph, name), attrs=dict(form.node.attrs), inputs=inputs,
                                   outputs=[y]))
        return
    weight = make_constant(graph, weight_name, W.astype(dtype), taken)
    if op == "Gemm":
        inputs = [x, weight]
        if has_bias or graph.opset < 11:  # C became optional in Gemm-11
            inputs.append(make_constant(graph, f"{weight_name}/bias", (bias if has_bias else np.zeros(1)).astype(dtype),
                                        taken))
        graph.nodes.append(gs.Node("Gemm", name=unique_name(graph, name), inputs=inputs, outputs=[y]))
        return
    if not has_bias:
        graph.nodes.append(gs.Node("MatMul", name=unique_name(graph, name), inputs=[x, weight], outputs=[y]))
        return
    hidden = gs.Variable(unique_name(graph, f"{name}/matmul"), dtype=dtype)
    graph.nodes.append(gs.Node("MatMul", name=unique_name(graph, name), inputs=[x, weight], outputs=[hidden]))
    graph.nodes.append(gs.Node("Add", name=unique_name(graph, f"{name}/bias"),
                               inputs=[hidden, make_constant(graph, f"{weight_name}/bias", bias.astype(dtype), taken)],
                               outputs=[y]))
