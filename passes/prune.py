"""PruneStructured and PruneUnstructured: remove hidden units, or zero single weights.

Math in :mod:`onnxlr.pruning`; this module matches the patterns and edits the graph.

PruneStructured
---------------
Removes a share of the hidden units of two-layer blocks, so the weights really shrink:

- dense: ``MatMul(X, W1)`` or ``Gemm`` → elementwise chain → ``MatMul(H, W2)`` or ``Gemm(H, B2)``;
- conv: ``Conv`` (group 1) → elementwise chain (may include ``BatchNormalization``) → ``Conv`` (group 1).

The chain is a small DAG of per-unit ops whose only non-constant input is the first layer's output:
unary activations (Relu, Gelu, Erf, Tanh, …), ``Add/Sub/Mul/Div/Pow/PRelu`` with constant operands
(the bias ``Add`` of a MatMul is one of them), or with two chain tensors — the Erf GELU torch exports,
``x * (Erf(x / √2) + 1) * 0.5``, reads x twice. No op in it mixes units, so removing unit j removes
column j of W1, entry j of every constant indexed by units (biases, per-unit scales, BN parameters)
and row j of W2 (input channel j of the second conv), and nothing else changes for the kept units.

Checks (skipped with the reason when not): every tensor of the block is read only inside the block
and is not a graph output; the units reach exactly one second layer, reading them as its data input;
constants that get sliced (W1, biases, BN parameters) and W2 are read by no other node; convs are not
grouped; Gemm as the second layer has ``transA = 0``.

Scoring: with calibration statistics of H (``stats[H]``), ``pruning.hidden_unit_scores`` on the
*centered* second moments (the means are folded into the bias, so a removed unit only loses its
variation); without, ``||W1[:, j]|| · ||W2[j, :]||`` (times the BN gain ``γ/√(σ²+ε)`` of a conv block).
With statistics, W2 is refitted on the kept units (``refit``) and the removed units' mean output goes
into the second layer's bias (``pruning.refit_second_layer``).

Conv statistics are per channel: ``stats[H]`` must hold the rows of the conv2 input ``H`` (N, C, *S)
taken as channel vectors, i.e. ``H`` moved to (N, *S, C) and reshaped to (N·∏S, C) — ``channel_rows``
does that, e.g. ``collect_unfolded_stats(model, {name: (name, channel_rows)}, batches)``. With such
statistics the refit replaces each removed channel by its per-pixel least-squares prediction from the
kept ones, in every kernel tap; the recorded error is that per-pixel estimate, and the bias fold is
exact away from zero-padded borders.

PruneUnstructured
-----------------
Zeroes weights of MatMul/Gemm layers with constant 2-D weights: a share ``sparsity`` of each output
column, or an N:M pattern along the input axis, by magnitude or by Wanda score (needs statistics of
the layer input). Shapes do not change: ONNX Runtime's CPU kernels are dense, so these zeros save
neither bytes nor time there; every record says so.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Collection, Iterator, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import linalg, pruning, quantization
from onnxlr.errors import OnnxlrError
from onnxlr.graph import add_after, add_low_rank_branch, consumer_counts, unique_name
from onnxlr.passes.factorize_matmul import Layer, match_layer
from onnxlr.pipeline import LayerChange, PassRecord, config_dict
from onnxlr.runtimes.stats import TensorStats

# Ops applied to every unit independently (output unit j depends on input unit j only).
UNARY_OPS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
             "HardSwish", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity",
             "Neg", "Abs", "Exp", "Sqrt", "Clip"}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow"}
DENSE_OPS = ("MatMul", "Gemm")

NO_SPARSE_KERNELS = ("ONNX Runtime's CPU MatMul/Gemm kernels are dense (no sparse kernels): these zeros are "
                     "stored and multiplied like any other weight, so they save neither bytes nor time on that "
                     "runtime; they only pay off on a runtime with sparse kernels (e.g. 2:4 sparse tensor cores) "
                     "or after a compression step")


def _standard(node: gs.Node) -> bool:
    return node.domain in ("", "ai.onnx", None)


def _float_constant(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if np.issubdtype(values.dtype, np.floating):
            return values
    return None


def _selected(names: Collection[str], only: Collection[str] | None, exclude: Collection[str] | None) -> bool:
    if only is not None and not any(name in only for name in names):
        return False
    return not (exclude and any(name in exclude for name in names))


def _check_names(graph: gs.Graph, only, exclude, ops: Collection[str], weights: bool = False) -> None:
    """Every name in ``only``/``exclude`` must be a node of one of ``ops`` (or, with ``weights``, the
    name of such a node's second input)."""
    nodes = [node for node in graph.nodes if node.op in ops]
    known = {node.name for node in nodes}
    if weights:
        known |= {node.inputs[1].name for node in nodes if len(node.inputs) > 1}
    for name in (*(only or ()), *(exclude or ())):
        if name not in known:
            raise OnnxlrError(f"no {'/'.join(ops)} node {'or weight ' if weights else ''}named {name!r}")


def channel_rows(activation: np.ndarray) -> np.ndarray:
    """Rows of an (N, C, *spatial) activation as channel vectors: shape (N·∏spatial, C)."""
    activation = np.asarray(activation)
    return np.moveaxis(activation, 1, -1).reshape(-1, activation.shape[1])


# ----------------------------------------------------------------------------------- structured


@dataclass
class PruneStructuredConfig:
    """ratio : share of the hidden units to remove in each block, in [0, 1).
    multiple : the kept count is rounded up to a multiple of this (never more than the block has).
    refit : with statistics, refit W2 on the kept units (the mean is folded into the bias either way).
    only, exclude : node names (first or second layer of a block) to restrict to / leave alone.
    """

    ratio: float = 0.25
    multiple: int = 8
    refit: bool = True
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise OnnxlrError(f"pruning ratio must be in [0, 1), got {self.ratio}")
        if int(self.multiple) != self.multiple or self.multiple < 1:
            raise OnnxlrError(f"pruning multiple must be a positive integer, got {self.multiple}")
        self.only = None if self.only is None else tuple(self.only)
        self.exclude = None if self.exclude is None else tuple(self.exclude)


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
    if not _standard(node) or node.op not in (*DENSE_OPS, "Conv") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    values = _float_constant(weight)
    if values is None:
        return None if node.op != "Conv" else "first conv weight is not a float constant"
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return f"first conv is grouped (group={node.attrs['group']})"
        constants = [(weight, 0)]
        units = values.shape[0]
        if len(node.inputs) > 2 and node.inputs[2].name:
            if _float_constant(node.inputs[2]) is None:
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
    weight = _float_constant(node.inputs[1]) if len(node.inputs) > 1 else None
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
        if any(_float_constant(p) is None or np.shape(p.values) != (units,) for p in params):
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
    if not _standard(node) or len(node.outputs) != 1:
        return False
    return node.op in UNARY_OPS or node.op in BINARY_OPS or (conv and node.op == "BatchNormalization")


def match_block(graph: gs.Graph, first: gs.Node) -> Block | str | None:
    """The prunable block starting at ``first``, the reason it cannot be pruned, or None when no
    second layer follows ``first`` (then it is no block at all)."""
    found = _first_layer(first)
    if found is None:
        return None
    conv = first.op == "Conv"
    # Walk every tensor downstream of the first layer through per-unit ops until a second layer.
    start = first.outputs[0]
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
            is_second = _standard(reader) and reader.op in (("Conv",) if conv else DENSE_OPS) \
                and reader.inputs[0] is tensor
            if is_second:
                seconds.append((reader, tensor))
            elif _is_chain_op(reader, conv):
                chain.append(reader)
                tensors.append(reader.outputs[0])
                queue.append(reader.outputs[0])
            else:
                problems.append(f"tensor {tensor.name!r} is also read by {reader.op} node {reader.name!r}")
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
    names = {t.name for t in tensors}
    from_end = 1 if not conv else np.ndim(first.inputs[1].values) - 1
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
    # Sliced constants and W2 must be private to the block: slicing a shared one would break its
    # other readers.
    block_nodes = {id(n) for n in (first, *chain, second)}
    for constant in [c for c, _ in unit_constants] + [second.inputs[1]]:
        others = [n for n in constant.outputs if id(n) not in block_nodes]
        if others:
            return f"constant {constant.name!r} is also read by {others[0].op} node {others[0].name!r}"
    return Block(first, chain, second, hidden, tensors, unit_constants, units, unit_scale)


def find_blocks(graph: gs.Graph, config: PruneStructuredConfig) -> Iterator[Block | LayerChange]:
    """Every block the config selects, or its skip record. Lazy: each node is matched when reached,
    on the graph as it is then, so a caller may rewrite a block before the next one is matched."""
    for node in list(graph.nodes):
        block = match_block(graph, node)
        if isinstance(block, Block):
            if _selected((block.first.name, block.second.name), config.only, config.exclude):
                yield block
        elif block is not None and _selected((node.name,), config.only, config.exclude):
            yield LayerChange(node.name, node.op, "skipped", block)


class PruneStructured:
    """Remove hidden units of MLP and conv blocks (see the module docstring).

    stats : calibration statistics keyed by the hidden tensor name (the second layer's input), for
        conv blocks with channel-vector rows (``channel_rows``). Without them, weight-norm scores and
        no refit.
    """

    name = "prune_structured"

    def __init__(self, config: PruneStructuredConfig | None = None,
                 stats: Mapping[str, TensorStats] | None = None):
        self.config = config or PruneStructuredConfig()
        self.stats = stats

    @staticmethod
    def stats_tensors(graph: gs.Graph, config: PruneStructuredConfig) -> list[str]:
        """Tensors whose statistics the pass uses: the hidden tensor H of every selected block (rows of
        length h; for a conv block, NCHW activations whose rows must be channel vectors)."""
        _check_names(graph, config.only, config.exclude, (*DENSE_OPS, "Conv"))
        return list(dict.fromkeys(b.hidden.name for b in find_blocks(graph, config) if isinstance(b, Block)))

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        _check_names(graph, self.config.only, self.config.exclude, (*DENSE_OPS, "Conv"))
        # Lazy matching: pruning one block can edit the next (its second layer is the next block's
        # first, its bias may become a new Add), so each is matched after the previous one is pruned.
        for block in find_blocks(graph, self.config):
            record.layers.append(block if isinstance(block, LayerChange) else self._prune(graph, block))
        return record

    def _prune(self, graph: gs.Graph, block: Block) -> LayerChange:
        h = block.units
        keep_count = pruning.kept_count(h, self.config.ratio, self.config.multiple)
        details = {"first": block.first.name, "second": block.second.name,
                   "chain": [n.op for n in block.chain], "hidden_tensor": block.hidden.name,
                   "hidden": [h, keep_count]}
        st = self._hidden_stats(block)
        if keep_count == h:
            return LayerChange(block.first.name, block.first.op, "skipped",
                               f"ratio {self.config.ratio} keeps all {h} hidden units", details)
        W2 = block.W2()
        if st is not None:
            variances = np.diag(st.centered_gram) / max(st.count, 1)
            scores = pruning.hidden_unit_scores(W2, variances)
            details["score"] = "calibrated output energy"
        else:
            scores = pruning.weight_norm_scores(block.W1(), W2, block.unit_scale)
            details["score"] = "weight norms (no statistics of the hidden tensor)"
        keep = pruning.top_units(scores, keep_count)
        W2_kept, shift = pruning.refit_second_layer(
            W2, keep, st.gram if st is not None and self.config.refit else None,
            None if st is None else st.mean, None if st is None else st.count)
        details["refit"] = st is not None and self.config.refit
        if st is not None:
            W2_after = np.zeros_like(W2)
            W2_after[keep] = W2_kept
            # Centered Gram: the mean error is zero after the bias fold; what is left is the variation.
            details["calib_error"] = linalg.output_error(W2, W2_after, st.centered_gram)

        second_weight = block.second.inputs[1]
        before = sum(np.size(c.values) for c, _ in block.unit_constants) + np.size(second_weight.values)
        for constant, axis in block.unit_constants:
            values = np.asarray(constant.values)
            constant.values = np.ascontiguousarray(np.take(values, keep, axis=axis))
        dtype = np.asarray(second_weight.values).dtype
        second_weight.values = np.ascontiguousarray(block.W2_values(W2_kept).astype(dtype))
        after = sum(np.size(c.values) for c, _ in block.unit_constants) + np.size(second_weight.values)
        if st is not None:
            _shift_bias(graph, block, shift)
        for tensor in block.tensors:
            tensor.shape = None  # the old shapes name h units; ONNX shape inference recomputes them
        details["params_removed"] = int(before - after)
        return LayerChange(block.first.name, block.first.op, "rewritten", "", details)

    def _hidden_stats(self, block: Block) -> TensorStats | None:
        st = None if self.stats is None else self.stats.get(block.hidden.name)
        if st is not None and st.k != block.units:
            kind = " (for a conv, rows must be channel vectors)" if block.conv else ""
            raise OnnxlrError(f"statistics of {block.hidden.name!r} have rows of length {st.k}, "
                              f"expected {block.units}{kind}")
        return st


def _shift_bias(graph: gs.Graph, block: Block, shift: np.ndarray) -> None:
    """Add ``shift`` (from ``refit_second_layer``, one entry per column of ``block.W2()``) to the
    second layer's output."""
    node = block.second
    dtype = np.asarray(node.inputs[1].values).dtype
    if block.conv:
        cout = np.shape(node.inputs[1].values)[0]
        shift = shift.reshape(cout, -1).sum(axis=1)  # every kernel tap adds its share to the channel
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            _write_private(graph, node, 2, np.asarray(node.inputs[2].values) + shift)
        elif len(node.inputs) < 3 or not node.inputs[2].name:
            _set_bias_input(graph, node, shift.astype(dtype))
        else:
            add_after(graph, node, shift.astype(dtype), f"{node.name}/prune")
        return
    if node.op == "Gemm":
        shift = shift * float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        C = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if C is None or isinstance(C, gs.Constant):
            old = 0.0 if C is None or beta == 0.0 else beta * np.asarray(C.values, dtype=np.float64)
            if C is None:
                _set_bias_input(graph, node, shift.astype(dtype))
            else:
                _write_private(graph, node, 2, old + shift)
            node.attrs["beta"] = 1.0
            return
    else:
        out = node.outputs[0]
        readers = out.outputs
        if len(readers) == 1 and readers[0].op == "Add" and out.name not in {t.name for t in graph.outputs}:
            add = readers[0]
            index = 1 if add.inputs[0] is out else 0
            bias = add.inputs[index]
            if isinstance(bias, gs.Constant) and np.shape(bias.values) in ((shift.size,), (1, shift.size)):
                _write_private(graph, add, index, np.asarray(bias.values) + shift)
                return
    add_after(graph, node, shift.astype(dtype), f"{node.name}/prune")


def _set_bias_input(graph: gs.Graph, node: gs.Node, bias: np.ndarray) -> None:
    """Give a Conv or Gemm without a bias the constant ``bias`` as its third input."""
    constant = gs.Constant(unique_name(graph, f"{node.name}/prune_bias"), bias)
    if len(node.inputs) > 2:
        node.inputs[2] = constant  # an empty optional input
    else:
        node.inputs.append(constant)


def _write_private(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    """Set input ``index`` of ``node`` to a constant holding ``values`` (its old dtype): in place when
    only this node reads it, else as a new constant (the other readers keep the old values)."""
    constant = node.inputs[index]
    values = np.ascontiguousarray(np.asarray(values).astype(np.asarray(constant.values).dtype))
    if len(constant.outputs) == 1:
        constant.values = values
    else:
        node.inputs[index] = gs.Constant(unique_name(graph, f"{constant.name}/pruned"), values)


# --------------------------------------------------------------------------------- unstructured


@dataclass
class PruneUnstructuredConfig:
    """sparsity : share of each output column's weights to zero, in [0, 1); or
    pattern : ``"N:M"``, e.g. ``"2:4"``: N kept in every M consecutive inputs (give one of the two).
    score : ``magnitude`` or ``wanda`` (needs statistics of each layer input; layers without them fall
        back to magnitude, and their record says so).
    compensation_rank : add a float rank-r branch fitted to each layer's pruning error in the activation
        eigenspace (EoRA, :func:`onnxlr.quantization.low_rank_compensation`; needs statistics).
    only, exclude : node or weight names to restrict to / leave alone.
    """

    sparsity: float | None = None
    pattern: str | None = None
    score: str = "magnitude"
    compensation_rank: int = 0
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if (self.sparsity is None) == (self.pattern is None):
            raise OnnxlrError("give either a sparsity (e.g. 0.5) or an N:M pattern (e.g. '2:4')")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise OnnxlrError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            match = re.fullmatch(r"(\d+):(\d+)", self.pattern)
            if not match or not 0 < int(match[1]) <= int(match[2]):
                raise OnnxlrError(f"sparsity pattern must be N:M with 0 < N <= M, got {self.pattern!r}")
        if self.compensation_rank < 0:
            raise OnnxlrError(f"compensation rank must be non-negative, got {self.compensation_rank}")
        if self.score not in ("magnitude", "wanda"):
            raise OnnxlrError(f"unknown pruning score {self.score!r} (choose from magnitude, wanda)")
        self.only = None if self.only is None else tuple(self.only)
        self.exclude = None if self.exclude is None else tuple(self.exclude)

    @property
    def n_m(self) -> tuple[int, int] | None:
        return None if self.pattern is None else tuple(int(x) for x in self.pattern.split(":"))


def _prunable_layers(graph: gs.Graph, config: PruneUnstructuredConfig) -> list[Layer | LayerChange]:
    readers: Counter = consumer_counts(graph)
    found = []
    for node in graph.nodes:
        if node.op not in DENSE_OPS or not _standard(node) or len(node.inputs) < 2:
            continue
        if not _selected((node.name, node.inputs[1].name), config.only, config.exclude):
            continue
        layer = match_layer(node)
        if isinstance(layer, Layer) and readers[layer.weight.name] > 1:
            layer = f"weight {layer.weight.name!r} is shared with other nodes; zeroing it would change them too"
        found.append(layer if isinstance(layer, Layer) else LayerChange(node.name, node.op, "skipped", layer))
    return found


class PruneUnstructured:
    """Zero single weights of MatMul/Gemm layers (see the module docstring).

    stats : calibration statistics keyed by layer input tensor name (for ``score="wanda"`` and the
        recorded output error).
    """

    name = "prune_unstructured"

    def __init__(self, config: PruneUnstructuredConfig, stats: Mapping[str, TensorStats] | None = None):
        self.config = config
        self.stats = stats

    @staticmethod
    def stats_tensors(graph: gs.Graph, config: PruneUnstructuredConfig) -> list[str]:
        """The input tensor X of every selected layer (rows of length k)."""
        _check_names(graph, config.only, config.exclude, DENSE_OPS, weights=True)
        return list(dict.fromkeys(layer.node.inputs[0].name for layer in _prunable_layers(graph, config)
                                  if isinstance(layer, Layer)))

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        _check_names(graph, self.config.only, self.config.exclude, DENSE_OPS, weights=True)
        for layer in _prunable_layers(graph, self.config):
            record.layers.append(layer if isinstance(layer, LayerChange) else self._prune(graph, layer))
        return record

    def _input_stats(self, layer: Layer) -> TensorStats | None:
        node = layer.node
        if self.stats is None or (node.op == "Gemm" and node.attrs.get("transA", 0)):
            return None  # with transA the rows of the input are not the layer's input vectors
        st = self.stats.get(node.inputs[0].name)
        if st is not None and st.k != layer.W.shape[0]:
            raise OnnxlrError(f"statistics of {node.inputs[0].name!r} have rows of length {st.k}, "
                              f"expected {layer.W.shape[0]}")
        return st

    def _prune(self, graph: gs.Graph, layer: Layer) -> LayerChange:
        W = np.asarray(layer.W)
        k, n = W.shape
        st = self._input_stats(layer)
        details = {"weight": layer.weight.name, "shape": [k, n], "note": NO_SPARSE_KERNELS}
        if self.config.score == "wanda" and st is not None:
            scores = pruning.wanda_scores(W, np.diag(st.gram))
            details["score"] = "wanda"
        else:
            scores = pruning.magnitude_scores(W)
            details["score"] = "magnitude" if self.config.score == "magnitude" else \
                "magnitude (wanda needs statistics of the layer input; none for this layer)"
        n_m = self.config.n_m
        if n_m is not None:
            if k % n_m[1]:
                return LayerChange(layer.node.name, layer.node.op, "skipped",
                                   f"{self.config.pattern} sparsity needs the input size {k} divisible by {n_m[1]}",
                                   details)
            keep = pruning.nm_mask(scores, *n_m)
        else:
            keep = pruning.unstructured_mask(scores, self.config.sparsity)
        pruned = np.where(keep, W, 0).astype(W.dtype)
        layer.weight.values = np.ascontiguousarray(pruned.T if layer.transposed else pruned)
        details.update(nonzeros=[int(np.count_nonzero(W)), int(np.count_nonzero(pruned))],
                       sparsity=round(1.0 - float(keep.mean()), 4))
        if st is not None:
            details["calib_error"] = linalg.output_error(W, pruned, st.gram)
            rank = min(self.config.compensation_rank, k, n)
            if rank:
                A, B = quantization.low_rank_compensation(W, pruned, st.gram, rank)
                details["compensation_rank"] = rank
                details["calib_error_compensated"] = linalg.output_error(W, pruned + A @ B, st.gram)
                add_low_rank_branch(graph, layer.node.outputs[0], layer.node.inputs[0], A, B, layer.node.name)
        return LayerChange(layer.node.name, layer.node.op, "rewritten", "", details)
