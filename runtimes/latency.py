"""Latency of several sessions measured side by side.

Runs are interleaved (A B A B …) after a warm-up, so slow drifts of the machine (thermal, other load)
hit every model alike; the ratio of medians is what the report quotes. The loop itself lives in the
standalone runner, so that a model timed on another device is timed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxlr.runtimes.runner import measure_latency


@dataclass
class Latency:
    """Median and p90 of ``runs`` timed runs; ``times_ms``: every run, in the interleaved order."""

    median_ms: float
    p90_ms: float
    runs: int
    times_ms: list[float] = field(default_factory=list)


def speedup_noise(original: Latency, optimized: Latency) -> float | None:
    """The run's noise on a speed-up, as a relative half-width: half the interquartile range of the
    per-pair ratios (original run i / optimized run i, timed next to each other), in log space. A
    speed-up within it is not shown to be one. None without the runs' times."""
    if len(original.times_ms) < 4 or len(original.times_ms) != len(optimized.times_ms):
        return None
    ratios = np.log(np.asarray(original.times_ms) / np.maximum(np.asarray(optimized.times_ms), 1e-9))
    q25, q75 = np.percentile(ratios, [25, 75])
    return float(np.exp((q75 - q25) / 2) - 1)


def measure(sessions: dict[str, object], feeds: dict[str, np.ndarray], *, warmup: int = 3, repeats: int = 20) -> dict[str, Latency]:
    """Median and p90 wall time (ms) of ``session.run(None, feeds)`` for each session, interleaved."""
    return {label: Latency(**t) for label, t in measure_latency(sessions, feeds, warmup, repeats).items()}
