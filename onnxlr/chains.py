"""Linear chains: compose consecutive affine maps and choose the width of the composition.

Plain numpy, no ONNX: :mod:`onnxlr.passes.compose_chains` finds the chains in a graph and calls these.

A chain computes ``y = (((x W_1 + b_1) W_2 + b_2) ...) W_m + b_m`` on rows ``x`` of length ``k`` — one
affine map ``y = x W + b`` with ``W = W_1 W_2 ... W_m`` (k, n) and ``b = (b_1 W_2 + b_2) W_3 ...``,
computed through intermediate widths ``w_1 ... w_{m-1}`` that may be far larger than the rank of
``W``. Deep linear networks learn in a small invariant subspace (Yaras et al. 2024, "Compressible
dynamics in deep overparameterized low-rank learning & adaptation"): the composed map keeps the
function, and its rank, not the widths, is what it costs. :func:`fit_chain` returns it either dense
(``k·n`` weights) or as a pair ``A (k, r) B (r, n)`` at the smallest width ``r`` whose error stays within
a tolerance, whichever has fewer parameters.

The width is read off the *calibrated* spectrum when the statistics of the chain input are known:
the singular values of ``S^T W`` with ``S S^T`` the centered Gram of ``x`` (activation-whitened SVD,
:class:`onnxlr.linalg.WhitenedSVD`), so directions the data never excite cost nothing, and the mean
error is folded into the bias. Without statistics, the spectrum of ``W`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from onnxlr import linalg

# Below this relative error a truncation is round-off: float32 chains composed in float64 differ from
# the product of their rounded factors by about this much anyway.
ROUND_OFF = 1e-6
# Fewer calibration rows than this per input feature do not pin the input's spectrum down: a chain fed
# by a pooled vector (squeeze-excitation blocks see one row per image) would be cut to the rank of the
# few rows it saw. With at least 4 rows per feature the sample covariance is full rank and its smallest
# eigenvalues are not underestimated by more than about 4× (the Marchenko–Pastur edge (1 - 1/√4)²).
MIN_ROWS_PER_INPUT = 4


@dataclass
class AffineMap:
    """``y = x @ W + b`` on rows: ``W`` (k, n), ``b`` (n,)."""

    W: np.ndarray
    b: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.W.shape

    @classmethod
    def linear(cls, W: np.ndarray, b: np.ndarray | None = None) -> "AffineMap":
        W = np.asarray(W, dtype=np.float64)
        return cls(W, np.zeros(W.shape[1]) if b is None else np.broadcast_to(np.asarray(b, np.float64), W.shape[1:]).copy())

    @classmethod
    def elementwise(cls, scale: np.ndarray, shift: np.ndarray) -> "AffineMap":
        """``y = x * scale + shift`` per feature, both (n,)."""
        return cls(np.diag(np.asarray(scale, np.float64)), np.asarray(shift, np.float64).copy())


def compose(maps: Sequence[AffineMap]) -> AffineMap:
    """The affine map of applying ``maps`` in order: ``W = W_1 ... W_m``, ``b`` carried through.

    Diagonal (elementwise) maps are applied as column scalings, not as matrix products."""
    if not maps:
        raise ValueError("compose needs at least one map")
    W, b = maps[0].W.copy(), maps[0].b.copy()
    for m in maps[1:]:
        if W.shape[1] != m.W.shape[0]:
            raise ValueError(f"maps do not chain: width {W.shape[1]} into {m.W.shape}")
        if m.W.shape[0] == m.W.shape[1] and np.count_nonzero(m.W - np.diag(np.diagonal(m.W))) == 0:
            d = np.diagonal(m.W)
            W, b = W * d, b * d + m.b
        else:
            W, b = W @ m.W, b @ m.W + m.b
    return AffineMap(W, b)


@dataclass
class ChainFit:
    """The composed chain as emitted: ``dense`` (``A`` is W (k, n), ``B`` None) or a pair ``A`` (k, r),
    ``B`` (r, n); ``bias`` (n,). ``error``: relative output error ``||y - ŷ|| / ||y||`` on the calibration
    rows (weight error ``||W - AB|| / ||W||`` without statistics); ``spectrum``: the singular values the
    width was read from; ``calibrated``: whether they were the calibrated ones."""

    A: np.ndarray
    B: np.ndarray | None
    bias: np.ndarray
    error: float
    spectrum: np.ndarray
    calibrated: bool

    @property
    def dense(self) -> bool:
        return self.B is None

    @property
    def width(self) -> int:
        """The new intermediate width (the output width for a dense map)."""
        return self.A.shape[1] if self.dense else self.B.shape[0]

    @property
    def params(self) -> int:
        """Weights plus the bias, if it is not zero (a zero bias is not emitted)."""
        return int(self.A.size + (0 if self.B is None else self.B.size) + (self.bias.size if np.any(self.bias) else 0))


def affine_error(W: np.ndarray, b: np.ndarray, W_hat: np.ndarray, b_hat: np.ndarray, gram: np.ndarray,
                 total: np.ndarray, count: int) -> float:
    """Relative error ``||(X W + b) - (X Ŵ + b̂)||_F / ||X W + b||_F`` over calibration rows ``X`` known
    by their Gram ``XᵀX`` (k, k), column sums ``Xᵀ1`` (k,) and row count."""
    def sq_norm(M, v):
        return float(np.sum(M * (gram @ M)) + 2.0 * (total @ M) @ v + count * (v @ v))

    num, den = max(sq_norm(W - W_hat, b - b_hat), 0.0), max(sq_norm(W, b), 0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def fit_chain(chain: AffineMap, *, max_error: float, gram: np.ndarray | None = None, total: np.ndarray | None = None,
              count: int = 0) -> ChainFit:
    """The cheaper of the dense composed map and its pair at the smallest width within ``max_error``.

    Parameters
    ----------
    chain : the composed map, ``W`` (k, n), ``b`` (n,)
    max_error : largest relative error allowed for the pair: of the chain's output on the calibration
        rows when ``gram`` is given, else of ``W``.
    gram, total, count : ``XᵀX`` (k, k), ``Xᵀ1`` (k,) and the number of calibration rows of the chain
        input; None for a data-free fit.

    Returns
    -------
    ChainFit; dense when no width below the break-even one ``k·n / (k+n)`` meets ``max_error`` (the
    dense map is exact).

    With statistics the factors at each width are the whitened ones (optimal for the output error,
    eigenvalues of the Gram clamped at a relative 1e-6 for stability), and the width is the smallest
    whose error *on the calibration rows* — computed from the raw statistics, the mean error folded
    into the bias — meets ``max_error``: the clamped spectrum alone would charge every direction the
    data never reach with the clamp, ~1e-3 each, and never let a chain shrink to the data's rank.
    """
    W, b = np.asarray(chain.W, np.float64), np.asarray(chain.b, np.float64)
    k, n = W.shape
    tolerance = max(max_error, ROUND_OFF)
    below_break_even = (k * n - 1) // (k + n)  # the widest pair that is cheaper than the dense map
    dense = ChainFit(W, None, b, 0.0, np.zeros(0), gram is not None and count > 0)
    if gram is not None and count > 0:
        gram, total = np.asarray(gram, np.float64), np.asarray(total, np.float64)
        mean = total / count
        centered = gram - count * np.outer(mean, mean)  # centered Gram + bias fold: the optimal affine fit
        whitened = linalg.WhitenedSVD.fit(W, linalg.clamped_eigh(centered), solver="exact")
        dense.spectrum = whitened.s

        def fit(r):
            A, B = whitened.factors(r)
            bias = b + mean @ (W - A @ B)
            return ChainFit(A, B, bias, affine_error(W, b, A @ B, bias, gram, total, count), whitened.s, True)
    else:
        svd = linalg.LazySVD(W, "exact")
        dense.spectrum = svd.spectrum

        def fit(r):
            A, B = linalg.split_factors(*svd.top(r))
            return ChainFit(A, B, b.copy(), linalg.relative_error_at_rank(svd.spectrum, r), svd.spectrum, False)
    if below_break_even < 1:
        return dense
    best = fit(below_break_even)
    if best.error > tolerance:
        return dense
    low, high = 0, below_break_even  # fit(high) meets the tolerance; widths <= low are not known to
    while high - low > 1:
        middle = (low + high) // 2
        candidate = fit(middle)
        if candidate.error <= tolerance:
            high, best = middle, candidate
        else:
            low = middle
    return best
