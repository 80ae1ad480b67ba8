"""The numerics of factorizing a layer's weight ``W (k, n)`` into ``A (k, r) · B (r, n)``, away from the graph.

Both the factorization pass (:mod:`onnxlr.passes.factorize_matmul`) and the rank search
(:mod:`onnxlr.planning.rank_search`) use this module: the pass to fit the ranks it is given, the search
to build candidate weights at every rank it tries. Nothing here reads or edits a graph.

Methods (``method``; the data-aware ones need statistics of the layer input X, :mod:`onnxlr.statistics`):

- ``svd``: plain truncated SVD of W (data-free), the values split evenly between the factors.
- ``whitened``: minimises the output error ``||X (W - A B)||_F`` in closed form (SVD-LLM); with the
  centered Gram and the bias correction below it is the optimal affine rank-r map.
- ``fisher``: whitened, with each output unit weighted by the square root of its measured effect on the
  model output (a diagonal Fisher / output-divergence metric: FWSVD, Shumaylov et al.), so the rank is
  spent where the model output notices it.
- ``asvd``: SVD of ``diag(mean|x|^0.5) W`` (ASVD), then refit.
- ``isvt``: iterative singular-value thresholding on the calibrated objective (Shumaylov et al.).

After a data-aware fit, ``B`` is refitted in closed form to the layer's true output (``refit``) and the
mean output error ``mean(x) (W - A B)`` is returned as a bias correction (``bias_correction``).

With paired statistics (:class:`~onnxlr.statistics.CrossStats`: the layer input in the original model
and in the model compressed so far) the target is the *original* output ``X W`` reached from the drifted
input ``X̂`` (``linalg.sequential_target``): sequential compression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from onnxlr import linalg
from onnxlr.errors import OnnxlrError
from onnxlr.graph import release_pages
from onnxlr.statistics import CrossStats, TensorStats

METHODS = ("svd", "whitened", "fisher", "asvd", "isvt")
DATA_AWARE = ("whitened", "fisher", "asvd", "isvt")

WeightKey = tuple[str, bool]  # (weight name, stored transposed)


@dataclass(frozen=True)
class FitSettings:
    """How weights are fitted: ``method`` (:data:`METHODS`), ``refit`` and ``bias_correction`` (data-aware
    methods), ``svd_solver`` (``auto``, ``exact`` or ``randomized``: :func:`onnxlr.linalg.svd_solver`)."""

    method: str = "svd"
    refit: bool = True
    bias_correction: bool = True
    svd_solver: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise OnnxlrError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.svd_solver not in linalg.SVD_SOLVERS:
            raise OnnxlrError(f"unknown SVD solver {self.svd_solver!r} (choose from {', '.join(linalg.SVD_SOLVERS)})")


@dataclass
class Decomposition:
    """One weight, decomposed once: the statistics it was fitted to (None: plain SVD), the output
    sensitivity used (``fisher``), the :class:`~onnxlr.linalg.LazySVD` of the matrix the method truncates
    (its ``spectrum`` is what energy rules and allocations read) and ``factors``: rank -> (A, B)."""

    stats: TensorStats | None
    sensitivity: np.ndarray | None
    svd: linalg.LazySVD
    factors: object


@dataclass
class WeightFit:
    """One weight's factors at one rank, the bias correction to fold after them (or None), their
    errors (``weight_error``, with statistics ``calib_error``), the spectrum share kept and the SVD
    solver used."""

    A: np.ndarray | None
    B: np.ndarray | None
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


class Decomposer:
    """Decomposes and fits weights under ``settings``.

    cache : a dict shared by several decomposers working on the same statistics (several rank
        allocations of one model): eigen-decompositions of the Grams and one SVD per weight are then
        computed once.
    """

    def __init__(self, settings: FitSettings | None = None, cache: dict | None = None):
        self.settings = settings or FitSettings()
        self.cache = {} if cache is None else cache
        self._eigs: dict = self.cache.setdefault("eigs", {})

    def __getstate__(self):
        # an executor's worker gets the settings; each job carries its statistics and eigen-decompositions
        return {"settings": self.settings, "cache": {}, "_eigs": {}}

    # ----------------------------------------------------------------------------- statistics per weight

    @staticmethod
    def weight_stats(layers: Sequence, stats: Mapping | None) -> dict[WeightKey, TensorStats | CrossStats]:
        """Statistics per weight: a weight read by several layers is fitted to all their inputs. A Gemm
        with ``transA`` has no rows of X to weight by: it falls back to plain SVD."""
        merged: dict[WeightKey, TensorStats | CrossStats] = {}
        for layer in layers:
            found = (stats or {}).get(layer.input.name)
            if found is None or (layer.node.op == "Gemm" and layer.node.attrs.get("transA", 0)):
                continue
            merged[layer.key] = found if layer.key not in merged else merged[layer.key].merged(found)
        return merged

    @staticmethod
    def weight_sensitivity(layers: Sequence, sensitivity: Mapping | None, key: WeightKey) -> np.ndarray | None:
        """Summed output sensitivity of every layer computing with this weight (None if unmeasured)."""
        found = [sensitivity[layer.node.outputs[0].name] for layer in layers
                 if layer.key == key and layer.node.outputs[0].name in (sensitivity or {})]
        return np.sum(found, axis=0) if found else None

    # -------------------------------------------------------------------------------------- decomposing

    def gram(self, st: TensorStats) -> np.ndarray:
        # Centered statistics + the bias correction give the optimal affine fit (a rank-r map plus a bias).
        return st.centered_gram if self.settings.bias_correction else st.gram

    def eig(self, st: TensorStats) -> tuple[np.ndarray, np.ndarray]:
        """Clamped eigen-decomposition of ``st``'s Gram, once per statistics object (layers reading the
        same input share it)."""
        key = (id(st), self.settings.bias_correction)
        if key not in self._eigs:
            self._eigs[key] = (st, linalg.clamped_eigh(self.gram(st)))
        return self._eigs[key][1]

    def target(self, W: np.ndarray, st: TensorStats | CrossStats | None) -> tuple[np.ndarray, TensorStats | None]:
        """The weight to approximate and the statistics of the input it will see: ``W`` and ``st``
        itself, or for paired statistics the sequential target on the compressed model's input."""
        if not isinstance(st, CrossStats):
            return W, st
        cross = st.centered_cross if self.settings.bias_correction else st.cross
        return linalg.sequential_target(W, self.gram(st.hat), cross, eig=self.eig(st.hat)), st.hat

    def decompose(self, W: np.ndarray, st: TensorStats | None, sensitivity: np.ndarray | None = None
                  ) -> Decomposition:
        """The decomposition of one weight (``W`` already the target). The expensive parts — the
        eigen-decomposition of the Gram and one SVD — are done once, whatever ranks are asked for, and
        only when asked for."""
        solver = self.settings.svd_solver
        if st is None:
            svd = linalg.LazySVD(W, solver)
            return Decomposition(None, sensitivity, svd, _PlainFactors(svd))
        method = self.settings.method
        lam, Q = self.eig(st)
        if method in ("whitened", "fisher"):
            weights = None
            if method == "fisher" and sensitivity is not None:
                # Damped Fisher (d + mean d): the forward-probe estimate is noisy in absolute terms, and
                # an undamped near-zero estimate would let a unit's output be discarded outright.
                weights = np.sqrt(sensitivity + sensitivity.mean())
            whitened = linalg.WhitenedSVD.fit(W, (lam, Q), col_weights=weights, solver=solver)
            return Decomposition(st, sensitivity, whitened.svd, whitened.factors)
        if method == "isvt":
            svd = linalg.WhitenedSVD.fit(W, (lam, Q), solver="exact").svd
            return Decomposition(st, sensitivity, svd, _ISVTFactors(W, self.gram(st), (lam, Q)))
        svd = linalg.LazySVD(W, solver)
        factors = _ASVDFactors(W, st.mean_abs) if method == "asvd" else _PlainFactors(svd)
        if self.settings.refit:
            # Refit B against the clamped Gram Q diag(lam) Qᵀ: on directions the calibration data never
            # reaches, the raw Gram would let B drift arbitrarily far from W.
            factors = _Refitted(factors, W, (Q * lam) @ Q.T)
        return Decomposition(st, sensitivity, svd, factors)

    def decompositions(self, layers: Sequence, stats: Mapping | None = None,
                       sensitivity: Mapping | None = None) -> dict[WeightKey, Decomposition]:
        """One decomposition per weight of ``layers`` (:class:`onnxlr.matching.Layer`), computed once per
        cache. ``stats``: per input tensor name (None: plain SVD); ``sensitivity``: per output tensor."""
        weight_stats = self.weight_stats(layers, stats)
        shared = self.cache.setdefault("decompositions", {})
        found: dict[WeightKey, Decomposition] = {}
        # disable=None: a progress bar on a terminal only, silent in logs and tests
        for layer in tqdm(layers, desc="decompose", unit="layer", disable=None, leave=False):
            if layer.key in found:
                continue
            source = weight_stats.get(layer.key)
            weights = self.weight_sensitivity(layers, sensitivity, layer.key)
            s = self.settings
            # everything the decomposition depends on (the objects are kept alive in the entry)
            ckey = (layer.key, id(source), id(weights), s.method, s.bias_correction, s.refit, layer.W.shape)
            if ckey not in shared:
                target, st = self.target(layer.W, source)
                shared[ckey] = (source, weights, self.decompose(target, st, weights))
            found[layer.key] = shared[ckey][2]
        return found

    # ------------------------------------------------------------------------------------------ fitting

    def factors(self, W: np.ndarray, rank: int, decomposition: Decomposition, paired=None):
        """``(A (k, r), B (r, n), delta (n,) or None)``: the factors of weight ``W`` at ``rank`` and the
        bias correction folded after them; ``paired``: its statistics there (sequential fits only)."""
        A, B = decomposition.factors(rank)
        delta = None
        st = decomposition.stats
        if st is not None and self.settings.bias_correction:
            ref_mean = paired.ref.mean if isinstance(paired, CrossStats) else st.mean
            delta = linalg.bias_correction(W, A, B, ref_mean, st.mean)
        return A, B, delta

    def fit(self, W: np.ndarray, rank: int, decomposition: Decomposition, paired=None) -> WeightFit:
        """One weight's :class:`WeightFit` at ``rank`` from its decomposition."""
        A, B, delta = self.factors(W, rank, decomposition, paired)
        return WeightFit(A, B, delta, fit_errors(W, A, B, paired, delta is not None),
                         decomposition.svd.energy_kept(rank), decomposition.svd.solver_for(rank))

    def job(self, W: np.ndarray, source, rank: int, sensitivity: np.ndarray | None = None) -> WeightJob:
        """A :class:`WeightJob` for :func:`fit_weight`, with the eigen-decompositions it needs."""
        statistics = [s for s in ((source.hat,) if isinstance(source, CrossStats) else (source,)) if s is not None]
        return WeightJob(weight=W, source=source, rank=rank, eigs=[(s, self.eig(s)) for s in statistics],
                         sensitivity=sensitivity)


def fit_weight(decomposer: Decomposer, job: WeightJob) -> WeightFit:
    """Fit one weight at its rank (the executors' unit of work: a plain function of picklable
    arguments, so it runs in this process, a worker process or on Ray)."""
    decomposer._eigs.clear()
    for st, eig in job.eigs:  # computed once per input in the caller, shared by its weights
        decomposer._eigs[(id(st), decomposer.settings.bias_correction)] = (st, eig)
    W = np.asarray(job.weight)
    target, st = decomposer.target(W, job.source)
    fit = decomposer.fit(W, job.rank, decomposer.decompose(target, st, job.sensitivity), job.source)
    release_pages(job.weight)  # a mapped weight's pages leave memory once it is fitted
    return fit


def method_used(method: str, st: TensorStats | None, sensitivity: np.ndarray | None) -> str:
    """What a layer really got: without statistics plain SVD, without sensitivities no Fisher weights."""
    if st is None:
        return "svd"
    if method == "fisher" and sensitivity is None:
        return "whitened"
    return method


def fit_errors(W, A, B, st: TensorStats | CrossStats | None, centered: bool) -> dict[str, float]:
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


# The ``rank -> (A, B)`` functions of the decompositions, as small objects rather than closures so
# that a decomposition pickles (an executor's workers receive them).
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
