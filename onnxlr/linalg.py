"""Plain numpy linear algebra behind the rewrites: no ONNX here, only arrays.

Notation follows ONNX: a layer computes ``Y = X @ W`` with ``W`` of shape ``(k, n)`` (k inputs,
n outputs). A rank-r factorization replaces ``W`` by ``A @ B`` with ``A`` of shape ``(k, r)`` and ``B``
of shape ``(r, n)``: parameters and multiply-adds per row go from ``k*n`` to ``r*(k+n)``, so a
factorization only pays when ``r < k*n / (k+n)`` (the break-even rank).
"""

from __future__ import annotations

import math

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


def truncated_svd(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factorization of ``W`` in Frobenius norm (Eckart–Young).

    The singular values are split evenly between the factors (``A = U_r sqrt(S_r)``,
    ``B = sqrt(S_r) V_r^T``) so that both factors have similar magnitudes, which keeps float16 and
    quantized factors well-conditioned.

    Parameters
    ----------
    W : ndarray of shape (k, n)
    rank : int, 1 <= rank <= min(k, n)

    Returns
    -------
    A : ndarray of shape (k, rank), B : ndarray of shape (rank, n), both float64.
    """
    U, s, Vt = svd(W)
    if not 1 <= rank <= s.size:
        raise ValueError(f"rank must be in [1, {s.size}], got {rank}")
    root = np.sqrt(s[:rank])
    return U[:, :rank] * root, root[:, None] * Vt[:rank]


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


def relative_error_at_rank(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error ``||W - A B|| / ||W||`` of the best rank-``rank`` approximation."""
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum()
    # Summing the tail directly (not 1 - kept share) stays accurate when the error is tiny.
    return float(np.sqrt(sq[rank:].sum() / total)) if total > 0 else 0.0
