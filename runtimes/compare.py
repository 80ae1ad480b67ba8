"""Numerical comparison of a model's outputs with a reference's (plain numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OutputComparison:
    """Agreement of one output with the reference, over all samples.

    max_abs : largest absolute difference.
    rel_l2 : ``||out - ref|| / ||ref||`` over the whole tensor.
    cosine : cosine similarity of the flattened tensors.
    cosine_min : the worst per-sample (axis 0) cosine; equals ``cosine`` for 0-/1-D outputs.
    kl : mean over rows of KL(softmax(ref) ‖ softmax(out)) along the last axis (for logits).
    top1 : share of rows whose argmax along the last axis agrees with the reference's.
    """

    name: str
    shape: list[int]
    max_abs: float
    rel_l2: float
    cosine: float
    cosine_min: float
    kl: float = 0.0
    top1: float = 1.0


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of 2-D arrays; two zero rows agree perfectly (1.0)."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def compare(name: str, reference: np.ndarray, output: np.ndarray) -> OutputComparison:
    """Compare ``output`` with ``reference`` (same shape) in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output {name!r}: shape {list(out.shape)} differs from reference {list(ref.shape)}")
    diff = out - ref
    ref_norm = np.linalg.norm(ref)
    if ref_norm > 0:
        rel = float(np.linalg.norm(diff) / ref_norm)
    else:
        rel = 0.0 if not diff.any() else float("inf")
    cosine = float(_cosine(ref.reshape(1, -1), out.reshape(1, -1))[0])
    # per sample (axis 0); an empty output ([0, 8], [3, 0]) agrees trivially (reshape(0, -1) is ambiguous)
    rows = ref.reshape(ref.shape[0], -1) if ref.ndim >= 2 and ref.size else ref.reshape(1, -1)
    cosine_min = float(_cosine(rows, out.reshape(rows.shape)).min()) if rows.size else 1.0
    # rows along the last axis (a scalar is one row of one); an empty output agrees trivially
    last = ref.reshape(-1, ref.shape[-1]) if ref.ndim and ref.size else ref.reshape(1, -1)
    out_last = out.reshape(last.shape)
    return OutputComparison(
        name=name,
        shape=list(ref.shape),
        max_abs=float(np.abs(diff).max()) if diff.size else 0.0,
        rel_l2=rel,
        cosine=cosine,
        cosine_min=cosine_min,
        kl=kl_softmax(last, out_last) if last.size else 0.0,
        top1=float(np.mean(last.argmax(axis=-1) == out_last.argmax(axis=-1))) if last.size else 1.0,
    )


def kl_softmax(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean over rows of KL(softmax(ref) ‖ softmax(out)) along the last axis."""
    lp, lq = _log_softmax(np.asarray(ref, np.float64)), _log_softmax(np.asarray(out, np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


TOLERANCE_METRICS = {
    # metric -> (what is compared, True if larger is better)
    "rel_l2": ("relative L2 error", False),
    "max_abs": ("max abs error", False),
    "cosine": ("worst per-sample cosine", True),
    "kl": ("KL divergence of the softmax (last axis)", False),
    "top1": ("top-1 agreement (last axis)", True),
}


@dataclass
class Tolerance:
    """A bound every output must meet: ``rel_l2``/``max_abs``/``kl`` at most ``value``, ``cosine``
    (worst sample) and ``top1`` at least."""

    metric: str
    value: float

    def holds(self, comparison: OutputComparison) -> bool:
        got = comparison.cosine_min if self.metric == "cosine" else getattr(comparison, self.metric)
        return got >= self.value if TOLERANCE_METRICS[self.metric][1] else got <= self.value

    def __str__(self) -> str:
        what, larger_better = TOLERANCE_METRICS[self.metric]
        return f"{what} {'>=' if larger_better else '<='} {self.value:g}"
