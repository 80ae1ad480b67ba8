"""FactorizeMatMul: replace a MatMul or Gemm by two thinner ones through a truncated SVD.

A layer ``Y = X @ W`` with a constant weight ``W`` of shape ``(k, n)`` is rewritten as
``Y = (X @ A) @ B`` with ``A`` of shape ``(k, r)`` and ``B`` of shape ``(r, n)``: parameters and
multiply-adds per row go from ``k*n`` to ``r*(k+n)``, so a rank at or above ``k*n/(k+n)`` saves nothing
and is skipped unless forced. How ``A`` and ``B`` are fitted (plain, whitened, Fisher-weighted… SVD) is
:mod:`onnxlr.factorization`; this module matches layers, applies the rank rule and edits the graph.

For ``Gemm(A_in, B, C; alpha, beta, transA, transB) = alpha * op(A_in) @ op(B) + beta * C`` the weight is
``W = op(B)`` (``B^T`` when ``transB=1``) and the rewrite is::

    H = Gemm(A_in, A; alpha, transA)          # alpha * op(A_in) @ A
    Y = Gemm(H, B, C; beta)                   # H @ B + beta * C

which equals the original exactly at full rank.

Rank rule (one per layer): a per-layer rank (``ranks``, by node or weight name; 0 keeps the layer dense),
else ``rank_ratio`` or ``energy`` of the method's spectrum. Budgets over the whole model are planned
before the pass (:mod:`onnxlr.planning.rank_search`) and arrive as per-layer ranks.

Pattern and checks: :func:`onnxlr.matching.find_layers`. Rewrite: the original node becomes the second
factor (it keeps its name and output); a new node ``<node>/lr_A`` computes the first. Factors are named
``<weight>/lr_A`` and ``<weight>/lr_B``; a weight shared by several nodes is factorized once and its
factors are shared too. The mean output error of a data-aware fit goes into the bias: Gemm's C, the
constant bias Add that follows a MatMul, or a new Add.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import linalg
from onnxlr.errors import OnnxlrError
from onnxlr.executors import SerialExecutor
from onnxlr.factorization import DATA_AWARE, METHODS, Decomposer, FitSettings, fit_weight, method_used
from onnxlr.graph import add_after, make_constant, unique_name
from onnxlr.matching import Layer, find_layers
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict
from onnxlr.statistics import CrossStats, Rows, TensorStats

__all__ = ["FactorizeMatMul", "FactorizeMatMulConfig", "METHODS", "DATA_AWARE"]


@dataclass
class FactorizeMatMulConfig:
    """How each layer is fitted and its rank chosen.

    method : ``svd`` (data-free) or a data-aware method (:data:`onnxlr.factorization.DATA_AWARE`).
    rank_ratio : keep ``ceil(rank_ratio * min(k, n))`` singular values of a ``(k, n)`` weight.
    energy : keep the smallest rank whose share of the squared spectrum is at least ``energy``
        (for ``whitened``/``isvt`` the calibrated spectrum, i.e. of the output X W).
    ranks : per-layer ranks keyed by node name or weight name; they take precedence; 0 keeps the
        layer dense.
    force : rewrite even when the rank would not save parameters (used to test exactness).
    refit, bias_correction : data-aware methods: refit B to the layer's true output after truncation;
        fold the mean output error into the bias.
    svd_solver : ``auto`` (a randomized SVD where only one small rank of a large weight is needed,
        the exact one otherwise: :func:`onnxlr.linalg.svd_solver`), ``exact`` or ``randomized``.
    """

    method: str = "svd"
    rank_ratio: float | None = None
    energy: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    force: bool = False
    refit: bool = True
    bias_correction: bool = True
    svd_solver: str = "auto"

    def __post_init__(self):
        self.settings  # validates method and solver
        if self.rank_ratio is not None and self.energy is not None:
            raise OnnxlrError("give one of a rank ratio or an energy share")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise OnnxlrError(f"rank ratio must be in (0, 1], got {self.rank_ratio}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OnnxlrError(f"energy must be in (0, 1], got {self.energy}")
        for name, rank in self.ranks.items():
            if int(rank) != rank or rank < 0:
                raise OnnxlrError(f"rank for layer {name!r} must be a non-negative integer (0 keeps it dense), "
                                  f"got {rank}")

    @property
    def settings(self) -> FitSettings:
        return FitSettings(self.method, self.refit, self.bias_correction, self.svd_solver)

    def given_rank(self, layer: Layer) -> int | None:
        """The per-layer rank the user gave for this layer (by node or weight name), if any."""
        for key in (layer.node.name, layer.weight.name):
            if key in self.ranks:
                return int(self.ranks[key])
        return None


@dataclass
class _Planned:
    """A layer to rewrite at ``rank``, with the figures of its record."""

    layer: Layer
    rank: int
    details: dict


class FactorizeMatMul(Pass):
    """Low-rank factorization of MatMul/Gemm layers with constant weights.

    stats : calibration statistics keyed by input tensor name (required by data-aware methods).
    sensitivity : per layer-output tensor name, each output unit's measured effect on the model
        output (n,) (``runtimes.sensitivity``); required by ``fisher``.
    cross : instead of ``stats``, paired statistics of each layer input in the original model and in
        the model being compressed (sequential compression, :mod:`onnxlr.planning.sequential`): each
        layer is then fitted to reproduce the ORIGINAL output from its drifted input.
    only : rewrite only the layers whose (weight name, transposed) key is in this set; the others
        are neither rewritten nor reported.
    cache : a dict shared by several instances working on the same model and statistics (e.g. to try
        several rank allocations): eigen-decompositions and SVDs are then computed once.
    executor : where the per-weight fits run when each layer's rank is known before its SVD (a rank
        ratio or per-layer ranks): :mod:`onnxlr.executors` (default: in this process, one by one).
        Each fit reads its weight, factorizes it and returns the factors, so only the weights being
        fitted are in memory at once.
    """

    name = "factorize_matmul"
    config_class = FactorizeMatMulConfig

    def __init__(self, config: FactorizeMatMulConfig | None = None,
                 stats: Mapping[str, TensorStats] | None = None,
                 sensitivity: Mapping[str, np.ndarray] | None = None, *,
                 cross: Mapping[str, CrossStats] | None = None,
                 only: Collection[tuple[str, bool]] | None = None, cache: dict | None = None,
                 executor=None):
        super().__init__(config)
        if stats is not None and cross is not None:
            raise ValueError("give either stats or cross statistics, not both")
        stats = cross if cross is not None else stats
        if self.config.method in DATA_AWARE and stats is None:
            raise OnnxlrError(f"method {self.config.method!r} needs calibration data (--calib)")
        if self.config.method == "fisher" and sensitivity is None:
            raise OnnxlrError("method 'fisher' needs output sensitivities (from calibration data)")
        self.stats = stats
        self.sensitivity = sensitivity or {}
        self.only = None if only is None else set(only)
        # Energy rules read whole spectra first; a shared cache keeps decompositions for later
        # allocations: both keep one exact decomposition per weight. A rank ratio or given ranks fix
        # every rank before any SVD: each weight is then fitted on its own (on the executor).
        self.spectra_first = self.config.energy is not None or cache is not None
        self.decomposer = Decomposer(self.config.settings, cache)
        self.executor = executor or SerialExecutor()

    def needs(self, graph: gs.Graph) -> list:
        return sorted({Rows(layer.input.name) for layer in find_layers(graph, nested=True)[0]}, key=lambda r: r.tensor)

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        layers, skipped = find_layers(graph, nested=True)
        if self.only is None:
            record.layers.extend(skipped)
            check_rank_names(self.config, layers)
        else:
            layers = [layer for layer in layers if layer.key in self.only]
        decompositions = self.decomposer.decompositions(layers, self.stats, self.sensitivity) \
            if self.spectra_first else {}
        weight_stats = self.decomposer.weight_stats(layers, self.stats)
        planned = []
        for layer in layers:
            found = self._plan(layers, layer, decompositions, weight_stats)
            (planned if isinstance(found, _Planned) else record.layers).append(found)
        fits = self._fits(layers, planned, decompositions, weight_stats)
        if not self.spectra_first:
            record.config["executor"] = self.executor.describe()
        record.layers.extend(self._rewrite_all(graph, planned, fits))
        return record

    def _plan(self, layers: list[Layer], layer: Layer, decompositions: Mapping, weight_stats: Mapping
              ) -> _Planned | LayerChange:
        """The rank of ``layer`` under the rule, or the record of why it stays as it is."""
        k, n = layer.W.shape
        if self.spectra_first:
            st, sensitivity = decompositions[layer.key].stats, decompositions[layer.key].sensitivity
        else:
            st = weight_stats.get(layer.key)
            sensitivity = self.decomposer.weight_sensitivity(layers, self.sensitivity, layer.key)
        rank = self.config.given_rank(layer)
        if rank is None:
            spectrum = decompositions[layer.key].svd.spectrum if self.spectra_first else None
            rank = linalg.rank_from_rule(k, n, spectrum, rank_ratio=self.config.rank_ratio, energy=self.config.energy)
        if rank == 0:
            return kept_dense(layer)
        details = {"weight": layer.weight.name, "shape": [k, n], "params": k * n,
                   "break_even_rank": round(linalg.break_even_rank(k, n), 1),
                   "method": method_used(self.config.method, st, sensitivity)}
        if rank is None:
            return LayerChange(layer.node.name, layer.node.op, "skipped", "no rank rule or override for this layer",
                               details)
        if rank > min(k, n):
            raise OnnxlrError(f"rank {rank} for layer {layer.node.name!r} exceeds min(k, n) = {min(k, n)}")
        details["rank"] = rank
        if not linalg.saves_parameters(k, n, rank) and not self.config.force:
            return LayerChange(layer.node.name, layer.node.op, "skipped",
                               f"rank {rank} >= break-even rank {k * n / (k + n):.1f}: would not save parameters",
                               details)
        return _Planned(layer, rank, details)

    def _fits(self, layers: list[Layer], planned: list[_Planned], decompositions: Mapping, weight_stats: Mapping):
        """``(weight key, rank) -> WeightFit`` for every planned layer, one fit per weight and rank,
        yielded as they arrive (from the executor when no decomposition was computed first)."""
        first: dict[tuple[str, bool], Layer] = {}  # the layer each weight's factors are made for
        for p in planned:
            first.setdefault(p.layer.key, p.layer)
        wanted = list(dict.fromkeys((p.layer.key, p.rank) for p in planned))
        if self.spectra_first:
            return ((key, self.decomposer.fit(first[key[0]].W, key[1], decompositions[key[0]],
                                              weight_stats.get(key[0]))) for key in wanted)
        jobs = [self.decomposer.job(first[key].W, weight_stats.get(key), rank,
                                    self.decomposer.weight_sensitivity(layers, self.sensitivity, key))
                for key, rank in wanted]
        return zip(wanted, self.executor.imap(fit_weight, jobs, shared=self.decomposer))

    def _rewrite_all(self, graph: gs.Graph, planned: list[_Planned], fits) -> list[LayerChange]:
        # Each fit becomes graph constants as it arrives (spilled to disk for a mapped model), so the
        # float64 factors of only one weight are in memory at a time.
        made: dict = {}
        names: set[str] = set()  # of the factors made, not yet in the graph
        first = {p.layer.key: p.layer for p in reversed(planned)}
        for key, fit in fits:
            layer = first[key[0]]
            dtype = layer.W.dtype
            constants = (make_constant(graph, f"{layer.weight.name}/lr_A", fit.A.astype(dtype), names),
                         make_constant(graph, f"{layer.weight.name}/lr_B", fit.B.astype(dtype), names))
            made[key] = (constants, dataclasses.replace(fit, A=None, B=None))
        changes = []
        for p in planned:
            constants, fit = made[(p.layer.key, p.rank)]
            _rewrite(graph, p.layer, *constants)
            if fit.delta is not None:
                _add_bias(graph, p.layer, fit.delta.astype(p.layer.W.dtype))
            k, n = p.layer.W.shape
            p.details.update(energy_kept=fit.energy_kept, svd_solver=fit.solver, params_after=p.rank * (k + n),
                             **fit.errors)
            changes.append(LayerChange(p.layer.node.name, p.layer.node.op, "rewritten", "", p.details))
        return changes


def kept_dense(layer: Layer) -> LayerChange:
    """The record of a layer the rank allocation leaves dense."""
    k, n = layer.W.shape
    return LayerChange(layer.node.name, layer.node.op, "skipped", "kept dense by the rank allocation (rank 0)",
                       {"weight": layer.weight.name, "shape": [k, n], "params": k * n})


def check_rank_names(config: FactorizeMatMulConfig, layers: list[Layer]) -> None:
    """Every per-layer rank must name a factorizable layer (node) or weight."""
    known = {layer.node.name for layer in layers} | {layer.weight.name for layer in layers}
    unknown = sorted(set(config.ranks) - known)
    if unknown:
        raise OnnxlrError(f"no factorizable MatMul/Gemm layer or weight named {unknown[0]!r}")


def _rewrite(graph: gs.Graph, layer: Layer, A: gs.Constant, B: gs.Constant) -> None:
    node = layer.node
    label = layer.label
    hidden = gs.Variable(unique_name(graph, f"{label}/lr_hidden"), dtype=layer.W.dtype)
    first = gs.Node(node.op, name=unique_name(graph, f"{label}/lr_A"), inputs=[node.inputs[0], A], outputs=[hidden])
    if node.op == "Gemm":
        first.attrs = {"alpha": float(node.attrs.get("alpha", 1.0)), "transA": int(node.attrs.get("transA", 0))}
        if graph.opset < 11:  # C became optional in Gemm-11; before, the first factor needs a zero one
            first.inputs.append(gs.Constant(unique_name(graph, f"{label}/lr_zero"), np.zeros(1, layer.W.dtype)))
        node.attrs = {"beta": float(node.attrs.get("beta", 1.0))}
    node.inputs[0] = hidden
    node.inputs[1] = B
    layer.graph.nodes.append(first)


def _add_bias(graph: gs.Graph, layer: Layer, delta: np.ndarray) -> None:
    """Add ``delta`` (n,) to the layer's output: into a constant bias only this layer reads, else
    through a new Add node."""
    node = layer.node
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        C = node.inputs[2] if len(node.inputs) > 2 else None
        if C is None:
            node.inputs.append(gs.Constant(unique_name(graph, f"{layer.label}/lr_bias"), delta))
            node.attrs["beta"] = 1.0
            return
        if isinstance(C, gs.Constant) and len(C.outputs) == 1 and beta != 0.0:
            C.values = (np.asarray(C.values) + delta / beta).astype(delta.dtype)
            return
    else:
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add" and out not in graph.outputs:
            add = out.outputs[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if isinstance(other, gs.Constant) and len(other.outputs) == 1 and \
                    np.asarray(other.values).shape in ((delta.size,), (1, delta.size)):
                other.values = (np.asarray(other.values) + delta).astype(delta.dtype)
                return
    # General case: y = layer(x) + delta through a new Add after the layer.
    add_after(graph, node, delta, f"{layer.label}/lr", owner=layer.graph)
