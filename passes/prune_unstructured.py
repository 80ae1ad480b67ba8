"""PruneUnstructured: zero single weights of MatMul/Gemm layers (a share of each column, or N:M).

Math in :mod:`onnxlr.pruning`; this module matches the layers and edits the graph.

Zeroes weights of MatMul/Gemm layers with constant 2-D weights: a share ``sparsity`` of each output
column, or an N:M pattern along the input axis, by magnitude or by Wanda score (needs statistics of
the layer input). Shapes do not change: ONNX Runtime's CPU kernels are dense, so these zeros save
neither bytes nor time there; every record says so.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import linalg, pruning, quantization
from onnxlr.errors import OnnxlrError
from onnxlr.graph import add_low_rank_branch, consumer_counts
from onnxlr.matching import LINEAR_OPS, Layer, check_names, match_layer, selected, standard
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import Rows, TensorStats

NO_SPARSE_KERNELS = ("ONNX Runtime's CPU MatMul/Gemm kernels are dense (no sparse kernels): these zeros are "
                     "stored and multiplied like any other weight, so they save neither bytes nor time on that "
                     "runtime; they only pay off on a runtime with sparse kernels (e.g. 2:4 sparse tensor cores) "
                     "or after a compression step")


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
        if node.op not in LINEAR_OPS or not standard(node) or len(node.inputs) < 2:
            continue
        if not selected((node.name, node.inputs[1].name), config.only, config.exclude):
            continue
        layer = match_layer(node)
        if isinstance(layer, Layer) and readers[layer.weight.name] > 1:
            layer = f"weight {layer.weight.name!r} is shared with other nodes; zeroing it would change them too"
        found.append(layer if isinstance(layer, Layer) else LayerChange(node.name, node.op, "skipped", layer))
    return found


class PruneUnstructured(Pass):
    """Zero single weights of MatMul/Gemm layers (see the module docstring).

    stats : calibration statistics keyed by layer input tensor name (for ``score="wanda"`` and the
        recorded output error).
    """

    name = "prune_unstructured"
    config_class = PruneUnstructuredConfig

    def needs(self, graph: gs.Graph) -> list:
        """The input tensor X of every selected layer (rows of length k)."""
        check_names(graph, self.config.only, self.config.exclude, LINEAR_OPS, weights=True)
        return list(dict.fromkeys(Rows(layer.input.name) for layer in _prunable_layers(graph, self.config)
                                  if isinstance(layer, Layer)))

    def match(self, graph: gs.Graph):
        check_names(graph, self.config.only, self.config.exclude, LINEAR_OPS, weights=True)
        return _prunable_layers(graph, self.config)

    def rewrite(self, graph: gs.Graph, layer: Layer) -> LayerChange:
        return self._prune(graph, layer)

    def _input_stats(self, layer: Layer) -> TensorStats | None:
        node = layer.node
        if node.op == "Gemm" and node.attrs.get("transA", 0):
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
