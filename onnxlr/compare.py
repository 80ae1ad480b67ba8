"""Numerical comparison of a model's outputs with a reference's (plain numpy): the figures the
report shows, the tolerances ``--max-error`` sets on them, and the divergences searches minimise."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import numpy as np

from onnxlr.errors import OnnxlrError


@dataclass
class OutputComparison:
    """Agreement of one output with the reference, over all samples.

    max_abs : largest absolute difference.
    rel_l2 : ``||out - ref|| / ||ref||`` over the whole tensor.
    cosine : cosine similarity of the flattened tensors.
    cosine_min : the worst per-sample (axis 0) cosine; equals ``cosine`` for 0-/1-D outputs.
    kl : mean over rows of KL(softmax(ref) ‖ softmax(out)) along the last axis (for logits).
    top1 : share of rows whose argmax along the last axis agrees with the reference's.
    agreement : for an integer or boolean output (class labels, indices, masks), the share of its
        elements equal to the reference's — the one figure that means something for them; the float
        figures above are then None. None for float outputs.
    kind : ``tensor``, or the ONNX type of an output that is not a tensor (a ZipMap's sequence of maps),
        compared as its dense form (``runtimes.runner.dense``).
    """

    name: str
    shape: list[int]
    max_abs: float
    rel_l2: float | None
    cosine: float | None
    cosine_min: float | None
    kl: float | None = 0.0
    top1: float | None = 1.0
    agreement: float | None = None
    kind: str = "tensor"

    @property
    def exact(self) -> bool:
        """Compared by exact agreement (an integer or boolean output)."""
        return self.agreement is not None


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of 2-D arrays; two zero rows agree perfectly (1.0)."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def compare(name: str, reference: np.ndarray, output: np.ndarray, kind: str = "tensor") -> OutputComparison:
    """Compare ``output`` with ``reference`` (same shape): integer and boolean outputs by exact
    agreement, float ones in float64."""
    reference, output = np.asarray(reference), np.asarray(output)
    if reference.shape != output.shape:
        raise ValueError(f"output {name!r}: shape {list(output.shape)} differs from reference {list(reference.shape)}")
    if reference.dtype == np.bool_ or np.issubdtype(reference.dtype, np.integer):
        equal = reference == output
        diff = np.abs(reference.astype(np.float64) - output.astype(np.float64))
        return OutputComparison(name, list(reference.shape), float(diff.max()) if diff.size else 0.0, None, None, None,
                                None, None, agreement=float(equal.mean()) if equal.size else 1.0, kind=kind)
    ref = reference.astype(np.float64)
    out = output.astype(np.float64)
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
        kind=kind,
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
    (worst sample) and ``top1`` at least. On an integer or boolean output the bound applies to exact
    agreement: the share of equal elements at least ``value`` for ``cosine``/``top1``, the share of
    differing ones at most ``value`` for the others."""

    metric: str
    value: float

    def measured(self, comparison: OutputComparison) -> float:
        """What the bound is checked against on ``comparison``."""
        if comparison.exact:
            return comparison.agreement if self.larger_is_better else 1.0 - comparison.agreement
        return comparison.cosine_min if self.metric == "cosine" else getattr(comparison, self.metric)

    @property
    def larger_is_better(self) -> bool:
        return TOLERANCE_METRICS[self.metric][1]

    def holds(self, comparison: OutputComparison) -> bool:
        got = self.measured(comparison)
        return got >= self.value if self.larger_is_better else got <= self.value

    def verdict(self, comparison: OutputComparison) -> str:
        """``"worst per-sample cosine 0.9407 < 0.98"``: the measured value beside the bound."""
        got = self.measured(comparison)
        what = (("share of equal elements" if self.larger_is_better else "share of differing elements")
                if comparison.exact else TOLERANCE_METRICS[self.metric][0])
        sign = {True: ">=", False: "<"} if self.larger_is_better else {True: "<=", False: ">"}
        return f"{what} {got:.4g} {sign[self.holds(comparison)]} {self.value:g}"

    def __str__(self) -> str:
        what, larger_better = TOLERANCE_METRICS[self.metric]
        return f"{what} {'>=' if larger_better else '<='} {self.value:g}"


def rel_l2(ref: np.ndarray, out: np.ndarray) -> float:
    """``||out - ref||² / ||ref||²`` over the whole tensor."""
    den = float(np.sum(ref * ref))
    return float(np.sum((out - ref) ** 2) / den) if den > 0 else float(np.sum((out - ref) ** 2))


def cosine_gap(ref: np.ndarray, out: np.ndarray) -> float:
    """One minus the mean per-sample (axis 0) cosine."""
    return float(1.0 - _cosine(ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)).mean())


DIVERGENCES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "rel_l2": rel_l2, "kl": kl_softmax, "cosine": cosine_gap,
}


def parse_tolerance(spec: float | str | Tolerance | None) -> Tolerance | None:
    """``0.05`` or ``"rel_l2=0.05"`` / ``"max_abs=1e-3"`` / ``"cosine=0.99"`` -> Tolerance."""
    if spec is None or isinstance(spec, Tolerance):
        return spec
    metric, _, value = str(spec).rpartition("=") if "=" in str(spec) else ("rel_l2", "", str(spec))
    metric = metric.strip() or "rel_l2"
    if metric not in TOLERANCE_METRICS:
        raise OnnxlrError(f"unknown --max-error metric {metric!r} (use {', '.join(TOLERANCE_METRICS)})")
    try:
        number = float(value)
    except ValueError:
        raise OnnxlrError(f"malformed --max-error {spec!r}: expected a number or METRIC=NUMBER") from None
    if not np.isfinite(number) or number < 0:
        raise OnnxlrError(f"--max-error must be a finite non-negative number, got {value}")
    return Tolerance(metric, number)
