"""Matchers every pass shares: the layers that compute with a constant weight, and why a node is not one.

- :class:`Layer`: ``MatMul(X, W)`` or ``Gemm(X, B, C)`` with a 2-D float constant weight; ``W`` is the
  logical ``(k, n)`` weight (``Bᵀ`` under ``transB``). :func:`find_layers` lists them with the nodes of
  those ops that are not, each with the reason.
- :class:`ConvLayer`: ``Conv`` with a constant float kernel ``(Cout, Cin, *k)`` and ``group = 1``
  (:func:`find_convs`).
- :class:`Table`: ``Gather`` on a constant 2-D float table along axis 0, an embedding
  (:func:`find_tables`).

A weight is *shared* when several nodes read it. A layer whose weight is also read by a node that does
not compute with it as a weight (or by a node inside an If/Loop/Scan subgraph) is skipped: rewriting the
weight would keep the dense copy for that reader. Nodes inside subgraphs are reported, never matched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Collection

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.graph import consumer_counts, in_subgraph_reason, subgraph_nodes, subgraphs
from onnxlr.pipeline import LayerChange

LINEAR_OPS = ("MatMul", "Gemm")
CONV_OPS = ("Conv", "ConvTranspose")
# float16 weights are rewritten in float64 math and stored as float16 again; bfloat16 has no native
# NumPy type onnx-graphsurgeon can export new tensors in.
BFLOAT16_REASON = "weight dtype bfloat16 is not factorized (no NumPy bfloat16 to store the factors in)"


def standard(node: gs.Node) -> bool:
    """Whether ``node`` is an operator of the default ONNX domain."""
    return node.domain in ("", "ai.onnx", None)


def float_constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of ``tensor`` if it is a float constant NumPy can compute with (not bfloat16), else None."""
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if np.issubdtype(values.dtype, np.floating) and values.dtype.name != "bfloat16":
            return values
    return None


def readers(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    """Tensor name -> the top-level nodes reading it."""
    found: dict[str, list[gs.Node]] = defaultdict(list)
    for node in graph.nodes:
        for tensor in node.inputs:
            found[tensor.name].append(node)
    return found


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, None when absent or given as the empty name."""
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


# ------------------------------------------------------------------------------------ X @ W layers


@dataclass
class Layer:
    """A MatMul/Gemm node computing with a constant weight; ``W`` is the logical (k, n) weight;
    ``graph`` the graph or subgraph holding the node (where a rewrite adds its nodes)."""

    node: gs.Node
    weight: gs.Constant
    W: np.ndarray
    graph: gs.Graph | None = None

    @property
    def transposed(self) -> bool:
        """The weight is stored as ``Wᵀ`` (Gemm with ``transB``)."""
        return self.node.op == "Gemm" and bool(self.node.attrs.get("transB", 0))

    @property
    def key(self) -> tuple[str, bool]:
        """Layers with the same key compute with the same (k, n) weight, and share its rewrite."""
        return self.weight.name, self.transposed

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def label(self) -> str:
        """A name for what the rewrite adds: the node's name, else its weight's (names are optional)."""
        return self.node.name or self.weight.name


def match_layer(node: gs.Node) -> Layer | str:
    """The layer behind a MatMul/Gemm ``node``, or the reason it is not one."""
    weight = optional_input(node, 1)
    if not isinstance(weight, gs.Constant):
        if isinstance(node.inputs[0], gs.Constant):
            return "the constant weight is the first operand (W @ X); only X @ W is factorized"
        return "weight is not a constant (a graph input or computed tensor)"
    values = np.asarray(weight.values)
    if values.ndim != 2:
        return f"weight is {values.ndim}-D with shape {list(values.shape)}; only 2-D weights are factorized"
    if values.dtype.name == "bfloat16":
        return BFLOAT16_REASON
    if not np.issubdtype(values.dtype, np.floating):
        return f"weight dtype {values.dtype} is not floating point"
    layer = Layer(node=node, weight=weight, W=values)
    if layer.transposed:
        layer.W = values.T
    return layer


def _reads_as_weight(node: gs.Node, weight: gs.Constant) -> bool:
    return (node.op in LINEAR_OPS and len(node.inputs) > 1 and node.inputs[1] is weight
            and node.inputs[0] is not weight)


def find_layers(graph: gs.Graph, *, nested: bool = False) -> tuple[list[Layer], list[LayerChange]]:
    """Every MatMul/Gemm node of the graph, split into layers and skips (``LayerChange``) with reasons.
    ``nested``: also the nodes of If/Loop/Scan subgraphs (else they are among the skips). A weight
    shared by several layers is fine (they are rewritten alike); one also read otherwise is not."""
    def shared(layer: Layer, scope: set[int]) -> str:
        others = [r for r in layer.weight.outputs if not _reads_as_weight(r, layer.weight) or id(r) not in scope]
        if not others:
            return ""
        where = " inside a subgraph" if id(others[0]) not in scope and _reads_as_weight(others[0], layer.weight) else ""
        return (f"weight {layer.weight.name!r} is also read by {others[0].op} node {others[0].name!r}{where}; "
                "rewriting it would keep the dense copy")

    return _find(graph, LINEAR_OPS, match_layer, shared, nested)


def _find(graph: gs.Graph, ops: Collection[str], match, shared, nested: bool) -> tuple[list, list[LayerChange]]:
    """Nodes of ``ops`` matched by ``match(node) -> layer | reason``; a layer for which ``shared(layer,
    ids of the nodes looked at)`` gives a reason is skipped (its weight's readers, ``weight.outputs``,
    span every scope)."""
    graphs = list(subgraphs(graph)) if nested else [graph]
    scope = {id(node) for g in graphs for node in g.nodes}
    layers, skipped = [], []
    for g in graphs:
        for node in g.nodes:
            if node.op not in ops or not standard(node):
                continue
            found = match(node)
            if not isinstance(found, str):
                found.graph = g
                found = shared(found, scope) or found
            if isinstance(found, str):
                skipped.append(LayerChange(node.name, node.op, "skipped", found))
            else:
                layers.append(found)
    if not nested:
        skipped.extend(LayerChange(node.name, node.op, "skipped", in_subgraph_reason(node, owner))
                       for node, owner in subgraph_nodes(graph) if node.op in ops)
    return layers, skipped


# ------------------------------------------------------------------------------------------- convs


@dataclass
class ConvLayer:
    """A Conv node with a constant float weight (Cout, Cin, *kernel) and group 1, in ``graph``."""

    node: gs.Node
    weight: gs.Constant
    W: np.ndarray
    graph: gs.Graph | None = None

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.W.shape[2:])

    @property
    def bias(self) -> gs.Tensor | None:
        return optional_input(self.node, 2)

    def geometry(self) -> dict:
        """Strides, pads, dilations and auto_pad with ONNX's defaults filled in."""
        d = len(self.kernel)
        attrs = self.node.attrs
        return {
            "strides": list(attrs.get("strides", [1] * d)),
            "pads": list(attrs.get("pads", [0] * (2 * d))),
            "dilations": list(attrs.get("dilations", [1] * d)),
            "auto_pad": attrs.get("auto_pad", "NOTSET"),
        }


def match_conv(node: gs.Node) -> ConvLayer | str:
    """The factorizable conv behind ``node``, or the reason it is not."""
    if node.op == "ConvTranspose":
        return "ConvTranspose is not factorized"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight is not a constant"
    W = np.asarray(node.inputs[1].values)
    if W.dtype.name == "bfloat16":
        return BFLOAT16_REASON
    if not np.issubdtype(W.dtype, np.floating):
        return f"weight dtype {W.dtype} is not floating point"
    if W.ndim not in (3, 4):
        return f"{W.ndim - 2}-D convolution; only 1-D and 2-D are factorized"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        if W.shape[1] == 1:
            return "depthwise conv: already as thin as it gets, never factorized"
        return f"grouped conv (group={group}) is not factorized"
    bias = optional_input(node, 2)
    if bias is not None and not isinstance(bias, gs.Constant):
        return "bias is not a constant"
    return ConvLayer(node, node.inputs[1], W)


def find_convs(graph: gs.Graph, *, nested: bool = False) -> tuple[list[ConvLayer], list[LayerChange]]:
    """Conv/ConvTranspose nodes split into factorizable layers and skips with reasons (``nested``: those
    of subgraphs too). A weight read by anything but this one conv is skipped too (factorizing would keep
    the dense copy)."""
    def shared(layer: ConvLayer, scope: set[int]) -> str:
        return f"weight {layer.weight.name!r} is shared with another node" if len(layer.weight.outputs) > 1 else ""

    return _find(graph, CONV_OPS, match_conv, shared, nested)


# -------------------------------------------------------------------------------- embedding tables


@dataclass
class Table:
    """A Gather of rows of a constant 2-D float table (an embedding)."""

    node: gs.Node
    table: gs.Constant

    @property
    def indices(self) -> gs.Tensor:
        return self.node.inputs[1]


def find_tables(graph: gs.Graph) -> tuple[list[Table], list[LayerChange]]:
    """Gather nodes on constant 2-D float tables, and skips with reasons (shape tables and index
    constants are no embeddings and not listed)."""
    counts = consumer_counts(graph)
    tables, skipped = [], []
    for node in graph.nodes:
        if node.op != "Gather" or not standard(node) or not isinstance(node.inputs[0], gs.Constant):
            continue
        values = np.asarray(node.inputs[0].values)
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
            continue
        reason = ""
        if int(node.attrs.get("axis", 0)) != 0:
            reason = "gathers along axis 1 (columns), not rows"
        elif counts[node.inputs[0].name] > 1:
            reason = f"table {node.inputs[0].name!r} is also read by another node (tied weights)"
        if reason:
            skipped.append(LayerChange(node.name, node.op, "skipped", reason))
        else:
            tables.append(Table(node, node.inputs[0]))
    return tables, skipped


# ------------------------------------------------------------------------------- selecting by name


def selected(names: Collection[str], only: Collection[str] | None, exclude: Collection[str] | None) -> bool:
    """Whether a candidate known by ``names`` (its node, its weight…) passes an ``only``/``exclude`` filter."""
    if only is not None and not any(name in only for name in names):
        return False
    return not (exclude and any(name in exclude for name in names))


def check_names(graph: gs.Graph, only, exclude, ops: Collection[str], weights: bool = False) -> None:
    """Every name in ``only``/``exclude`` must be a node of one of ``ops`` (or, with ``weights``, the
    name of such a node's second input); OnnxlrError otherwise."""
    nodes = [node for node in graph.nodes if node.op in ops]
    known = {node.name for node in nodes}
    if weights:
        known |= {node.inputs[1].name for node in nodes if len(node.inputs) > 1}
    for name in (*(only or ()), *(exclude or ())):
        if name not in known:
            raise OnnxlrError(f"no {'/'.join(ops)} node {'or weight ' if weights else ''}named {name!r}")
