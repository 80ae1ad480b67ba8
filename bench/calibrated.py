"""Calibrated (data-aware) factorization against plain SVD on the reference models.

    python bench/calibrated.py [--cache-dir DIR] [--write docs/benchmarks.md]

Compression level = share of the factorizable MatMul/Gemm parameters removed: every layer gets the
rank r = floor((1 - level) * k*n / (k+n)), so each keeps (1 - level) of its parameters. Calibration
and evaluation data are disjoint: MiniLM is calibrated on 256 sentences and evaluated on 512 others;
the LeNet on 256 training digits and evaluated on the 1000 test digits. Statistics are collected once
and shared by every method and level. The timing row runs the whole `onnxlr.optimize` (statistics,
factorization, checks; no ORT validation) in a fresh process and reports its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxlr
from onnxlr.allocation import allocate_ranks
from onnxlr.factorization import Decomposer, FitSettings
from onnxlr.graph import count_parameters, import_graph
from onnxlr.io import load_model
from onnxlr.matching import find_layers
from onnxlr.models import metrics, minilm, mnist, text
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager
from onnxlr.planning import rank_search
from onnxlr.runtimes.calibration import SENSITIVITY_PROBES, SENSITIVITY_SAMPLES, StatisticsService
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, emit, marked  # noqa: E402

LEVELS = (0.10, 0.25, 0.50)
METHODS = ("svd", "asvd", "whitened", "fisher", "isvt")
# Variants of whitened: ranks allocated by the knapsack, by what --target does (knapsack or uniform,
# whichever has the smaller end-to-end error on the calibration data), fitted sequentially.
MARK = "calibrated"


def level_ranks(model, level: float) -> dict[str, int]:
    """Per-layer ranks that keep (1 - level) of every factorizable layer's parameters."""
    layers, _ = find_layers(import_graph(model))
    ranks = {}
    for layer in layers:
        k, n = layer.W.shape
        ranks[layer.node.name] = max(1, math.floor((1 - level) * k * n / (k + n)))
    return ranks


def level_budget(model, level: float) -> int:
    """Parameters the uniform ranks of ``level`` leave in the factorizable layers: the budget the
    allocators get, so every row of a level has the same number of parameters or fewer."""
    layers, _ = find_layers(import_graph(model))
    ranks = level_ranks(model, level)
    return sum(ranks[layer.node.name] * sum(layer.W.shape) for layer in layers)


def knapsack_ranks(model, stats, budget: int) -> dict[str, int]:
    """Ranks with the least summed calibrated output error within ``budget`` parameters (the knapsack
    on each weight's whitened spectrum, :func:`onnxlr.allocation.allocate_ranks`); 0 keeps a layer dense."""
    layers, _ = find_layers(import_graph(model))
    decompositions = Decomposer(FitSettings(method="whitened")).decompositions(layers, stats)
    keys = list(dict.fromkeys(layer.key for layer in layers))
    shapes = [next(layer.W.shape for layer in layers if layer.key == key) for key in keys]
    tails = [np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]])
             for s in (decompositions[key].svd.spectrum for key in keys)]
    return {key[0]: rank or 0 for key, rank in zip(keys, allocate_ranks(shapes, tails, budget))}


def target_allocation(model, stats, calib, budget: int):
    """What ``--target`` (allocator ``auto``) chooses within ``budget`` parameters of the layers."""
    service = StatisticsService.of(model, calib)
    space = rank_search.search_space(model, FitSettings(method="whitened"), stats, None,
                                     service.batches(rank_search.SEARCH_BATCH_SIZE), threads=2)
    return space.search(budget, "auto")


def variants(model, stats, sensitivity, calib):
    """(method, level) -> optimized ModelProto; the one-shot methods share the same statistics,
    the sequential ones collect their own (one pass per stage)."""
    out = {}
    for level in LEVELS:
        ranks = level_ranks(model, level)
        for method in METHODS:
            config = FactorizeMatMulConfig(method=method, ranks=ranks)
            fitted = FactorizeMatMul(config, None if method == "svd" else stats, sensitivity)
            out[method, level] = PassManager([fitted]).run(model)[0]
        config = FactorizeMatMulConfig(method="whitened", ranks=knapsack_ranks(model, stats, level_budget(model, level)))
        out["whitened+knapsack", level] = PassManager([FactorizeMatMul(config, stats)]).run(model)[0]
        chosen = target_allocation(model, stats, calib, level_budget(model, level))
        label = f"whitened+target (→ {chosen.allocator})"
        out[label, level] = onnxlr.optimize(model, calib=calib, ranks=chosen.ranks_by_name(), conv="none",
                                            validate=False)[0]
        start = time.perf_counter()
        out["whitened+seq", level] = onnxlr.optimize(model, calib=calib, ranks=ranks, sequential=True,
                                                     conv="none", validate=False)[0]
        SEQUENTIAL_SECONDS.append(time.perf_counter() - start)
    return out


SEQUENTIAL_SECONDS: list[float] = []


SENSITIVITY_SECONDS: dict[str, float] = {}


def sensitivities(name, model, calib):
    start = time.perf_counter()
    layers, _ = find_layers(import_graph(model))
    found = StatisticsService.of(model, calib).sensitivity(model, sorted({layer.node.outputs[0].name for layer in layers}))
    SENSITIVITY_SECONDS[name] = time.perf_counter() - start
    return found


def bench_minilm(cache: Path) -> list[str]:
    model = load_model(minilm.build(cache))
    calib_npz, eval_npz = text.build_splits(cache)
    stats = StatisticsService.of(model, calib_npz).collect_for(model, FactorizeMatMul(FactorizeMatMulConfig()))
    sensitivity = sensitivities("MiniLM", model, calib_npz)
    feeds = text.load(eval_npz)
    reference = minilm.embed(model, feeds)
    rows = ["| level (MatMul params removed) | method | params | cosine mean (min) | top-10 overlap |",
            "|---|---|---|---|---|"]
    for (method, level), candidate in variants(model, stats, sensitivity, calib_npz).items():
        emb = minilm.embed(candidate, feeds)
        cos = metrics.cosine_rows(reference, emb)
        rows.append(f"| {level:.0%} | {method} | {count_parameters(candidate):,} | "
                    f"{cos.mean():.4f} ({cos.min():.3f}) | {metrics.topk_overlap(reference, emb, 10):.3f} |")
    return rows


def bench_mnist(cache: Path) -> list[str]:
    model = load_model(mnist.build(cache))
    stats = StatisticsService.of(model, cache / mnist.CALIB_FILE).collect_for(model, FactorizeMatMul(FactorizeMatMulConfig()))
    sensitivity = sensitivities("LeNet", model, cache / mnist.CALIB_FILE)
    images, labels = mnist.load_test(cache)
    run = lambda m: make_session(m.SerializeToString(), "CPUExecutionProvider", 2).run(None, {"image": images})[0]  # noqa: E731
    reference = run(model)
    rows = [f"Original accuracy: {metrics.accuracy(reference, labels):.3f}.", "",
            "| level (Gemm params removed) | method | accuracy | top-1 agreement |", "|---|---|---|---|"]
    for (method, level), candidate in variants(model, stats, sensitivity, cache / mnist.CALIB_FILE).items():
        logits = run(candidate)
        rows.append(f"| {level:.0%} | {method} | {metrics.accuracy(logits, labels):.3f} | "
                    f"{metrics.top1_agreement(reference, logits):.3f} |")
    return rows


def time_minilm(cache: Path) -> dict:
    """Run in a fresh process: calibration + whitened factorization of MiniLM at the 10% level."""
    model_path = minilm.build(cache)
    calib_npz, _ = text.build_splits(cache)
    model = load_model(model_path)
    ranks = level_ranks(model, 0.10)
    start = time.perf_counter()
    onnxlr.optimize(model, calib=calib_npz, method="whitened", ranks=ranks, validate=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def section(cache: Path) -> str:
    # The timed run gets the machine's default BLAS threading, whatever this process was given.
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    timing = json.loads(subprocess.run([sys.executable, __file__, "--time-only", "--cache-dir", str(cache)],
                                       check=True, capture_output=True, text=True, env=env).stdout)
    lines = [
        "## Calibrated factorization, issue #3",
        "",
        f"Command: `python bench/calibrated.py --write docs/benchmarks.md` (onnxruntime {ort.__version__}, "
        f"{os.cpu_count()} cores). Level = share of each factorizable layer's parameters removed "
        "(rank ⌊(1−level)·kn/(k+n)⌋). `svd` is data-free; `asvd`, `whitened` and `isvt` use the "
        "calibration statistics, with the output factor refitted and the mean error folded into the bias.",
        "",
        "Variants of `whitened`, all within the parameters of the uniform row of their level: `+knapsack` "
        "lets the knapsack allocator choose each layer's rank (or leave it dense) for the least summed "
        "calibrated output error; `+target` is what `--target params=F` does — its `auto` allocator "
        "(uniform and two knapsacks, on end-to-end and on calibrated errors, judged end to end on the "
        "calibration data; the arrow says which won, issue #6); `+seq` fits the layers stage by stage to the "
        "inputs the already-compressed layers produce (`--sequential`).",
        "",
        "### all-MiniLM-L6-v2 (calibrated on 256 sentences, evaluated on 512 others)",
        "",
        *bench_minilm(cache),
        "",
        "### LeNet on MNIST (calibrated on 256 training digits, evaluated on 1000 test digits)",
        "",
        *bench_mnist(cache),
        "",
        "### Cost of calibration + factorization (MiniLM, 256 sentences, whitened, 10% level)",
        "",
        f"Wall time {timing['seconds']:.1f} s, peak RSS {timing['peak_rss_mb']:.0f} MB for the whole process "
        "(Python, onnxruntime, the 90 MB model and its copies included).",
        "",
        "Sequential fitting runs one calibration pass of both models per stage of layers "
        f"(24 stages on MiniLM, 3 on LeNet): {', '.join(f'{x:.0f} s' for x in SEQUENTIAL_SECONDS)} "
        "per `whitened+seq` model above (MiniLM levels, then LeNet levels).",
        "",
        f"`fisher` additionally measures output sensitivities with {SENSITIVITY_PROBES} antithetic "
        f"forward-probe pairs on {SENSITIVITY_SAMPLES} calibration samples: "
        + ", ".join(f"{name} {sec:.0f} s" for name, sec in SENSITIVITY_SECONDS.items()) + ".",
    ]
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--time-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_only:
        print(json.dumps(time_minilm(args.cache_dir)))
        return 0
    return emit(section(args.cache_dir), args, MARK)

if __name__ == "__main__":
    sys.exit(main())
