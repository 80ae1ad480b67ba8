"""Ranges of static uint8 activation quantizers, chosen from calibration histograms — plain numpy.

An activation quantizer maps a float tensor to uint8 codes ``q = clip(round(x / scale) + zero, 0, 255)``
with one ``(scale, zero)`` per tensor, from a range ``[low, high]`` that always holds 0 (so a zero
activation — padding, a Relu's floor — is exact). Values outside the range saturate: a narrower range
trades clipping error on the tails for a finer step everywhere else. The rules, each from an
:class:`onnxlr.statistics.ActivationStats` (its histogram of all values and its exact min/max):

- ``minmax``: the observed range, nothing clipped.
- ``percentile``: the range holding all but ``1e-5`` of the values on each side (99.999th percentile).
- ``mse``: the range (both ends shrunk by one factor, or the top end only) minimising the mean squared
  error of quantizing the histogram.
- ``entropy``: TensorRT's KL calibration — the range whose 255-level quantized histogram diverges least
  (Kullback–Leibler) from the clipped original.

:func:`fake_quant_error` is the squared error of a range on the histogram, relative to the tensor's mean
square: what ranks the rules per tensor.
"""

from __future__ import annotations

import numpy as np

from onnxlr.statistics import ActivationStats

LEVELS = 255  # uint8
RULES = ("minmax", "percentile", "mse", "entropy")
PERCENTILE_TAIL = 1e-5
SHRINK_GRID = np.linspace(0.1, 1.0, 91)


def quantization_params(low: float, high: float) -> tuple[float, int]:
    """uint8 ``(scale, zero_point)`` of the range ``[low, high]`` widened to hold 0; a zero-width range
    gets scale 1 (every code then dequantizes to 0 exactly)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low <= 0:
        return 1.0, 0
    scale = (high - low) / LEVELS
    return scale, int(np.clip(np.rint(-low / scale), 0, LEVELS))


def fake_quantize(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``x`` quantized to uint8 with the range ``[low, high]`` and dequantized (float64)."""
    scale, zero = quantization_params(low, high)
    q = np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero, 0, LEVELS)
    return (q - zero) * scale


def fake_quant_error(stats: ActivationStats, low: float, high: float) -> float:
    """Mean squared quantization error of the histogram's values under ``[low, high]``, relative to their
    mean square (0 for an all-zero tensor)."""
    x, counts = stats.centres, stats.hist
    power = float((counts * x * x).sum())
    if power <= 0:
        return 0.0
    return float((counts * (x - fake_quantize(x, low, high)) ** 2).sum()) / power


def minmax(stats: ActivationStats) -> tuple[float, float]:
    return stats.range


def percentile(stats: ActivationStats, tail: float = PERCENTILE_TAIL) -> tuple[float, float]:
    """The range leaving ``tail`` of the values out on each side (never past the observed range)."""
    low, high = stats.range
    cdf = np.cumsum(stats.hist)
    total = cdf[-1] if len(cdf) else 0.0
    if total <= 0:
        return low, high
    edges = stats.edges
    top = float(edges[1:][min(np.searchsorted(cdf, total * (1 - tail)), len(cdf) - 1)])
    bottom = float(edges[:-1][min(np.searchsorted(cdf, total * tail), len(cdf) - 1)])
    return (max(bottom, low) if low < 0 else low), (min(top, high) if high > 0 else high)


def mse(stats: ActivationStats) -> tuple[float, float]:
    """The range minimising :func:`fake_quant_error`: both ends scaled by one factor of
    :data:`SHRINK_GRID`, or (for a signed tensor) the top end alone."""
    low, high = stats.range
    candidates = [(low * a, high * a) for a in SHRINK_GRID]
    if low < 0:
        candidates += [(low, high * a) for a in SHRINK_GRID]
    errors = [fake_quant_error(stats, lo, hi) for lo, hi in candidates]
    return candidates[int(np.argmin(errors))] if candidates else (low, high)


def entropy(stats: ActivationStats, levels: int = LEVELS) -> tuple[float, float]:
    """TensorRT-style KL calibration over ranges ``a · [low, high]``: the clipped histogram ``p`` (outliers
    added to its edge bins) against ``q``, ``p``'s nonzero bins merged into ``levels`` groups and spread
    evenly back; the ``a`` of least KL(p‖q) wins."""
    low, high = stats.range
    counts, edges = stats.hist.astype(np.float64), stats.edges
    if counts.sum() <= 0:
        return low, high
    best, chosen = np.inf, (low, high)
    for a in np.linspace(0.2, 1.0, 41):
        lo, hi = low * a, high * a
        i0 = max(0, int(np.searchsorted(edges, lo, side="right")) - 1)
        i1 = min(len(counts), int(np.searchsorted(edges, hi, side="left")))
        if i1 - i0 < levels:
            continue
        kl = _kl_of_clipping(counts, i0, i1, levels)
        if kl < best:
            best, chosen = kl, (lo, hi)
    return chosen


def _kl_of_clipping(counts: np.ndarray, i0: int, i1: int, levels: int) -> float:
    """KL(p‖q) of the histogram clipped to bins [i0, i1) against its ``levels``-level quantization."""
    inside = counts[i0:i1]
    p = inside.copy()
    p[0] += counts[:i0].sum()
    p[-1] += counts[i1:].sum()
    q = np.zeros_like(p)
    for group in np.array_split(np.arange(len(p)), levels):
        nonzero = inside[group] > 0
        if nonzero.any():
            q[group[nonzero]] = inside[group].sum() / nonzero.sum()
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    keep = p > 0
    return float((p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))).sum())


def activation_range(stats: ActivationStats, rule: str) -> tuple[float, float]:
    """The range ``rule`` (one of :data:`RULES`) gives ``stats``."""
    rules = {"minmax": minmax, "percentile": percentile, "mse": mse, "entropy": entropy}
    if rule not in rules:
        raise ValueError(f"range rule must be one of {RULES}, got {rule!r}")
    low, high = rules[rule](stats)
    return float(low), float(high)


def span(stats: ActivationStats) -> float:
    """Width of the observed range with 0 included: what one shared scale has to cover."""
    low, high = stats.range
    return max(high, 0.0) - min(low, 0.0)
