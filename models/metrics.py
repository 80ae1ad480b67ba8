"""Plain-numpy quality measures for comparing a transformed model with its reference.

* embeddings (MiniLM): ``cosine_rows`` (does each sentence keep its direction?)
  and ``topk_overlap`` (does each sentence keep its nearest neighbours?);
* classifiers (MNIST): ``accuracy`` against labels and ``top1_agreement``
  between two models' predictions.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows.

    a, b: ``[N, D]``. Returns ``[N]`` float64 in [-1, 1]; an all-zero row gives 0.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, D] arrays of equal shape, got {a.shape} and {b.shape}")
    return np.sum(_unit_rows(a) * _unit_rows(b), axis=1)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` indices of each row's k most cosine-similar other rows."""
    u = _unit_rows(x)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)  # a row is not its own neighbour
    return np.argpartition(-sim, k - 1, axis=1)[:, :k]


def topk_overlap(ref: np.ndarray, cand: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours (by cosine, itself excluded)
    under ``ref`` that are still among its k nearest under ``cand``.

    ref, cand: ``[N, D]`` and ``[N, D']`` embeddings of the same N items
    (N > k). Returns a float in [0, 1]; 1.0 means every neighbourhood is kept.
    Exact ties in similarity are broken arbitrarily.
    """
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.ndim != 2 or cand.ndim != 2 or len(ref) != len(cand):
        raise ValueError(f"need two [N, D] arrays with the same N, got {ref.shape} and {cand.shape}")
    if not 0 < k < len(ref):
        raise ValueError(f"k must be in [1, N-1] = [1, {len(ref) - 1}], got {k}")
    a, b = _neighbours(ref, k), _neighbours(cand, k)
    kept = [len(np.intersect1d(ra, rb, assume_unique=True)) for ra, rb in zip(a, b)]
    return float(np.mean(kept) / k)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax equals the label.

    logits: ``[N, C]``; labels: ``[N]`` integer class ids. Returns a float in [0, 1].
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"need [N, C] logits and [N] labels, got {logits.shape} and {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Share of rows where two models predict the same class.

    logits_a, logits_b: ``[N, C]``. Returns a float in [0, 1].
    """
    logits_a, logits_b = np.asarray(logits_a), np.asarray(logits_b)
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f"need two [N, C] arrays of equal shape, got {logits_a.shape} and {logits_b.shape}")
    return float(np.mean(np.argmax(logits_a, axis=1) == np.argmax(logits_b, axis=1)))
