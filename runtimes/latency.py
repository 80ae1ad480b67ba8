"""Latency of several sessions measured side by side.

Runs are interleaved (A B A B …) after a warm-up, so slow drifts of the machine (thermal, other load)
hit every model alike; the ratio of medians is what the report quotes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int


def measure(sessions: dict[str, object], feeds: dict[str, np.ndarray], *, warmup: int = 3, repeats: int = 20) -> dict[str, Latency]:
    """Median and p90 wall time (ms) of ``session.run(None, feeds)`` for each session, interleaved."""
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feeds)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[label].append((time.perf_counter() - start) * 1000.0)
    return {
        label: Latency(float(np.median(t)), float(np.percentile(t, 90)), len(t))
        for label, t in times.items()
    }
