"""FactorizeMatMul: replace a MatMul or Gemm by two thinner ones through a truncated SVD.

Math
----
A layer ``Y = X @ W`` with a constant weight ``W`` of shape ``(k, n)`` is rewritten as
``Y = (X @ A) @ B`` with ``A = U_r sqrt(S_r)`` of shape ``(k, r)`` and ``B = sqrt(S_r) V_r^T`` of shape
``(r, n)``, the best rank-r approximation of ``W`` (Eckart–Young). Parameters and multiply-adds per row
go from ``k*n`` to ``r*(k+n)``, so a rank at or above ``k*n/(k+n)`` saves nothing and is skipped unless
forced.

For ``Gemm(A_in, B, C; alpha, beta, transA, transB) = alpha * op(A_in) @ op(B) + beta * C`` the weight is
``W = op(B)`` (``B^T`` when ``transB=1``) and the rewrite is::

    H = Gemm(A_in, A; alpha, transA)          # alpha * op(A_in) @ A
    Y = Gemm(H, B, C; beta)                   # H @ B + beta * C

which equals the original exactly at full rank.

Data-aware methods (``method``; need calibration statistics of the layer input X: the Gram
``G = X^T X``, mean and mean magnitude, from :mod:`onnxlr.runtimes.stats`):

- ``svd``: plain truncated SVD of W (data-free).
- ``whitened``: minimises the output error ``||X (W - A B)||_F`` in closed form (SVD-LLM); with the
  centered Gram and the bias correction below it is the optimal affine rank-r map.
- ``fisher``: whitened, with each output unit weighted by the square root of its measured effect on
  the model output (a diagonal Fisher / output-divergence metric, FWSVD and Shumaylov et al.):
  minimises ``||X (W - A B) D||_F``, so the rank is spent where the model output notices it.
- ``asvd``: SVD of ``diag(mean|x|^0.5) W`` (ASVD), then refit.
- ``isvt``: iterative singular-value thresholding on the calibrated objective (Shumaylov et al.).

After a data-aware factorization, ``B`` is refitted in closed form to the layer's true output
(``refit``) and the mean output error ``mean(x) (W - A B)`` is folded into the bias
(``bias_correction``): into Gemm's C or the constant bias Add that follows a MatMul, or a new Add.

Pattern: ``MatMul(X, W)`` with ``W`` a 2-D float constant; ``Gemm`` with a 2-D float constant ``B``.
Check (reasons when not): the weight is not constant (an initializer also listed as a graph input is
overridable, so not constant: :func:`onnxlr.graph.import_graph`), is the first operand, is not 2-D or
not float (float16 is factorized in float64 math and stored as float16; bfloat16 is skipped), is also
read by an op this pass does not rewrite or inside an If/Loop/Scan subgraph, or the chosen rank would
not save parameters. MatMul/Gemm nodes inside subgraphs are reported, not rewritten.
Rewrite: the original node becomes the second factor (it keeps its name and output); a new node
``<node>/lr_A`` computes the first. Factors are named ``<weight>/lr_A`` and ``<weight>/lr_B``; a weight
shared by several nodes is factorized once and its factors are shared too.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxlr import linalg
from onnxlr.allocation import allocate_ranks
from onnxlr.errors import OnnxlrError
from onnxlr.executors import SerialExecutor
from onnxlr.graph import (add_after, consumer_counts, in_subgraph_reason, make_constant, read_in_subgraph_reason,
                          release_pages, subgraph_nodes, subgraph_readers, unique_name)
from onnxlr.pipeline import LayerChange, PassRecord, config_dict
from onnxlr.runtimes.stats import CrossStats, TensorStats

FACTORIZABLE_OPS = ("MatMul", "Gemm")
METHODS = ("svd", "whitened", "fisher", "asvd", "isvt")
DATA_AWARE = ("whitened", "fisher", "asvd", "isvt")
# float16 weights are factorized in float64 math and their factors stored as float16 again; bfloat16
# has no native NumPy type onnx-graphsurgeon can export factors in.
BFLOAT16_REASON = "weight dtype bfloat16 is not factorized (no NumPy bfloat16 to store the factors in)"


@dataclass
class FactorizeMatMulConfig:
    """How ranks are chosen; exactly one rule applies to each layer.

    method : ``svd`` (data-free) or a data-aware method (``whitened``, ``asvd``, ``isvt``).
    rank_ratio : keep ``ceil(rank_ratio * min(k, n))`` singular values of a ``(k, n)`` weight.
    energy : keep the smallest rank whose share of the squared spectrum is at least ``energy``
        (for ``whitened``/``isvt`` the calibrated spectrum, i.e. of the output X W).
    param_budget : parameters allowed for all factorizable weights together; the ranks are then
        allocated across layers (``onnxlr.allocation``) to minimise the summed truncation error the
        method's spectrum predicts (for ``whitened`` the calibrated output error), some layers
        possibly staying dense.
    unit_costs : per weight name, what one of its parameters takes of ``param_budget`` — the rows it
        multiplies per run for a budget of multiply-adds; absent names (or None) cost 1.
    ranks : per-layer ranks keyed by node name or weight name; they take precedence; 0 keeps the
        layer dense.
    force : rewrite even when the rank would not save parameters (used to test exactness).
    refit : data-aware methods: refit B to the layer's true output after truncation.
    bias_correction : data-aware methods: fold the mean output error into the bias.
    svd_solver : ``auto`` (a randomized SVD where only one small rank of a large weight is needed,
        the exact one otherwise: :func:`onnxlr.linalg.svd_solver`), ``exact`` or ``randomized``.
    """

    method: str = "svd"
    rank_ratio: float | None = None
    energy: float | None = None
    param_budget: int | None = None
    unit_costs: dict[str, float] | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    force: bool = False
    refit: bool = True
    bias_correction: bool = True
    svd_solver: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise OnnxlrError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.svd_solver not in linalg.SVD_SOLVERS:
            raise OnnxlrError(f"unknown SVD solver {self.svd_solver!r} (choose from {', '.join(linalg.SVD_SOLVERS)})")
        if sum(x is not None for x in (self.rank_ratio, self.energy, self.param_budget)) > 1:
            raise OnnxlrError("give one of a rank ratio, an energy share or a parameter budget")
        if self.param_budget is not None and self.param_budget < 0:
            raise OnnxlrError(f"parameter budget must be non-negative, got {self.param_budget}")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise OnnxlrError(f"rank ratio must be in (0, 1], got {self.rank_ratio}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OnnxlrError(f"energy must be in (0, 1], got {self.energy}")
        for name, rank in self.ranks.items():
            if int(rank) != rank or rank < 0:
                raise OnnxlrError(f"rank for layer {name!r} must be a non-negative integer (0 keeps it dense), "
                                  f"got {rank}")


@dataclass
class Layer:
    """A MatMul/Gemm node whose weight can be factorized; ``W`` is the logical (k, n) weight."""

    node: gs.Node
    weight: gs.Constant
    W: np.ndarray

    @property
    def transposed(self) -> bool:
        return self.node.op == "Gemm" and bool(self.node.attrs.get("transB", 0))


def match_layer(node: gs.Node) -> Layer | str:
    """The factorizable layer behind ``node``, or the reason it is not factorizable."""
    if not isinstance(node.inputs[1], gs.Constant):
        if isinstance(node.inputs[0], gs.Constant):
            return "the constant weight is the first operand (W @ X); only X @ W is factorized"
        return "weight is not a constant (a graph input or computed tensor)"
    weight = node.inputs[1]
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


def find_layers(graph: gs.Graph) -> tuple[list[Layer], list[LayerChange]]:
    """All MatMul/Gemm nodes, split into factorizable layers and skips with reasons."""
    readers: dict[str, list[gs.Node]] = defaultdict(list)
    for node in graph.nodes:
        for tensor in node.inputs:
            readers[tensor.name].append(node)
    inner = subgraph_readers(graph)
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op not in FACTORIZABLE_OPS or node.domain not in ("", "ai.onnx", None):
            continue
        found = match_layer(node)
        if isinstance(found, Layer):
            others = [r for r in readers[found.weight.name] if not _reads_as_weight(r, found.weight)]
            if found.weight.name in inner:
                found = read_in_subgraph_reason(found.weight.name, inner[found.weight.name])
            elif others:
                found = (
                    f"weight {found.weight.name!r} is also read by {others[0].op} node "
                    f"{others[0].name!r}; factorizing would keep the dense copy"
                )
        if isinstance(found, Layer):
            layers.append(found)
        else:
            skipped.append(LayerChange(node.name, node.op, "skipped", found))
    for node, owner in subgraph_nodes(graph):
        if node.op in FACTORIZABLE_OPS:
            skipped.append(LayerChange(node.name, node.op, "skipped", in_subgraph_reason(node, owner)))
    return layers, skipped


def _reads_as_weight(node: gs.Node, weight: gs.Constant) -> bool:
    return (
        node.op in FACTORIZABLE_OPS
        and len(node.inputs) > 1
        and node.inputs[1] is weight
        and node.inputs[0] is not weight
    )


class FactorizeMatMul:
    """Low-rank factorization of MatMul/Gemm layers with constant weights.

    stats : calibration statistics keyed by input tensor name (required by data-aware methods).
    sensitivity : per layer-output tensor name, each output unit's measured effect on the model
        output (n,) (``runtimes.sensitivity``); required by ``fisher``.
    cross : instead of ``stats``, paired statistics of each layer input in the original model and in
        the model being compressed (sequential compression, see ``factorize_sequential``): each layer
        is then fitted to reproduce the ORIGINAL output from its drifted input
        (``linalg.sequential_target``).
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

    def __init__(self, config: FactorizeMatMulConfig | None = None,
                 stats: Mapping[str, TensorStats] | None = None,
                 sensitivity: Mapping[str, np.ndarray] | None = None, *,
                 cross: Mapping[str, CrossStats] | None = None,
                 only: Collection[tuple[str, bool]] | None = None, cache: dict | None = None,
                 executor=None):
        self.config = config or FactorizeMatMulConfig()
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
        self._shared_cache = cache is not None
        self._cache = {} if cache is None else cache
        self._eigs: dict = self._cache.setdefault("eigs", {})
        self.executor = executor or SerialExecutor()

    def choose_rank(self, layer: Layer, spectrum: np.ndarray) -> int | None:
        """The rank for ``layer`` under the config, or None if no rule applies."""
        override = _override(self.config, layer)
        if override is not None:
            return override
        k, n = layer.W.shape
        return linalg.rank_from_rule(k, n, spectrum, rank_ratio=self.config.rank_ratio, energy=self.config.energy)

    def _allocate(self, layers: list[Layer], decompositions: Mapping[tuple[str, bool], tuple]) -> dict:
        """Ranks per weight key under ``config.param_budget`` (None: the weight stays dense)."""
        given, free = {}, {}  # per weight: budget with the user's rank / (shape, spectrum) to allocate
        unit = {name: float(cost) for name, cost in (self.config.unit_costs or {}).items()}
        for layer in layers:
            key = (layer.weight.name, layer.transposed)
            k, n = layer.W.shape
            override = _override(self.config, layer)
            if override is not None:
                params = override * (k + n) if linalg.saves_parameters(k, n, override) else k * n
                given[key] = params * unit.get(layer.weight.name, 1.0)
            elif key not in free:
                free[key] = ((k, n), decompositions[key][2].spectrum)
        fixed = sum(given.values())
        shapes = [shape for shape, _ in free.values()]
        # Cost of rank r: the squared spectrum the method truncates beyond r (for whitened, exactly the
        # calibrated output error), summed over layers in absolute terms — every layer's error counts
        # in the units of its own output. Measured on MiniLM, this beat weighting by relative error
        # or by probed output sensitivity (docs/benchmarks.md).
        costs = [np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]]) for _, s in free.values()]
        units = [unit.get(name, 1.0) for name, _ in free]
        smallest = sum((k + n) * u for (k, n), u in zip(shapes, units))
        budget = self.config.param_budget - fixed
        if budget < smallest:
            raise OnnxlrError(f"budget {self.config.param_budget:,.0f} is below the smallest reachable "
                              f"{smallest + fixed:,.0f} (rank 1 for every factorizable layer)")
        return dict(zip(free, allocate_ranks(shapes, costs, budget, unit_costs=units)))

    def _weight_stats(self, layers: list[Layer]) -> dict[tuple[str, bool], TensorStats | CrossStats]:
        """Statistics per weight: a weight read by several layers is fitted to all their inputs."""
        merged: dict[tuple[str, bool], TensorStats | CrossStats] = {}
        if self.stats is None:
            return merged
        for layer in layers:
            found = self.stats.get(layer.node.inputs[0].name)
            if found is None or (layer.node.op == "Gemm" and layer.node.attrs.get("transA", 0)):
                continue  # no rows of X to weight by: the layer falls back to plain SVD
            key = (layer.weight.name, layer.transposed)
            merged[key] = found if key not in merged else merged[key].merged(found)
        return merged

    def _weight_sensitivity(self, layers: list[Layer], key: tuple[str, bool]) -> np.ndarray | None:
        """Summed output sensitivity of every layer computing with this weight (None if unmeasured)."""
        found = [self.sensitivity[layer.node.outputs[0].name] for layer in layers
                 if (layer.weight.name, layer.transposed) == key and layer.node.outputs[0].name in self.sensitivity]
        return np.sum(found, axis=0) if found else None

    def _gram(self, st: TensorStats) -> np.ndarray:
        # Centered statistics + the bias correction give the optimal affine fit (R8 in the research notes).
        return st.centered_gram if self.config.bias_correction else st.gram

    def _eig(self, st: TensorStats) -> tuple[np.ndarray, np.ndarray]:
        """Clamped eigen-decomposition of ``st``'s Gram, once per statistics object (layers reading the
        same input share it)."""
        key = (id(st), self.config.bias_correction)
        if key not in self._eigs:
            self._eigs[key] = (st, linalg.clamped_eigh(self._gram(st)))
        return self._eigs[key][1]

    def _target(self, W: np.ndarray, st: TensorStats | CrossStats | None) -> tuple[np.ndarray, TensorStats | None]:
        """The weight to approximate and the statistics of the input it will see: ``W`` and ``st``
        itself, or for paired statistics the sequential target on the compressed model's input."""
        if not isinstance(st, CrossStats):
            return W, st
        cross = st.centered_cross if self.config.bias_correction else st.cross
        return linalg.sequential_target(W, self._gram(st.hat), cross, eig=self._eig(st.hat)), st.hat

    def _decompose(self, W: np.ndarray, st: TensorStats | None, sensitivity: np.ndarray | None = None):
        """``(svd, factors)`` for one weight: the :class:`~onnxlr.linalg.LazySVD` of the matrix the
        method truncates (its ``spectrum`` is what the energy rule and the allocation read) and a
        function ``rank -> (A, B)``. The expensive parts — the eigen-decomposition of the Gram (shared
        by every layer reading the same input) and one SVD per weight — are done once, whatever
        ranks are asked for, and only when asked for."""
        solver = self.config.svd_solver
        if st is None:
            return _svd_factors(W, solver)
        method = self.config.method
        gram = self._gram(st)
        lam, Q = self._eig(st)
        if method in ("whitened", "fisher"):
            weights = None
            if method == "fisher" and sensitivity is not None:
                # Damped Fisher (d + mean d): the forward-probe estimate is noisy in absolute terms, and
                # an undamped near-zero estimate would let a unit's output be discarded outright.
                weights = np.sqrt(sensitivity + sensitivity.mean())
            whitened = linalg.WhitenedSVD.fit(W, (lam, Q), col_weights=weights, solver=solver)
            return whitened.svd, whitened.factors
        if method == "isvt":
            return linalg.WhitenedSVD.fit(W, (lam, Q), solver="exact").svd, _ISVTFactors(W, gram, (lam, Q))
        svd, factors = _svd_factors(W, solver)
        if method == "asvd":
            factors = _ASVDFactors(W, st.mean_abs)
        if not self.config.refit:
            return svd, factors
        # Refit B against the clamped Gram Q diag(lam) Qᵀ: on directions the calibration data never
        # reaches, the raw Gram would let B drift arbitrarily far from W.
        return svd, _Refitted(factors, W, (Q * lam) @ Q.T)

    def _decompositions(self, layers: list[Layer]) -> tuple[dict, dict]:
        """Per weight key: its statistics, and ``(stats used, sensitivity, LazySVD, rank -> factors)``."""
        weight_stats = self._weight_stats(layers)
        shared = self._cache.setdefault("decompositions", {})
        decompositions: dict[tuple[str, bool], tuple] = {}
        # disable=None: a progress bar on a terminal only, silent in logs and tests
        for layer in tqdm(layers, desc="decompose", unit="layer", disable=None, leave=False):
            key = (layer.weight.name, layer.transposed)
            if key in decompositions:
                continue
            source = weight_stats.get(key)
            sensitivity = self._weight_sensitivity(layers, key)
            c = self.config
            # everything the decomposition depends on (the objects are kept alive in the entry)
            ckey = (key, id(source), id(sensitivity), c.method, c.bias_correction, c.refit, layer.W.shape)
            if ckey not in shared:
                target, st = self._target(layer.W, source)
                shared[ckey] = (source, sensitivity, (st, sensitivity, *self._decompose(target, st, sensitivity)))
            decompositions[key] = shared[ckey][2]
        return weight_stats, decompositions

    def factors(self, layer: Layer, rank: int, decomposition: tuple, paired=None):
        """``(A (k, r), B (r, n), delta (n,) or None)`` of ``layer`` at ``rank``: its factors and the
        bias correction folded after it. ``decomposition``: the layer's entry of
        :meth:`decompositions`; ``paired``: its statistics there (sequential fits only)."""
        st, _, _, make_factors = decomposition
        A, B = make_factors(rank)
        delta = None
        if st is not None and self.config.bias_correction:
            ref_mean = paired.ref.mean if isinstance(paired, CrossStats) else st.mean
            delta = linalg.bias_correction(layer.W, A, B, ref_mean, st.mean)
        return A, B, delta

    def decompositions(self, layers: list[Layer]) -> dict:
        """Per (weight name, transposed): ``(stats used, sensitivity, LazySVD, rank -> (A, B))``."""
        return self._decompositions(layers)[1]

    def _fit_all(self, layers: list[Layer], first: Mapping[tuple[str, bool], Layer], weight_stats: Mapping,
                 wanted: Mapping[tuple, int]):
        """``(key, WeightFit)`` per key (weight name, transposed, rank) of ``wanted``, in order, each
        computed from the weight alone by :func:`fit_weight` on ``self.executor``; ``first``: the
        first layer computing with each weight."""
        jobs = []
        for (name, transposed, rank) in wanted:
            layer = first[(name, transposed)]
            source = weight_stats.get((name, transposed))
            statistics = [s for s in ((source.hat,) if isinstance(source, CrossStats) else (source,)) if s is not None]
            eigs = [(s, self._eig(s)) for s in statistics]
            jobs.append(WeightJob(weight=layer.W, source=source, rank=rank, eigs=eigs,
                                  sensitivity=self._weight_sensitivity(layers, (name, transposed))))
        worker = FactorizeMatMul(self.config, {}, {})  # the config alone: each job carries its statistics
        return zip(wanted, self.executor.imap(fit_weight, jobs, shared=worker))

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        layers, skipped = find_layers(graph)
        if self.only is None:
            record.layers.extend(skipped)
            check_rank_names(self.config, layers)
        else:
            layers = [layer for layer in layers if (layer.weight.name, layer.transposed) in self.only]

        # A rank ratio or per-layer ranks fix every rank before any SVD: each weight is then fitted on
        # its own (on the executor, randomized where that pays, one weight in memory at a time). An
        # energy rule or a budget reads whole spectra first, and a shared cache is there to keep
        # decompositions for later allocations: those keep one exact decomposition per weight.
        spectra_first = (self.config.energy is not None or self.config.param_budget is not None
                         or self._shared_cache)
        weight_stats = self._weight_stats(layers)
        decompositions = self._decompositions(layers)[1] if spectra_first else {}
        allocated = self._allocate(layers, decompositions) if self.config.param_budget is not None else None
        planned = []  # (layer, rank, details) of the layers to rewrite, in graph order
        for layer in layers:
            key = (layer.weight.name, layer.transposed)
            k, n = layer.W.shape
            st, sensitivity = (decompositions[key][:2] if spectra_first else
                               (weight_stats.get(key), self._weight_sensitivity(layers, key)))
            if allocated is not None and _override(self.config, layer) is None:
                rank = allocated[key] or 0
            else:
                rank = self.choose_rank(layer, decompositions[key][2].spectrum if spectra_first else None)
            if rank == 0:
                record.layers.append(kept_dense(layer))
                continue
            details = {
                "weight": layer.weight.name,
                "shape": [k, n],
                "params": k * n,
                "break_even_rank": round(linalg.break_even_rank(k, n), 1),
                "method": _method_used(self.config.method, st, sensitivity),
            }
            if rank is None:
                record.layers.append(LayerChange(layer.node.name, layer.node.op, "skipped",
                                                 "no rank rule or override for this layer", details))
                continue
            if rank > min(k, n):
                raise OnnxlrError(f"rank {rank} for layer {layer.node.name!r} exceeds min(k, n) = {min(k, n)}")
            details["rank"] = rank
            if not linalg.saves_parameters(k, n, rank) and not self.config.force:
                record.layers.append(LayerChange(
                    layer.node.name, layer.node.op, "skipped",
                    f"rank {rank} >= break-even rank {k * n / (k + n):.1f}: would not save parameters",
                    details))
                continue
            planned.append((layer, rank, details))

        wanted = dict.fromkeys((layer.weight.name, layer.transposed, rank) for layer, rank, _ in planned)
        first: dict[tuple[str, bool], Layer] = {}  # the layer each weight's factors are made for
        for layer, _, _ in planned:
            first.setdefault((layer.weight.name, layer.transposed), layer)
        if spectra_first:
            fits = ((fkey, self._fit(first[fkey[:2]], fkey[2], decompositions[fkey[:2]], weight_stats.get(fkey[:2])))
                    for fkey in wanted)
        else:
            fits = self._fit_all(layers, first, weight_stats, wanted)
            record.config["executor"] = self.executor.describe()
        # Each fit becomes graph constants as it arrives (spilled to disk for a mapped model), so the
        # float64 factors of only one weight are in memory at a time.
        made: dict[tuple[str, bool, int], tuple] = {}
        names: set[str] = set()  # of the factors made, not yet in the graph
        for fkey, fit in fits:
            made[fkey] = (self._constants(graph, first[fkey[:2]], fit.A, fit.B, names),
                          dataclasses.replace(fit, A=None, B=None))
        for layer, rank, details in planned:
            fkey = (layer.weight.name, layer.transposed, rank)
            constants, fit = made[fkey]
            self._rewrite(graph, layer, *constants)
            if fit.delta is not None:
                _add_bias(graph, layer, fit.delta.astype(layer.W.dtype))
            k, n = layer.W.shape
            details.update(energy_kept=fit.energy_kept, svd_solver=fit.solver, params_after=rank * (k + n),
                           **fit.errors)
            record.layers.append(LayerChange(layer.node.name, layer.node.op, "rewritten", "", details))
        return record

    def _fit(self, layer: Layer, rank: int, decomposition: tuple, paired) -> "WeightFit":
        """One weight's :class:`WeightFit` at ``rank`` from its decomposition."""
        svd = decomposition[2]
        A, B, delta = self.factors(layer, rank, decomposition, paired)
        return WeightFit(A, B, delta, _errors(layer.W, A, B, paired, delta is not None),
                         svd.energy_kept(rank), svd.solver_for(rank))

    @staticmethod
    def _constants(graph, layer, A, B, taken: set[str]):
        dtype = layer.W.dtype
        base = layer.weight.name
        return (make_constant(graph, f"{base}/lr_A", A.astype(dtype), taken),
                make_constant(graph, f"{base}/lr_B", B.astype(dtype), taken))

    @staticmethod
    def _rewrite(graph: gs.Graph, layer: Layer, A: gs.Constant, B: gs.Constant) -> None:
        node = layer.node
        label = node.name or layer.weight.name
        hidden = gs.Variable(unique_name(graph, f"{label}/lr_hidden"), dtype=layer.W.dtype)
        first = gs.Node(node.op, name=unique_name(graph, f"{label}/lr_A"),
                        inputs=[node.inputs[0], A], outputs=[hidden])
        if node.op == "Gemm":
            first.attrs = {"alpha": float(node.attrs.get("alpha", 1.0)),
                           "transA": int(node.attrs.get("transA", 0))}
            if graph.opset < 11:  # C became optional in Gemm-11; before, the first factor needs a zero one
                first.inputs.append(gs.Constant(unique_name(graph, f"{label}/lr_zero"), np.zeros(1, layer.W.dtype)))
            node.attrs = {"beta": float(node.attrs.get("beta", 1.0))}
        node.inputs[0] = hidden
        node.inputs[1] = B
        graph.nodes.append(first)


def _svd_factors(W: np.ndarray, solver: str = "auto"):
    """Plain SVD computed once, when first needed: ``(LazySVD, rank -> (A, B))`` with the values
    split evenly."""
    svd = linalg.LazySVD(W, solver)
    return svd, _PlainFactors(svd)


# The ``rank -> (A, B)`` functions of the decompositions, as small objects rather than closures so
# that a decomposition pickles (an executor's workers receive them: rank_search.CandidateScorer).
@dataclass
class _PlainFactors:
    svd: linalg.LazySVD

    def __call__(self, rank: int):
        return linalg.split_factors(*self.svd.top(rank))


@dataclass
class _ISVTFactors:
    W: np.ndarray
    gram: np.ndarray
    eig: tuple

    def __call__(self, rank: int):
        return linalg.isvt(self.W, self.gram, rank, eig=self.eig)[:2]


@dataclass
class _ASVDFactors:
    W: np.ndarray
    mean_abs: np.ndarray

    def __call__(self, rank: int):
        return linalg.asvd(self.W, self.mean_abs, rank)


@dataclass
class _Refitted:
    """``factors``' A with B refitted to the layer's output under the clamped Gram."""

    factors: object
    W: np.ndarray
    clamped: np.ndarray

    def __call__(self, rank: int):
        A = self.factors(rank)[0]
        return A, linalg.refit_output_factor(self.W, A, self.clamped)


@dataclass
class WeightFit:
    """One weight's factors at one rank, the bias correction to fold after them (or None), their
    errors (``weight_error``, with statistics ``calib_error``), the spectrum share kept and the SVD
    solver used."""

    A: np.ndarray
    B: np.ndarray
    delta: np.ndarray | None
    errors: dict
    energy_kept: float
    solver: str


@dataclass
class WeightJob:
    """What :func:`fit_weight` needs to fit one weight away from the graph: the logical (k, n)
    weight, its statistics (None: plain SVD) with the eigen-decompositions of their Grams, the
    summed output sensitivity of its layers, and the rank."""

    weight: np.ndarray
    source: TensorStats | CrossStats | None
    rank: int
    eigs: list = field(default_factory=list)  # [(statistics, clamped eigh of its Gram)]
    sensitivity: np.ndarray | None = None


def fit_weight(factorize: FactorizeMatMul, job: WeightJob) -> WeightFit:
    """Fit one weight at its rank with ``factorize``'s config (the executors' unit of work: a plain
    function of picklable arguments, so it runs in this process, a worker process or on Ray)."""
    factorize._eigs.clear()
    for st, eig in job.eigs:  # computed once per input in the caller, shared by its weights
        factorize._eigs[(id(st), factorize.config.bias_correction)] = (st, eig)
    W = np.asarray(job.weight)
    target, st = factorize._target(W, job.source)
    svd, make_factors = factorize._decompose(target, st, job.sensitivity)
    layer = Layer(node=None, weight=None, W=W)
    fit = factorize._fit(layer, job.rank, (st, job.sensitivity, svd, make_factors), job.source)
    release_pages(job.weight)  # a mapped weight's pages leave memory once it is fitted
    return fit


def _method_used(method: str, st: TensorStats | None, sensitivity: np.ndarray | None) -> str:
    """What a layer really got: without statistics plain SVD, without sensitivities no Fisher weights."""
    if st is None:
        return "svd"
    if method == "fisher" and sensitivity is None:
        return "whitened"
    return method


def kept_dense(layer: Layer) -> LayerChange:
    """The record of a layer the parameter-budget allocation leaves dense."""
    k, n = layer.W.shape
    return LayerChange(layer.node.name, layer.node.op, "skipped", "kept dense by the rank allocation (rank 0)",
                       {"weight": layer.weight.name, "shape": [k, n], "params": k * n})


def _override(config: FactorizeMatMulConfig, layer: Layer) -> int | None:
    """The per-layer rank the user gave for this layer (by node or weight name), if any."""
    for key in (layer.node.name, layer.weight.name):
        if key in config.ranks:
            return int(config.ranks[key])
    return None


def check_rank_names(config: FactorizeMatMulConfig, layers: list[Layer]) -> None:
    """Every per-layer rank must name a factorizable layer (node) or weight."""
    known = {layer.node.name for layer in layers} | {layer.weight.name for layer in layers}
    unknown = sorted(set(config.ranks) - known)
    if unknown:
        raise OnnxlrError(f"no factorizable MatMul/Gemm layer or weight named {unknown[0]!r}")


def _errors(W, A, B, st: TensorStats | CrossStats | None, centered: bool) -> dict[str, float]:
    """Relative weight error, and with statistics the relative output error on calibration data
    ``||X W - (X_hat A B + delta)|| / ||X W||`` (computed from the Gram matrices alone; ``X_hat = X``
    unless the statistics are paired)."""
    W = np.asarray(W, dtype=np.float64)
    P = A @ B
    out = {"weight_error": float(np.linalg.norm(W - P) / max(np.linalg.norm(W), 1e-300))}
    if st is None:
        return out
    ref = st.ref if isinstance(st, CrossStats) else st
    gram = (lambda s: s.centered_gram) if centered else (lambda s: s.gram)
    if isinstance(st, CrossStats):
        cross = st.centered_cross if centered else st.cross
        num = float(np.sum(W * (gram(ref) @ W)) - 2 * np.sum(P * (cross @ W)) + np.sum(P * (gram(st.hat) @ P)))
    else:
        M = W - P
        num = float(np.sum(M * (gram(ref) @ M)))
    den = float(np.sum(W * (ref.gram @ W)))
    out["calib_error"] = float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
    return out


def _add_bias(graph: gs.Graph, layer: Layer, delta: np.ndarray) -> None:
    """Add ``delta`` (n,) to the layer's output: into a constant bias only this layer reads, else
    through a new Add node."""
    node = layer.node
    readers = consumer_counts(graph)
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        C = node.inputs[2] if len(node.inputs) > 2 else None
        if C is None:
            node.inputs.append(gs.Constant(unique_name(graph, f"{node.name}/lr_bias"), delta))
            node.attrs["beta"] = 1.0
            return
        if isinstance(C, gs.Constant) and readers[C.name] == 1 and beta != 0.0:
            C.values = (np.asarray(C.values) + delta / beta).astype(delta.dtype)
            return
    else:
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add" and out not in graph.outputs:
            add = out.outputs[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if isinstance(other, gs.Constant) and readers[other.name] == 1 and \
                    np.asarray(other.values).shape in ((delta.size,), (1, delta.size)):
                other.values = (np.asarray(other.values) + delta).astype(delta.dtype)
                return
    # General case: y = layer(x) + delta through a new Add after the layer.
    add_after(graph, node, delta, f"{node.name or layer.weight.name}/lr")
