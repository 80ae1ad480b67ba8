"""Randomized vs exact SVD: time and error at several ranks, on MiniLM's weights and on larger matrices.

    python bench/svd_solvers.py [--write docs/benchmarks.md]

Each matrix is factorized at ranks of 5–50% of its smaller side by the exact SVD (LAPACK gesdd, every
singular triplet, then truncated) and by onnxlr.linalg.randomized_svd (q = 4 power iterations, 10%
oversampling); times are medians of 3 runs side by side, on this machine's cores. Error: the
randomized factorization's Frobenius error over the exact truncation's (Eckart–Young optimum), 1 =
optimal. Larger matrices are Gaussian with singular values i^-0.5 (as slowly decaying as trained
weights get).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_main, marked  # noqa: E402

from onnxlr import linalg  # noqa: E402

MARK = "svd-solvers"
SHARES = (0.05, 0.1, 0.2, 0.25, 0.5)


def _power_law(k: int, n: int, decay: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = min(k, n)
    U = np.linalg.qr(rng.standard_normal((k, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, m)))[0]
    return (U * (1.0 + np.arange(m)) ** -decay) @ V.T


def _median_time(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def _minilm_weights(cache: Path) -> list[tuple[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    from onnxlr.models.minilm import build as build_minilm

    model = onnx.load(str(build_minilm(cache)))
    found = {}
    for t in model.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.ndim == 2 and min(array.shape) >= 384 and array.shape not in found:
            found[array.shape] = (f"MiniLM {t.name}", array.astype(np.float64))
    return list(found.values())


def rows(name: str, W: np.ndarray) -> list[str]:
    m = min(W.shape)
    exact_time, (U, s, Vt) = _median_time(lambda: linalg.svd(W))
    out = []
    for share in SHARES:
        rank = max(1, int(share * m))
        optimum = float(np.sqrt(np.sum(s[rank:] ** 2)))
        rand_time, (Ur, sr, Vtr) = _median_time(lambda: linalg.randomized_svd(W, rank))
        error = float(np.linalg.norm(W - (Ur * sr) @ Vtr)) / optimum if optimum > 0 else 1.0
        auto = linalg.svd_solver(W.shape, rank)
        out.append(f"| {name} | {W.shape[0]}×{W.shape[1]} | {rank} ({share:.0%}) | {exact_time:.3f} | "
                   f"{rand_time:.3f} | {exact_time / rand_time:.2f}× | {error:.4f} | {auto} |")
    return out


def section(cache: Path) -> str:
    lines = ["## Randomized vs exact SVD, issue #9", "",
             "Command: `python bench/svd_solvers.py --write docs/benchmarks.md` (2 cores, BLAS on both). "
             "Exact = full `gesdd` then truncation (what the energy rule and the budget allocation need "
             "anyway); randomized = `linalg.randomized_svd` (q = 4, oversampling max(10, 10% of the rank)). "
             "Error = randomized Frobenius error / exact truncation error. `auto` = what `--svd-solver auto` "
             f"takes (randomized for min(k, n) ≥ {linalg.RANDOMIZED_MIN_SIZE} and rank ≤ "
             f"{linalg.RANDOMIZED_MAX_SHARE:.0%} of it).", "",
             "| matrix | shape | rank | exact s | randomized s | speed-up | error ratio | auto |",
             "|---|---|---|---|---|---|---|---|"]
    matrices = _minilm_weights(cache) + [("power law i^-0.5", _power_law(k, n)) for k, n in
                                         ((1024, 1024), (1024, 4096), (2048, 2048), (2048, 8192))]
    for name, W in matrices:
        lines += rows(name, W)
        print(lines[-1], file=sys.stderr)
    return marked(MARK, lines)


def main(argv=None) -> int:
    return cache_main(section, __doc__, MARK, argv)


if __name__ == "__main__":
    sys.exit(main())
