"""Plain numpy linear algebra behind the rewrites: no ONNX here, only arrays.

Notation follows ONNX: a layer computes ``Y = X @ W`` with ``W`` of shape ``(k, n)`` (k inputs,
n outputs). A rank-r factorization replaces ``W`` by ``A @ B`` with ``A`` of shape ``(k, r)`` and ``B``
of shape ``(r, n)``: parameters and multiply-adds per row go from ``k*n`` to ``r*(k+n)``, so a
factorization only pays when ``r < k*n / (k+n)`` (the break-even rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg


def svd(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``W`` in float64: ``W = U @ diag(s) @ Vt``.

    Parameters
    ----------
    W : ndarray of shape (k, n)

    Returns
    -------
    U : ndarray of shape (k, m), s : ndarray of shape (m,), Vt : ndarray of shape (m, n), m = min(k, n)
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    try:
        return scipy.linalg.svd(W, full_matrices=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        return scipy.linalg.svd(W, full_matrices=False, lapack_driver="gesvd")


# Randomized SVD (Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Alg. 4.4:
# randomized subspace iteration). A Gaussian sketch of rank + RANDOMIZED_OVERSAMPLES columns, refined
# by RANDOMIZED_POWER_ITERATIONS passes of W Wᵀ with a QR between passes (without it the columns
# collapse onto the top singular vector in floating point). Each pass sharpens the spectral decay the
# sketch sees from σ to σ^(2q+1): on slowly decaying spectra like those of trained weights (σ_i ~ i^-0.5),
# q = 4 brings the Frobenius error within 1% of the exact truncation at rank ≤ 20% of min(k, n), where
# q = 2 leaves about 2% (measured: bench/svd_solvers.py). Oversampling adds 10% of the rank, at least 10.
RANDOMIZED_OVERSAMPLES = 10
RANDOMIZED_OVERSAMPLE_SHARE = 0.1
RANDOMIZED_POWER_ITERATIONS = 4
# ``solver="auto"`` takes the randomized SVD where it was measured faster: matrices whose smaller side is
# at least RANDOMIZED_MIN_SIZE, at a rank of at most RANDOMIZED_MAX_SHARE of that side
# (bench/svd_solvers.py, 2 cores: 2048 x 8192 5.7-6.4x faster at 5%, 1.3-1.4x at 25%; 1024 x 4096
# 1.4-1.6x at 20%). A rule narrowed to 12.5% for sides of 1024 made the scaling benchmark's
# 1024- and 1536-wide transformers slower end to end (37 s against 29 s, 137 s against 88 s).
RANDOMIZED_MIN_SIZE = 512
RANDOMIZED_MAX_SHARE = 0.25
SVD_SOLVERS = ("auto", "exact", "randomized")


def svd_solver(shape: tuple[int, int], rank: int | None, solver: str = "auto") -> str:
    """The solver ``solver`` resolves to for a ``shape`` matrix truncated at ``rank`` (None: every rank
    is wanted, so the full spectrum is needed): ``"exact"`` or ``"randomized"``."""
    if solver not in SVD_SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r} (choose from {', '.join(SVD_SOLVERS)})")
    if solver != "auto":
        return solver
    m = min(shape)
    if rank is None or m < RANDOMIZED_MIN_SIZE or rank > RANDOMIZED_MAX_SHARE * m:
        return "exact"
    return "randomized"


def randomized_svd(W: np.ndarray, rank: int, *, oversamples: int | None = None,
                   power_iterations: int = RANDOMIZED_POWER_ITERATIONS,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of ``W`` by randomized subspace iteration, in float64.

    Error (Halko et al. 2011, Cor. 10.10, spectral norm, ``p`` oversamples, ``q`` power iterations):
    in expectation at most ``[(1 + sqrt(rank/(p-1))) σ_{r+1}^(2q+1) + e sqrt(rank+p)/p ·
    (Σ_{j>r} σ_j^(2(2q+1)))^(1/2)]^(1/(2q+1))``, the exact truncation error ``σ_{r+1}`` times a factor
    that tends to 1 as ``q`` grows. Deterministic for a given ``seed``.

    Parameters
    ----------
    W : ndarray of shape (k, n)
    rank : int in [1, min(k, n)]
    oversamples : extra sketch columns p (default max(10, 10% of rank))
    power_iterations : q

    Returns
    -------
    U : (k, rank), s : (rank,), Vt : (rank, n), as :func:`svd`.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    k, n = W.shape
    rank = _check_rank(rank, min(k, n))
    if k < n:  # sketch the smaller side: the work is the same, the basis (k x l) smaller
        U, s, Vt = randomized_svd(W.T, rank, oversamples=oversamples, power_iterations=power_iterations, seed=seed)
        return Vt.T, s, U.T
    if oversamples is None:
        oversamples = max(RANDOMIZED_OVERSAMPLES, math.ceil(RANDOMIZED_OVERSAMPLE_SHARE * rank))
    width = min(rank + oversamples, n)
    Y = W @ np.random.default_rng(seed).standard_normal((n, width))
    basis = np.linalg.qr(Y)[0]
    for _ in range(power_iterations):
        basis = np.linalg.qr(W @ np.linalg.qr(W.T @ basis)[0])[0]
    U, s, Vt = svd(basis.T @ W)
    return basis @ U[:, :rank], s[:rank], Vt[:rank]


class LazySVD:
    """The SVD of a matrix ``T``, computed when first asked for, by the solver that fits the request.

    ``top(rank)`` gives the leading triplets: when only one small rank is ever wanted (a rank ratio or
    a rank given per layer) ``solver="auto"`` takes :func:`randomized_svd`; ``spectrum`` (every
    singular value: energy rules, budget allocation) computes the exact SVD, which later ``top`` calls
    then slice. ``solver_for(rank)`` says which one a rank got (the report's ``svd_solver``).

    Parameters
    ----------
    T : ndarray of shape (k, n)
    solver : ``auto``, ``exact`` or ``randomized``
    """

    def __init__(self, T: np.ndarray, solver: str = "auto", seed: int = 0):
        self.T = np.asarray(T, dtype=np.float64)
        self.shape = self.T.shape
        self.size = min(self.shape)
        svd_solver(self.shape, None, solver)  # validates the name
        self.solver = solver
        self.seed = seed
        self.total_energy = float(np.sum(self.T ** 2)) if self.T.size else 0.0
        self._exact: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._randomized: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _full(self):
        if self._exact is None:
            self._exact = svd(self.T)
        return self._exact

    @property
    def spectrum(self) -> np.ndarray:
        """Every singular value (exact), descending."""
        return self._full()[1]

    def solver_for(self, rank: int) -> str:
        if self._exact is not None:
            return "exact"
        return svd_solver(self.shape, rank, self.solver)

    def top(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(U_r (k, r), s_r (r,), Vt_r (r, n))``."""
        rank = _check_rank(rank, self.size)
        if self.solver_for(rank) == "exact":
            U, s, Vt = self._full()
            return U[:, :rank], s[:rank], Vt[:rank]
        if rank not in self._randomized:
            self._randomized[rank] = randomized_svd(self.T, rank, seed=self.seed)
        return self._randomized[rank]

    def energy_kept(self, rank: int) -> float:
        """Share of ``||T||_F²`` the rank-``rank`` truncation keeps."""
        if self.total_energy <= 0:
            return 1.0
        return float(min(1.0, np.sum(self.top(rank)[1] ** 2) / self.total_energy))


def truncated_svd(W: np.ndarray, rank: int, *, solver: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factorization of ``W`` in Frobenius norm (Eckart–Young).

    The singular values are split evenly between the factors (``A = U_r sqrt(S_r)``,
    ``B = sqrt(S_r) V_r^T``) so that both factors have similar magnitudes, which keeps float16 and
    quantized factors well-conditioned. ``solver``: see :func:`svd_solver` (``auto`` takes the
    randomized SVD for a small rank of a large matrix).

    Parameters
    ----------
    W : ndarray of shape (k, n)
    rank : int, 1 <= rank <= min(k, n)

    Returns
    -------
    A : ndarray of shape (k, rank), B : ndarray of shape (rank, n), both float64.
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must be in [1, {min(W.shape)}], got {rank}")
    return split_factors(*LazySVD(W, solver).top(rank))


def split_factors(U: np.ndarray, s: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U sqrt(s), sqrt(s) Vt)``: truncated triplets as two factors of similar magnitude."""
    root = np.sqrt(s)
    return U * root, root[:, None] * Vt


def break_even_rank(k: int, n: int) -> float:
    """Rank at which ``A @ B`` has as many parameters as the dense ``(k, n)`` matrix: ``k*n/(k+n)``."""
    return k * n / (k + n)


def saves_parameters(k: int, n: int, rank: int) -> bool:
    """True when a rank-``rank`` factorization of a ``(k, n)`` matrix has fewer parameters."""
    return rank * (k + n) < k * n


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    """Rank keeping ``ceil(ratio * min(k, n))`` singular values, clamped to ``[1, min(k, n)]``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"rank ratio must be in (0, 1], got {ratio}")
    m = min(k, n)
    return max(1, min(m, math.ceil(ratio * m - 1e-9)))


def energy_kept(s: np.ndarray) -> np.ndarray:
    """Share of the squared spectrum kept at each rank: ``out[r-1] = sum(s[:r]**2) / sum(s**2)``.

    Parameters
    ----------
    s : ndarray of shape (m,), singular values in decreasing order

    Returns
    -------
    ndarray of shape (m,); all ones for an all-zero spectrum.
    """
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum()
    if total == 0.0:
        return np.ones_like(sq)
    return np.cumsum(sq) / total


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest rank whose kept share of the squared spectrum is at least ``energy``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    kept = energy_kept(s)
    # The tolerance keeps energy=1.0 from demanding more than the float sum can give.
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def rank_from_rule(k: int, n: int, spectrum: np.ndarray, *, rank_ratio: float | None = None,
                   energy: float | None = None) -> int | None:
    """The rank an energy share or a rank ratio gives a ``(k, n)`` weight; None when neither is set."""
    if energy is not None:
        return rank_for_energy(spectrum, energy)
    if rank_ratio is not None:
        return rank_for_ratio(k, n, rank_ratio)
    return None


def relative_error_at_rank(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error ``||W - A B|| / ||W||`` of the best rank-``rank`` approximation."""
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum()
    # Summing the tail directly (not 1 - kept share) stays accurate when the error is tiny.
    return float(np.sqrt(sq[rank:].sum() / total)) if total > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# Calibrated (data-aware) factorizations.
#
# Every function below keeps the ONNX orientation: a layer computes ``Y = X @ W + b`` with ``X`` of
# shape (N, k) (rows = samples/tokens) and ``W`` of shape (k, n); a rank-r factorization is
# ``W ≈ A @ B`` with ``A`` (k, r) and ``B`` (r, n). Calibration statistics of a layer input are
# ``G = X^T X`` (k, k, float64, summed over rows), ``mu`` = mean row (k,), ``mean_abs`` = mean |x| per
# column (k,). The calibrated objective is ``||X (W - A B)||_F^2 = tr((W - AB)^T G (W - AB))``, which
# needs only ``G``: the activations themselves are never required.
# ---------------------------------------------------------------------------------------------------

_WEIGHT_FLOOR = 1e-6
"""Diagonal weights below ``_WEIGHT_FLOOR * max(weight)`` are raised to that floor (ASVD/FWSVD)."""


def _as_matrix(W: np.ndarray, name: str = "W") -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"expected {name} to be a 2-D matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return W


def _as_gram(G: np.ndarray, k: int, name: str = "G") -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    if G.shape != (k, k):
        raise ValueError(f"expected {name} of shape ({k}, {k}), got {G.shape}")
    if not np.all(np.isfinite(G)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return G


def _as_vector(v: np.ndarray, size: int, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (size,):
        raise ValueError(f"expected {name} of shape ({size},), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


def _check_rank(rank: int, m: int) -> int:
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= m:
        raise ValueError(f"rank must be an integer in [1, {m}], got {rank}")
    return int(rank)


def _clamped_eigh(G: np.ndarray, rel_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition ``G = Q diag(lam) Q^T`` of the symmetrised Gram with ``lam`` clamped below
    at ``rel_eps * max(lam)``. An all-zero (or non-positive) Gram gives ``lam = 1`` (identity metric)."""
    if not rel_eps > 0.0 or not math.isfinite(rel_eps):
        raise ValueError(f"rel_eps must be a positive finite number, got {rel_eps}")
    G = 0.5 * (G + G.T)
    lam, Q = np.linalg.eigh(G)
    top = lam[-1] if lam.size else 0.0
    if not top > 0.0:
        # No calibration signal at all: every factorization has zero calibrated error, so fall back
        # to the identity metric (plain SVD) as a deterministic tie-break.
        return np.ones_like(lam), np.eye(G.shape[0])
    return np.maximum(lam, rel_eps * top), Q


def whitening_factor(G: np.ndarray, *, rel_eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """A square root ``S`` of the calibration Gram (``G ≈ S S^T``) and its inverse, from ``eigh``.

    With ``G = Q diag(lam) Q^T`` this returns ``S = Q diag(sqrt(lam_c))`` and
    ``S_inv = diag(1 / sqrt(lam_c)) Q^T`` where ``lam_c = max(lam, rel_eps * max(lam))``. Then
    ``||X M||_F = ||S^T M||_F`` for every (k, n) matrix ``M`` (exactly for the clamped Gram), which is
    the whitening used by SVD-LLM (Wang et al. 2025; they use a Cholesky factor, any square root gives
    the same optimum) and by SVD-LLM V2 / EoRA (eigen-decomposition).

    Why the clamp. ``G = X^T X`` is rank-deficient whenever the calibration set has fewer rows than
    ``k`` (few tokens), when some input features are dead (a column of ``X`` identically zero, e.g.
    after a ReLU or padding) or when features are exactly collinear; ``eigh`` also returns eigenvalues
    of size ~``k * eps * max(lam)`` (possibly negative) for directions that are numerically null.
    Without regularisation ``S`` is singular, ``S^{-1}`` does not exist and the calibrated objective is
    flat along the null directions (any behaviour of ``A @ B`` there is "optimal", including huge
    entries that would explode on real data). Raising the eigenvalues to ``rel_eps * max(lam)`` is the
    ridge-like choice ``G_c = G + E`` with ``0 <= E <= rel_eps * max(lam) * I``: the regularised
    objective ``tr(M^T G_c M)`` is strictly convex in ``M`` (so the minimiser is unique and, in null
    directions, reproduces ``W``) while differing from the true one by at most
    ``rel_eps * max(lam) * ||M||_F^2``, i.e. by at most ``rel_eps`` relative to the largest-variance
    direction. The clamp also bounds ``cond(S) <= rel_eps ** -0.5`` (1e3 by default), which keeps
    ``S_inv`` and the un-whitened factors well conditioned.

    Parameters
    ----------
    G : ndarray of shape (k, k), symmetric positive semi-definite (symmetrised internally)
    rel_eps : float > 0, relative eigenvalue floor

    Returns
    -------
    S : ndarray of shape (k, k), S_inv : ndarray of shape (k, k), with ``S_inv @ S = I``.
    An all-zero ``G`` gives ``S = S_inv = I`` (identity metric: no calibration information).
    """
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {G.shape}")
    G = _as_gram(G, G.shape[0])
    lam, Q = _clamped_eigh(G, rel_eps)
    root = np.sqrt(lam)
    return Q * root, Q.T / root[:, None]


def whitened_spectrum(W: np.ndarray, G: np.ndarray, *, rel_eps: float = 1e-6) -> np.ndarray:
    """Calibrated spectrum: the singular values of ``S^T W`` (``G ≈ S S^T``, see ``whitening_factor``).

    For ``G = X^T X`` these equal the singular values of ``X @ W`` (up to the eigenvalue clamp), so
    ``sqrt(sum(s[r:]**2))`` is the smallest achievable calibrated error ``||X (W - A B)||_F`` at rank
    ``r`` and ``relative_error_at_rank(s, r)`` / ``rank_for_energy(s, e)`` choose ranks by calibrated
    energy rather than by the weight's own spectrum (SVD-LLM, Wang et al. 2025, Thm 3.2).

    Parameters
    ----------
    W : ndarray of shape (k, n), G : ndarray of shape (k, k)

    Returns
    -------
    ndarray of shape (min(k, n),), decreasing.
    """
    W = _as_matrix(W)
    G = _as_gram(G, W.shape[0])
    lam, Q = _clamped_eigh(G, rel_eps)
    T = np.sqrt(lam)[:, None] * (Q.T @ W)
    return scipy.linalg.svdvals(T) if T.size else np.zeros(0)


def clamped_eigh(G: np.ndarray, *, rel_eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``G = Q diag(lam) Q^T`` with eigenvalues clamped at ``rel_eps * max`` (see ``whitening_factor``).

    The expensive O(k^3) step of every whitened method; compute it once per layer input and share it
    between the layers that read the same tensor (Q, K and V projections, say).
    """
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {G.shape}")
    return _clamped_eigh(_as_gram(G, G.shape[0]), rel_eps)


@dataclass
class WhitenedSVD:
    """The SVD of the whitened weight ``S^T W = U diag(s) V^T`` (a :class:`LazySVD`).

    ``s`` is the calibrated spectrum and ``factors(r)`` the optimal rank-r factors for every r (see
    ``whitened_svd``), so choosing a rank and building factors cost one SVD per weight — a randomized
    one when a single small rank is asked for before any spectrum.
    """

    svd: LazySVD
    Q: np.ndarray
    root: np.ndarray  # sqrt of the clamped eigenvalues

    col_weights: np.ndarray | None = None  # output-side weights D, if any

    @classmethod
    def fit(cls, W: np.ndarray, eig: tuple[np.ndarray, np.ndarray],
            col_weights: np.ndarray | None = None, *, solver: str = "auto") -> "WhitenedSVD":
        """``W`` of shape (k, n); ``eig = (lam, Q)`` from ``clamped_eigh`` of the (k, k) Gram.

        ``col_weights`` (n,) weight the output units: the objective becomes ``||X (W - A B) D||_F``
        with ``D = diag(col_weights)``, e.g. the square root of each unit's output sensitivity
        (a diagonal Fisher of the model output with respect to this layer's output, FWSVD-style),
        so errors are measured in their effect on the model output, not on the layer output.
        """
        W = _as_matrix(W)
        lam, Q = eig
        root = np.sqrt(lam)
        d = None if col_weights is None else _guard_weights(col_weights, W.shape[1], "col_weights")
        T = root[:, None] * (Q.T @ W)
        return cls(LazySVD(T if d is None else T * d, solver), Q, root, d)

    @property
    def s(self) -> np.ndarray:
        return self.svd.spectrum

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``A`` (k, rank) and ``B`` (rank, n) with ``A = S^{-T} U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_r^T``."""
        U, s, Vt = self.svd.top(rank)
        half = np.sqrt(s)
        A = self.Q @ ((U * half) / self.root[:, None])
        B = half[:, None] * Vt
        return A, B if self.col_weights is None else B / self.col_weights


def whitened_svd(W: np.ndarray, G: np.ndarray, rank: int, *, rel_eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factorization minimising the calibrated error ``||X (W - A B)||_F`` (SVD-LLM).

    Objective: ``min_{A, B} ||X (W - A B)||_F = ||S^T (W - A B)||_F`` with ``G = X^T X ≈ S S^T``
    (``whitening_factor``, eigenvalues clamped at ``rel_eps * max``). Because ``S`` is invertible,
    ``S^T A B`` ranges over all rank-r matrices, so Eckart–Young applied to ``T = S^T W`` gives the
    closed form: with ``T = U Σ V^T``,

        ``A = S^{-T} U_r Σ_r^{1/2}``,   ``B = Σ_r^{1/2} V_r^T``,

    and the minimum is ``sqrt(sum_{i>r} σ_i^2)`` (``whitened_spectrum``). This is the optimum of the
    clamped objective; on the raw ``G`` it is optimal up to ``rel_eps * max(eig G) * ||W - AB||_F^2``.
    Source: SVD-LLM (Wang et al. 2025, ICLR, truncation-aware data whitening; eigen-whitening as in
    SVD-LLM V2).

    Parameters
    ----------
    W : ndarray of shape (k, n), G : ndarray of shape (k, k), rank : int in [1, min(k, n)]

    Returns
    -------
    A : ndarray of shape (k, rank), B : ndarray of shape (rank, n), float64.
    """
    W = _as_matrix(W)
    k, n = W.shape
    rank = _check_rank(rank, min(k, n))
    return WhitenedSVD.fit(W, _clamped_eigh(_as_gram(G, k), rel_eps)).factors(rank)


def _weighted_svd(W: np.ndarray, rank: int, d_row: np.ndarray, d_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``min ||diag(d_row) (W - A B) diag(d_col)||_F`` for positive weights: scale, SVD, unscale."""
    A, B = truncated_svd(d_row[:, None] * W * d_col, rank)
    return A / d_row[:, None], B / d_col


def _guard_weights(w: np.ndarray | None, size: int, name: str) -> np.ndarray:
    """Positive diagonal weights: ``None`` -> ones; zeros raised to ``_WEIGHT_FLOOR * max``."""
    if w is None:
        return np.ones(size)
    w = _as_vector(w, size, name)
    if np.any(w < 0):
        raise ValueError(f"{name} must be non-negative")
    top = w.max() if w.size else 0.0
    if not top > 0.0:
        return np.ones(size)  # no information: identity weights (plain SVD)
    return np.maximum(w, _WEIGHT_FLOOR * top)


def asvd(W: np.ndarray, mean_abs: np.ndarray, rank: int, *, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Activation-aware SVD (ASVD, Yuan et al. 2023): scale input rows by activation magnitude.

    Objective: ``min_{A, B} ||diag(s) (W - A B)||_F`` with ``s = mean_abs ** alpha`` (a diagonal
    surrogate of the calibrated metric ``G``: it only knows each input channel's magnitude, not their
    correlations). Closed form: ``diag(s) W ≈ U_r Σ_r V_r^T`` (Eckart–Young), then
    ``A = diag(1/s) U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_r^T``. Zero ``s`` (dead input channels) are
    raised to ``1e-6 * max(s)`` so ``1/s`` is finite; an all-zero ``mean_abs`` gives plain SVD.

    Parameters
    ----------
    W : ndarray of shape (k, n), mean_abs : ndarray of shape (k,), non-negative
    rank : int in [1, min(k, n)], alpha : float >= 0 (0.5 in the paper; 0 gives plain SVD)

    Returns
    -------
    A : ndarray of shape (k, rank), B : ndarray of shape (rank, n).
    """
    W = _as_matrix(W)
    mean_abs = _as_vector(mean_abs, W.shape[0], "mean_abs")
    if np.any(mean_abs < 0):
        raise ValueError("mean_abs must be non-negative")
    if not alpha >= 0.0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a non-negative finite number, got {alpha}")
    # ASVD is the row-weighted SVD with weights mean|x|^alpha.
    return fisher_svd(W, rank, row_weights=mean_abs**alpha)


def fisher_svd(
    W: np.ndarray,
    rank: int,
    *,
    row_weights: np.ndarray | None = None,
    col_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted SVD with diagonal importance weights (FWSVD-style, Hsu et al. 2022, ICLR).

    Objective: ``min_{A, B} ||D_r (W - A B) D_c||_F`` with ``D_r = diag(row_weights)`` (one weight per
    input dim, k) and ``D_c = diag(col_weights)`` (one per output dim, n). Because both weights are
    diagonal and positive the problem is exactly solvable: ``D_r W D_c ≈ U_r Σ_r V_r^T``,
    ``A = D_r^{-1} U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_r^T D_c^{-1}``. FWSVD weights the rows of the
    PyTorch ``(out, in)`` weight by ``sqrt(sum_j Fisher_ij)``, i.e. one weight per *output* unit: in
    this ONNX orientation that is ``col_weights = sqrt(per-output Fisher)``, estimated elsewhere.
    Zero weights are raised to ``1e-6 * max`` so the unscaling is finite; ``None`` means all ones.

    Parameters
    ----------
    W : ndarray of shape (k, n), rank : int in [1, min(k, n)]
    row_weights : ndarray of shape (k,) or None, col_weights : ndarray of shape (n,) or None

    Returns
    -------
    A : ndarray of shape (k, rank), B : ndarray of shape (rank, n).
    """
    W = _as_matrix(W)
    k, n = W.shape
    rank = _check_rank(rank, min(k, n))
    d_row = _guard_weights(row_weights, k, "row_weights")
    d_col = _guard_weights(col_weights, n, "col_weights")
    return _weighted_svd(W, rank, d_row, d_col)


def _solve_normal(H: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Solve the symmetric PSD normal equations ``H B = R`` for the least-squares factor ``B``.

    Well-conditioned ``H`` (smallest eigenvalue above ``1e-12 * max``): Cholesky. Numerically
    singular ``H``: the minimum-norm solution ``B = H^+ R`` from ``eigh`` with eigenvalues at or below
    ``1e-12 * max`` treated as zero, i.e. the limit of the ridge ``(H + delta I)^{-1} R`` as
    ``delta -> 0``. A plain tiny ridge was tried first and rejected: in the null directions ``R`` holds
    only round-off, which a ridge ``delta`` amplifies by ``1/delta`` (about 1e-4 relative garbage in
    ``B`` for ``delta = 1e-12 * max``); truncating those directions returns exact zeros there.
    """
    H = 0.5 * (H + H.T)
    r = H.shape[0]
    lam, V = np.linalg.eigh(H)
    top = lam[-1] if r else 0.0
    if not top > 0.0:
        return np.zeros_like(R)  # X A = 0: every B gives the same objective; return the min-norm one
    cutoff = 1e-12 * top
    if lam[0] > cutoff:
        try:
            return scipy.linalg.cho_solve(scipy.linalg.cho_factor(H), R)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            pass  # borderline: fall through to the pseudo-inverse
    keep = lam > cutoff
    Vk = V[:, keep]
    return Vk @ ((Vk.T @ R) / lam[keep][:, None])


def refit_output_factor(W: np.ndarray, A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Calibrated refit of the output factor: with ``A`` fixed, the ``B`` minimising ``||X W - X A B||_F``.

    Objective: ``min_B tr((W - A B)^T G (W - A B))``, a least-squares problem in ``B`` whose normal
    equations give ``B = (A^T G A)^{-1} A^T G W`` (solved by Cholesky; when ``A^T G A`` is
    numerically singular, e.g. ``rank(G) < r``, the minimum-norm minimiser ``(A^T G A)^+ A^T G W`` with
    eigenvalues below ``1e-12 * max`` dropped: the zero-ridge limit, see ``_solve_normal``).

    Why the output factor. In this orientation the layer is ``Y = (X A) B``: ``X`` multiplies ``A``
    first. Refitting ``A`` with ``B`` fixed minimises ``||X (W - A B)||_F`` over ``A``, whose
    stationarity condition ``G (W - A B) B^T = 0`` is solved by ``A = W B^T (B B^T)^{-1}`` whatever
    ``G`` is: the data cannot help there (it is the data-free projection onto the row space of ``B``).
    Only the output factor ``B`` sees the calibration statistics. (SVD-LLM's "parameter update" refits
    the corresponding factor by least squares; see Wang et al. 2025.)

    Caveat: with a rank-deficient ``G`` (fewer rows than ``k``, dead features) the minimiser is not
    unique and the returned ``B`` is the minimum-norm one, which does *not* reproduce
    ``W`` along input directions the calibration data never excite (even at full rank). To stay close
    to ``W`` there, pass the clamped Gram ``S @ S.T`` from ``whitening_factor`` instead (as ``isvt``
    does).

    Parameters
    ----------
    W : ndarray of shape (k, n), A : ndarray of shape (k, r), G : ndarray of shape (k, k)

    Returns
    -------
    B : ndarray of shape (r, n)
    """
    W = _as_matrix(W)
    A = _as_matrix(A, "A")
    if A.shape[0] != W.shape[0]:
        raise ValueError(f"A has {A.shape[0]} rows, W has {W.shape[0]}")
    G = _as_gram(G, W.shape[0])
    GA = (0.5 * (G + G.T)) @ A
    return _solve_normal(A.T @ GA, GA.T @ W)


def refit_output_factor_cross(W: np.ndarray, A: np.ndarray, G_hat: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Sequential refit of ``B``: match the ORIGINAL output ``X W`` from the compressed model's input.

    In a sequentially compressed network the layer's input is ``X_hat`` (produced by already-compressed
    upstream layers) while the target stays the original output ``X W``. Objective:
    ``min_B ||X W - X_hat A B||_F``, with normal equations ``(A^T G_hat A) B = A^T C W`` where
    ``G_hat = X_hat^T X_hat`` (k, k) and ``C = X_hat^T X`` (k, k cross Gram, not symmetric). So
    ``B = (A^T G_hat A)^{-1} A^T C W`` (same Cholesky / pseudo-inverse solve as ``refit_output_factor``, which
    this equals when ``X_hat = X``, i.e. ``C = G_hat = G``). Cf. SVD-LLM's sequential update
    (Wang et al. 2025), which propagates inputs through already-compressed layers.

    Parameters
    ----------
    W : ndarray of shape (k, n), A : ndarray of shape (k, r)
    G_hat : ndarray of shape (k, k), C : ndarray of shape (k, k), ``C = X_hat^T X``

    Returns
    -------
    B : ndarray of shape (r, n)
    """
    W = _as_matrix(W)
    A = _as_matrix(A, "A")
    k = W.shape[0]
    if A.shape[0] != k:
        raise ValueError(f"A has {A.shape[0]} rows, W has {k}")
    G_hat = _as_gram(G_hat, k, "G_hat")
    C = _as_gram(C, k, "C")
    G_hat = 0.5 * (G_hat + G_hat.T)
    return _solve_normal(A.T @ (G_hat @ A), A.T @ (C @ W))


def sequential_target(W: np.ndarray, G_hat: np.ndarray, C: np.ndarray, *,
                      eig: tuple[np.ndarray, np.ndarray] | None = None, rel_eps: float = 1e-6,
                      ridge: float = 0.1) -> np.ndarray:
    """The weight a layer should approximate once its input has drifted from ``X`` to ``X_hat``.

    In a sequentially compressed network the layer sees ``X_hat`` (produced by already-compressed
    upstream layers) but should still produce the original output ``X W``. Objective:
    ``min_P ||X_hat P - X W||_F``. Its unconstrained minimiser is ``W* = G_hat^{-1} C W`` with
    ``G_hat = X_hat^T X_hat`` and the cross Gram ``C = X_hat^T X`` (k, k), and for every ``P``
    ``||X_hat P - X W||^2 = ||X_hat (P - W*)||^2 + const``: a whitened SVD of ``W*`` under ``G_hat``
    is therefore the exact rank-r optimum of the sequential objective (SVD-LLM's sequential update,
    Wang et al. 2025, solved jointly instead of refitting one factor).

    Computed as ``W + G_hat^+ (C - G_hat) W`` with the pseudo-inverse from the eigen-decomposition of
    ``G_hat`` clamped at ``rel_eps * max`` (the whitening regulariser): along directions the calibration
    data barely excite the correction vanishes and ``W`` is kept, and ``X_hat = X`` gives ``W`` exactly.

    ``ridge`` shrinks the correction: ``G_hat`` is replaced by ``G_hat + ridge * mean(eig G_hat) I`` in
    the inverse only. The correction is a regression of the drift on ``X_hat`` with ``k * k``
    coefficients, fitted from the calibration rows (7.6k rows against k = 1536 on MiniLM): unshrunk
    it overfits (the ridge was chosen on MiniLM: docs/benchmarks.md, "Design measurements").

    Parameters
    ----------
    W : ndarray of shape (k, n), G_hat : ndarray of shape (k, k), C : ndarray of shape (k, k)
    eig : ``clamped_eigh(G_hat, rel_eps=rel_eps)`` if already computed.

    Returns
    -------
    W_target : ndarray of shape (k, n)
    """
    W = _as_matrix(W)
    k = W.shape[0]
    G_hat = _as_gram(G_hat, k, "G_hat")
    C = _as_gram(C, k, "C")
    lam, Q = eig if eig is not None else clamped_eigh(G_hat, rel_eps=rel_eps)
    lam = lam + ridge * lam.mean()
    drift = C @ W - (0.5 * (G_hat + G_hat.T)) @ W  # X_hat^T (X - X_hat) W
    return W + Q @ ((Q.T @ drift) / lam[:, None])


def bias_correction(W: np.ndarray, A: np.ndarray, B: np.ndarray, mu: np.ndarray,
                    mu_hat: np.ndarray | None = None) -> np.ndarray:
    """Bias shift that makes the mean output error of the factorization zero.

    The compressed layer's output error on a row ``x`` is ``x (W - A B)``; its mean over the
    calibration rows is ``mu (W - A B)``. Adding ``delta_b = mu @ (W - A B)`` to the bias zeroes it
    (and, among all constant shifts, minimises the calibrated error ``||X W + b - (X A B + b')||_F``).
    Lineage: AIMET bias correction (Nagel et al. 2019, data-free quantization); the same fold appears
    with centred whitening in SVD-LLM-style pipelines.

    Parameters
    ----------
    W : ndarray of shape (k, n), A : ndarray of shape (k, r), B : ndarray of shape (r, n)
    mu : ndarray of shape (k,), mean calibration input row
    mu_hat : ndarray of shape (k,), mean input row of the compressed layer when it differs from the
        original's (sequential compression): the shift is then ``mu W - mu_hat A B``.

    Returns
    -------
    delta_b : ndarray of shape (n,)
    """
    W = _as_matrix(W)
    A = _as_matrix(A, "A")
    B = _as_matrix(B, "B")
    k, n = W.shape
    if A.shape[0] != k or B.shape[1] != n or A.shape[1] != B.shape[0]:
        raise ValueError(f"factor shapes {A.shape} @ {B.shape} do not match W {W.shape}")
    mu = _as_vector(mu, k, "mu")
    mu_hat = mu if mu_hat is None else _as_vector(mu_hat, k, "mu_hat")
    return mu @ W - (mu_hat @ A) @ B


def calibration_error(W: np.ndarray, A: np.ndarray, B: np.ndarray, G: np.ndarray) -> float:
    """Relative calibrated error ``||X (W - A B)||_F / ||X W||_F`` computed from ``G = X^T X`` only.

    ``= sqrt(tr(E^T G E) / tr(W^T G W))`` with ``E = W - A B``. Uses the raw ``G`` (no clamp): this
    is the quantity the calibrated methods are judged by. Resolution: computed from ``G`` alone, the
    squared ratio carries round-off of order ``eps * max(eig G) * ||E||_F^2 / tr(W^T G W)``, so when
    ``E`` has large components in directions the data never excite the returned value has a floor of
    about ``1e-8`` (sqrt of eps) even if ``X E`` is exactly zero. Returns 0.0 when both traces are zero and
    ``inf`` when only the denominator is (the layer's output is identically zero on the calibration
    data but the factorization's is not).

    Parameters
    ----------
    W : ndarray of shape (k, n), A : ndarray of shape (k, r), B : ndarray of shape (r, n),
    G : ndarray of shape (k, k)
    """
    return output_error(W, _as_matrix(A, "A") @ _as_matrix(B, "B"), G)


def output_error(W: np.ndarray, W_hat: np.ndarray, G: np.ndarray) -> float:
    """Relative calibrated error ``||X (W - W_hat)||_F / ||X W||_F`` of any approximation ``W_hat`` (k, n)
    of ``W`` (k, n) — factorized, quantized, pruned — from ``G = XᵀX`` (k, k) alone; see
    :func:`calibration_error` for its resolution and edge cases."""
    W = _as_matrix(W)
    W_hat = _as_matrix(W_hat, "W_hat")
    G = _as_gram(G, W.shape[0])
    E = W - W_hat
    G = 0.5 * (G + G.T)
    num = max(float(np.sum(E * (G @ E))), 0.0)  # round-off can push a PSD form slightly negative
    den = max(float(np.sum(W * (G @ W))), 0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def _soft_threshold(s: np.ndarray, rank: int, max_iter: int, tol: float) -> tuple[float, list[float], bool, int]:
    """Bisect the threshold ``tau`` on ``[0, s_1]`` so that soft thresholding keeps at most ``rank`` values
    (see :func:`isvt`): ``(tau, relative objective per step, converged, iterations)``."""
    scale = float(np.sum(s**2))

    def soft_objective(tau: float) -> float:
        # ||T - SVT_tau(T)||^2 = sum min(s, tau)^2, relative to ||T||^2 = ||X W||^2
        return float(np.sum(np.minimum(s, tau) ** 2)) / scale if scale > 0 else 0.0

    lo, hi = 0.0, float(s[0]) if s.size else 0.0  # soft rank(hi) = 0 <= rank; soft rank(lo) may exceed it
    history: list[float] = []
    iterations = 0
    for iterations in range(1, max_iter + 1):
        mid = 0.5 * (lo + hi)
        if np.count_nonzero(s > mid) <= rank:
            hi = mid
        else:
            lo = mid
        history.append(soft_objective(hi))  # the soft iterate prox_{hi}(T) of this step
        if soft_objective(hi) - soft_objective(lo) <= tol:
            return hi, history, True, iterations
    return hi, history, False, iterations


def isvt(W: np.ndarray, G: np.ndarray, rank: int, *, max_iter: int = 50, tol: float = 1e-6, rel_eps: float = 1e-6,
         eig: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Iterative singular-value thresholding under a soft rank constraint (Shumaylov et al. 2025).

    Soft problem (in whitened coordinates ``Z = S^T M``, ``T = S^T W``, ``G ≈ S S^T`` clamped as in
    ``whitening_factor``)::

        min_Z  1/2 ||T - Z||_F^2 + tau ||Z||_*      (= 1/2 ||X (W - M)||_F^2 + tau ||S^T M||_*)

    Each iteration is one proximal-gradient step (gradient ``Z - T``, Lipschitz constant 1, step 1):
    ``Z <- prox_{tau ||.||_*}(T)``, soft thresholding of the singular values of ``T`` by ``tau`` (one SVD
    of ``T``, reused). ``tau`` is bisected on ``[0, sigma_1(T)]`` so that the soft solution concentrates its
    energy on ``rank`` values: the upper bracket always has at most ``rank`` non-zero soft singular
    values, the lower bracket more. Convergence test: the relative change of the calibrated
    objective ``||T - Z||_F^2 / ||T||_F^2`` across the bracket falls below ``tol`` (this bounds the
    change still possible before the bracket closes at ``tau* = sigma_{rank+1}(T)``). Finally the soft
    iterate is hard-truncated to ``rank`` (its left singular vectors give ``A = S^{-T} U_r``, scaled for
    balance) and ``B`` is refitted with ``refit_output_factor`` on the clamped Gram.

    For one layer in isolation the hard-rank closed form (``whitened_svd``) is already optimal and every
    soft iterate shares the singular vectors of ``T``, so ``A @ B`` equals ``whitened_svd``'s product up
    to round-off; what differs is the soft-rank path (``info``), the shrunk estimate Shumaylov et al.
    (arXiv 2507.09428) argue trains better than hard truncation.

    Parameters
    ----------
    W : ndarray of shape (k, n), G : ndarray of shape (k, k), rank : int in [1, min(k, n)]
    max_iter : int >= 1, tol : float > 0, rel_eps : eigenvalue clamp of the whitening
    eig : ``clamped_eigh(G)`` if already computed (it is the O(k^3) part)

    Returns
    -------
    A : ndarray of shape (k, rank), B : ndarray of shape (rank, n), info : dict with
    ``iterations`` (int), ``objective_history`` (list of relative calibrated objectives
    ``||X(W - M_t)||^2 / ||X W||^2`` of the soft iterates, clamped Gram), ``converged`` (bool),
    ``tau`` (final threshold) and ``soft_rank`` (non-zero singular values of the final soft iterate).
    """
    W = _as_matrix(W)
    k, n = W.shape
    G = _as_gram(G, k)
    rank = _check_rank(rank, min(k, n))
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter}")
    if not tol > 0.0:
        raise ValueError(f"tol must be positive, got {tol}")
    lam, Q = eig if eig is not None else _clamped_eigh(G, rel_eps)
    root = np.sqrt(lam)
    U, s, Vt = svd(root[:, None] * (Q.T @ W))
    hi, history, converged, iterations = _soft_threshold(s, rank, int(max_iter), tol)
    soft = np.maximum(s - hi, 0.0)
    # Hard truncation to `rank`: U is ordered by the singular values of T, which is also the order of
    # the soft values (ties and zeros included), then refit B on the clamped Gram.
    balance = np.sqrt(s[:rank])
    balance[balance == 0.0] = 1.0
    A = Q @ ((U[:, :rank] * balance) / root[:, None])
    G_c = (Q * lam) @ Q.T
    B = refit_output_factor(W, A, G_c)
    info = {
        "iterations": iterations,
        "objective_history": history,
        "converged": converged,
        "tau": hi,
        "soft_rank": int(np.count_nonzero(soft > 0.0)),
    }
    return A, B, info
