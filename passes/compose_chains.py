"""ComposeLinearChains: rewrite consecutive linear layers as one map at the width its rank needs.

Math in :mod:`onnxlr.chains`; this module edits the graph.

Pattern
-------
:mod:`onnxlr.passes.linear_chains`: a linear layer (MatMul, Gemm, 1×1 Conv with a constant weight)
followed, through single-reader tensors, by per-feature affine ops, layout ops and more linear layers.

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
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import chains
from onnxlr.errors import OnnxlrError
from onnxlr.graph import consumer_counts, make_constant, unique_name
from onnxlr.passes.linear_chains import Chain, Step, find_chains
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import ChannelRows, Rows


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
class _Composed:
    """A chain, the map fitted to it, the figures of its record and the parameters the rewrite removes."""

    chain: Chain
    fit: chains.ChainFit
    details: dict
    params: int

    @property
    def node(self) -> gs.Node:
        return self.chain.linear[0].node


class ComposeLinearChains(Pass):
    """Compose chains of linear layers (see the module docstring); ``stats``: TensorStats of chain
    inputs by tensor name (rows along the feature axis; channel vectors for a conv's input)."""

    name = "compose_chains"
    config_class = ComposeChainsConfig

    def needs(self, graph: gs.Graph) -> list:
        """The input of every chain: its channel vectors when the chain starts with a conv."""
        found = {chain.input.name: chain.linear[0].node.op == "Conv" for chain in find_chains(graph)}
        return [(ChannelRows if conv else Rows)(name) for name, conv in sorted(found.items())]

    def match(self, graph: gs.Graph):
        readers = consumer_counts(graph)
        return [self._compose(chain, readers) for chain in find_chains(graph)]

    def check(self, graph: gs.Graph, found: _Composed) -> str:
        if found.fit.params >= found.params:
            return (f"composing saves no parameters ({found.params:,} -> {found.fit.params:,} at width "
                    f"{found.fit.width})")
        return ""

    def skip(self, found: _Composed, reason: str) -> LayerChange:
        return LayerChange(found.node.name, "chain", "skipped", reason, found.details)

    def rewrite(self, graph: gs.Graph, found: _Composed) -> LayerChange:
        _emit(graph, found.chain, found.fit)
        return LayerChange(found.node.name, "chain", "rewritten", details=found.details)

    def _compose(self, chain: Chain, readers) -> _Composed:
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
        return _Composed(chain, fit, details, params)


# ---------------------------------------------------------------------------------------- emitting


def _emit(graph: gs.Graph, chain: Chain, fit: chains.ChainFit) -> None:
    """Replace the chain's nodes by the fitted map: the dense op in the first layer's form then the
    layout ops, or the first factor, the layout ops at the new width, and the second factor."""
    first, last = chain.linear[0], chain.linear[-1]
    dtype = np.asarray(first.constants[0].values).dtype
    layouts = [s for s in chain.steps if s.kind == "layout"]
    output = chain.output
    label = first.node.name or first.node.outputs[0].name  # node names are optional: taken before detaching
    for s in chain.steps:  # detach the old nodes; cleanup drops them and their constants
        s.node.outputs.clear()
        s.node.inputs.clear()
    graph.nodes = [n for n in graph.nodes if n.outputs or n.inputs]
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
