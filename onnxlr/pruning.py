"""Plain numpy pruning math: which weights or hidden units to remove, and how to compensate.

Notation follows :mod:`onnxlr.linalg`: a layer computes ``Y = X @ W + b`` with ``W`` of shape ``(k, n)``
(k inputs, n outputs), X rows of length k. Calibration statistics are Gram matrices ``G = XᵀX``
summed over rows (float64), means and row counts, as collected by :mod:`onnxlr.runtimes.stats`.

Two kinds of pruning:

- *Unstructured / N:M*: zero single weights (magnitude or Wanda scores). Shapes stay the same, so
  the model only gets smaller or faster on a runtime with sparse kernels or after compression.
- *Structured*: remove hidden units of a two-layer block ``H = act(X W1 + b1)``, ``Y = H W2 + b2``:
  columns of W1 and entries of b1, rows of W2. This really shrinks the matrices. What the removed
  units carried is compensated in closed form (least-squares refit of W2 on the kept units and a
  bias fold of their mean), see :func:`refit_second_layer`.
"""

from __future__ import annotations

import math

import numpy as np

from onnxlr.linalg import _as_matrix, _as_vector  # the same input checks as the other math

# ------------------------------------------------------------------------------ unstructured / N:M


def magnitude_scores(W: np.ndarray) -> np.ndarray:
    """Importance of each weight by magnitude: ``|W|``, shape (k, n)."""
    return np.abs(_as_matrix(W, "W"))


def wanda_scores(W: np.ndarray, input_sq_norm: np.ndarray) -> np.ndarray:
    """Wanda importance ``|W_ij| * sqrt(input_sq_norm_i)`` (Sun et al. 2023): a weight matters as much
    as it is large *and* as its input feature is large on real data.

    Parameters
    ----------
    W : ndarray of shape (k, n)
    input_sq_norm : ndarray of shape (k,), squared norm of each input feature over the calibration
        rows, i.e. the diagonal of ``XᵀX`` (any common positive scale gives the same masks).

    Returns
    -------
    scores : ndarray of shape (k, n)
    """
    W = _as_matrix(W, "W")
    norms = _as_vector(input_sq_norm, W.shape[0], "input_sq_norm")
    return np.abs(W) * np.sqrt(np.maximum(norms, 0.0))[:, None]


def unstructured_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask removing the ``floor(sparsity * k)`` lowest-scoring weights of every output column.

    Per column is Wanda's comparison group: each output unit loses the same share of its inputs, so
    no unit is silenced. Ties are broken by input index (lower index removed first).

    Parameters
    ----------
    scores : ndarray of shape (k, n)
    sparsity : float in [0, 1), share of each column to remove.

    Returns
    -------
    keep : bool ndarray of shape (k, n)
    """
    scores = _as_matrix(scores, "scores")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    k = scores.shape[0]
    removed = int(math.floor(sparsity * k))
    keep = np.ones(scores.shape, dtype=bool)
    lowest = np.argsort(scores, axis=0, kind="stable")[:removed]  # (removed, n) row indices per column
    np.put_along_axis(keep, lowest, False, axis=0)
    return keep


def nm_mask(scores: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """N:M keep-mask: exactly ``n`` kept in every group of ``m`` consecutive entries along the input
    axis k (the reduction axis, the layout 2:4 sparse tensor cores require), the highest-scoring ones.

    Parameters
    ----------
    scores : ndarray of shape (k, n_out), k divisible by m
    n, m : ints with 0 <= n <= m

    Returns
    -------
    keep : bool ndarray of shape (k, n_out)
    """
    scores = _as_matrix(scores, "scores")
    if not (isinstance(m, (int, np.integer)) and isinstance(n, (int, np.integer)) and 0 <= n <= m and m >= 1):
        raise ValueError(f"an N:M pattern needs integers 0 <= n <= m, m >= 1; got {n}:{m}")
    k, cols = scores.shape
    if k % m:
        raise ValueError(f"{n}:{m} sparsity needs the input size k divisible by {m}, got k = {k}")
    groups = scores.reshape(k // m, m, cols)
    # Highest scores first within each group; ties keep the lower index.
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(k, cols)


def hidden_unit_scores(W2: np.ndarray, hidden_gram_diag: np.ndarray) -> np.ndarray:
    """Score of each hidden unit j of ``Y = H W2 + b2``: ``||W2[j, :]||_2 * sqrt(E[h_j²])``, the root
    output energy the unit contributes on its own.

    Parameters
    ----------
    W2 : ndarray of shape (h, n)
    hidden_gram_diag : ndarray of shape (h,), second moment of each unit over the calibration rows
        (diagonal of ``HᵀH``, any common scale). Pass the *centered* diagonal (variances) when the
        units' means are folded into the bias: then only their variation is lost.

    Returns
    -------
    scores : ndarray of shape (h,)
    """
    W2 = _as_matrix(W2, "W2")
    moments = _as_vector(hidden_gram_diag, W2.shape[0], "hidden_gram_diag")
    return np.linalg.norm(W2, axis=1) * np.sqrt(np.maximum(moments, 0.0))


def weight_norm_scores(W1: np.ndarray, W2: np.ndarray, unit_scale: np.ndarray | None = None) -> np.ndarray:
    """Data-free score of each hidden unit: ``||W1[:, j]|| * |unit_scale_j| * ||W2[j, :]||``.

    Parameters
    ----------
    W1 : ndarray of shape (k, h), W2 : ndarray of shape (h, n)
    unit_scale : ndarray of shape (h,), a per-unit gain between the layers (e.g. a BatchNorm's
        ``gamma / sqrt(var + eps)``), which multiplies what the unit passes on; None: 1.

    Returns
    -------
    scores : ndarray of shape (h,)
    """
    W1 = _as_matrix(W1, "W1")
    W2 = _as_matrix(W2, "W2")
    if W1.shape[1] != W2.shape[0]:
        raise ValueError(f"W1 has {W1.shape[1]} columns, W2 has {W2.shape[0]} rows")
    scores = np.linalg.norm(W1, axis=0) * np.linalg.norm(W2, axis=1)
    if unit_scale is not None:
        scores = scores * np.abs(_as_vector(unit_scale, W1.shape[1], "unit_scale"))
    return scores


def kept_count(hidden: int, ratio: float, multiple: int = 8) -> int:
    """How many of ``hidden`` units to keep when removing share ``ratio``: ``hidden * (1 - ratio)``
    rounded *up* to a multiple of ``multiple`` (hardware-friendly sizes; rounding up never removes
    more than asked), at most ``hidden``, at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    target = hidden * (1.0 - ratio)
    return max(1, min(hidden, multiple * math.ceil(target / multiple - 1e-9)))


def top_units(scores: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` highest scores (ties keep the lower index)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count])


def _check_keep(keep: np.ndarray, h: int) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.ndim != 1 or keep.size == 0 or not np.issubdtype(keep.dtype, np.integer):
        raise ValueError("keep must be a non-empty 1-D array of integer unit indices")
    if np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= h:
        raise ValueError(f"keep must be strictly increasing indices in [0, {h})")
    return keep


def refit_second_layer(W2: np.ndarray, keep: np.ndarray, hidden_gram: np.ndarray | None = None,
                       hidden_mean: np.ndarray | None = None, hidden_count: int | None = None, *,
                       ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """The second layer after its hidden units are cut to ``keep``, and the shift its bias needs.

    Derivation. On calibration rows, the original output is ``Y = H W2 + 1 b2ᵀ``; after pruning it is
    ``Y' = H_K W' + 1 b'ᵀ`` (K kept, R removed units). Minimising ``||Y - Y'||_F`` over the affine map
    ``(W', b')``: for any W' the best bias matches the means, ``b' = b2 + μ W2 - μ_K W'``; substituting
    it leaves ``||Hc W2 - Hc_K W'||_F`` with the centered rows ``Hc = H - 1 μ``, whose normal equations
    give ``W' = C_KK⁻¹ C_K: W2 = W2_K + C_KK⁻¹ C_KR W2_R`` with the centered Gram ``C = HᵀH - N μ μᵀ``.
    So the refit is exact (the optimal affine fit) with the *centered* Gram together with that bias;
    the raw Gram is only right when there is no bias to adjust. The second form shows what happens:
    the removed units are replaced by their least-squares prediction from the kept ones.

    The ridge ``lam = ridge * mean(diag C_KK)`` pulls W' towards W2_K rather than towards zero: along
    directions the calibration data never excite (dead units), the original weights are kept.

    Parameters
    ----------
    W2 : ndarray of shape (h, n)
    keep : int ndarray of shape (h_kept,), strictly increasing unit indices
    hidden_gram : ndarray of shape (h, h), ``HᵀH`` summed over the calibration rows; None: no refit
        (W' = W2[keep])
    hidden_mean : ndarray of shape (h,), mean calibration row of H; None: the bias is not adjusted
        (and a refit uses the raw Gram, the optimal linear fit)
    hidden_count : number of rows behind ``hidden_gram``; required to center it when both the Gram
        and the mean are given
    ridge : relative ridge of the refit

    Returns
    -------
    W2_kept : ndarray of shape (h_kept, n)
    bias_shift : ndarray of shape (n,), to add to b2 (zeros without ``hidden_mean``)
    """
    W2 = _as_matrix(W2, "W2")
    h, n = W2.shape
    keep = _check_keep(keep, h)
    removed = np.setdiff1d(np.arange(h), keep)
    W2_kept = W2[keep].copy()
    if hidden_gram is not None and removed.size:
        G = np.asarray(hidden_gram, dtype=np.float64)
        if G.shape != (h, h):
            raise ValueError(f"expected hidden_gram of shape ({h}, {h}), got {G.shape}")
        if hidden_mean is not None:
            if hidden_count is None:
                raise ValueError("hidden_count is needed to center hidden_gram when hidden_mean is given")
            mu = _as_vector(hidden_mean, h, "hidden_mean")
            G = G - hidden_count * np.outer(mu, mu)
        G = 0.5 * (G + G.T)
        G_kk = G[np.ix_(keep, keep)]
        scale = float(np.trace(G_kk)) / keep.size
        if scale > 0.0:  # all-zero statistics carry no information: keep W2[keep]
            G_kk[np.diag_indices_from(G_kk)] += ridge * scale
            W2_kept += np.linalg.solve(G_kk, G[np.ix_(keep, removed)] @ W2[removed])
    shift = np.zeros(n)
    if hidden_mean is not None:
        mu = _as_vector(hidden_mean, h, "hidden_mean")
        shift = mu @ W2 - mu[keep] @ W2_kept
    return W2_kept, shift


def prune_hidden_units(W1: np.ndarray, b1: np.ndarray | None, W2: np.ndarray, b2: np.ndarray | None,
                       keep: np.ndarray, hidden_gram: np.ndarray | None = None,
                       hidden_mean: np.ndarray | None = None, hidden_count: int | None = None, *,
                       ridge: float = 1e-6):
    """Remove the hidden units not in ``keep`` from ``H = act(X W1 + b1)``, ``Y = H W2 + b2``.

    W1 loses columns and b1 entries (exact: the kept units compute what they did), W2 loses rows.
    With ``hidden_gram`` W2 is refitted on the kept units; with ``hidden_mean`` the removed units'
    mean contribution is folded into b2 (``b2 + μ_R W2_R`` without a refit). See
    :func:`refit_second_layer` for the derivation and parameters.

    Parameters
    ----------
    W1 : ndarray of shape (k, h), b1 : ndarray of shape (h,) or None
    W2 : ndarray of shape (h, n), b2 : ndarray of shape (n,) or None (zero)
    keep : int ndarray of shape (h_kept,), strictly increasing

    Returns
    -------
    W1' (k, h_kept), b1' (h_kept,) or None, W2' (h_kept, n), b2' (n,) or None when b2 was None and no
    shift was computed. Float64.
    """
    W1 = _as_matrix(W1, "W1")
    h = W1.shape[1]
    if np.shape(W2)[0] != h:
        raise ValueError(f"W1 has {h} columns, W2 has {np.shape(W2)[0]} rows")
    keep = _check_keep(keep, h)
    W2_kept, shift = refit_second_layer(W2, keep, hidden_gram, hidden_mean, hidden_count, ridge=ridge)
    b1_kept = None if b1 is None else _as_vector(b1, h, "b1")[keep]
    if b2 is None:
        b2_new = shift if hidden_mean is not None else None
    else:
        b2_new = _as_vector(b2, W2_kept.shape[1], "b2") + shift
    return W1[:, keep], b1_kept, W2_kept, b2_new
