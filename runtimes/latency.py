"""Latency of several sessions measured side by side.

Runs are interleaved (A B A B …) after a warm-up, so slow drifts of the machine (thermal, other load)
hit every model alike; the ratio of medians is what the report quotes. The loop itself lives in the
standalone runner, so that a model timed on another device is timed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxlr.runtimes.runner import measure_latency


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int


def measure(sessions: dict[str, object], feeds: dict[str, np.ndarray], *, warmup: int = 3, repeats: int = 20) -> dict[str, Latency]:
    """Median and p90 wall time (ms) of ``session.run(None, feeds)`` for each session, interleaved."""
    return {label: Latency(**t) for label, t in measure_latency(sessions, feeds, warmup, repeats).items()}
