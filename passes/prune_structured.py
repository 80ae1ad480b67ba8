"""PruneStructured: remove a share of the hidden units of two-layer blocks, so the weights really shrink.

Math in :mod:`onnxlr.pruning`; this module matches the blocks and edits the graph.

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
taken as channel vectors, i.e. ``H`` moved to (N, *S, C) and reshaped to (N·∏S, C) — what
:class:`onnxlr.statistics.ChannelRows` asks for, and :meth:`PruneStructured.needs` does. With such
statistics the refit replaces each removed channel by its per-pixel least-squares prediction from the
kept ones, in every kernel tap; the recorded error is that per-pixel estimate, and the bias fold is
exact away from zero-padded borders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import linalg, pruning
from onnxlr.errors import OnnxlrError
from onnxlr.graph import add_after, unique_name
from onnxlr.matching import check_names, selected
from onnxlr.passes.mlp_blocks import DENSE_OPS, Block, match_block
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import ChannelRows, Rows, TensorStats

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


def find_blocks(graph: gs.Graph, config: PruneStructuredConfig) -> Iterator[Block | LayerChange]:
    """Every block the config selects, or its skip record. Lazy: each node is matched when reached,
    on the graph as it is then, so a caller may rewrite a block before the next one is matched."""
    for node in list(graph.nodes):
        block = match_block(graph, node)
        if isinstance(block, Block):
            if selected((block.first.name, block.second.name), config.only, config.exclude):
                yield block
        elif block is not None and selected((node.name,), config.only, config.exclude):
            yield LayerChange(node.name, node.op, "skipped", block)


class PruneStructured(Pass):
    """Remove hidden units of MLP and conv blocks (see the module docstring).

    stats : calibration statistics keyed by the hidden tensor name (the second layer's input), for
        conv blocks with channel-vector rows (:class:`onnxlr.statistics.ChannelRows`). Without them,
        weight-norm scores and no refit.
    """

    name = "prune_structured"
    config_class = PruneStructuredConfig

    def needs(self, graph: gs.Graph) -> list:
        """The hidden tensor H of every selected block: rows of length h; for a conv block, the channel
        vectors of its NCHW activation."""
        check_names(graph, self.config.only, self.config.exclude, (*DENSE_OPS, "Conv"))
        found = [b for b in find_blocks(graph, self.config) if isinstance(b, Block)]
        return list(dict.fromkeys((ChannelRows if b.conv else Rows)(b.hidden.name) for b in found))

    def match(self, graph: gs.Graph):
        check_names(graph, self.config.only, self.config.exclude, (*DENSE_OPS, "Conv"))
        # Lazy matching: pruning one block can edit the next (its second layer is the next block's
        # first, its bias may become a new Add), so each is matched after the previous one is pruned.
        return find_blocks(graph, self.config)

    def check(self, graph: gs.Graph, block: Block) -> str:
        h = block.units
        if pruning.kept_count(h, self.config.ratio, self.config.multiple) == h:
            return f"ratio {self.config.ratio} keeps all {h} hidden units"
        return ""

    def skip(self, block: Block, reason: str) -> LayerChange:
        return LayerChange(block.first.name, block.first.op, "skipped", reason, _details(block, self.config))

    def rewrite(self, graph: gs.Graph, block: Block) -> LayerChange:
        return self._prune(graph, block)

    def _prune(self, graph: gs.Graph, block: Block) -> LayerChange:
        details = _details(block, self.config)
        keep_count = details["hidden"][1]
        st = self._hidden_stats(block)
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
        st = self.stats.get(block.hidden.name)
        if st is not None and st.k != block.units:
            kind = " (for a conv, rows must be channel vectors)" if block.conv else ""
            raise OnnxlrError(f"statistics of {block.hidden.name!r} have rows of length {st.k}, "
                              f"expected {block.units}{kind}")
        return st


def _details(block: Block, config: PruneStructuredConfig) -> dict:
    return {"first": block.first.name, "second": block.second.name, "chain": [n.op for n in block.chain],
            "hidden_tensor": block.hidden.name,
            "hidden": [block.units, pruning.kept_count(block.units, config.ratio, config.multiple)]}


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


