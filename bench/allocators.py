"""Allocators at equal budgets: uniform, greedy, knapsack, evolutionary on MiniLM and the LeNet (issue #6).

    python bench/allocators.py [--cache-dir DIR] [--write docs/benchmarks.md] [--plot docs/allocators.png]

Per model the calibration statistics, decompositions, end-to-end sensitivities and the one-session
scorer are built once (`onnxlr.planning.rank_search.search_space`); every allocator then spreads the same `--target params=F`
budget (the whole model keeps share F of its parameters), the model is built with the ranks chosen
and scored on held-out data it was not calibrated or searched on. `search s` is the allocator's own
time (the shared sensitivity measurement is listed once per model); `evaluations` counts candidate
allocations scored end to end and `batch runs` the model runs over one calibration batch of 32
samples they took (the evolutionary search scores on three quarters of the batches and judges its
result against its start on the last quarter). Latency: median of interleaved runs of the original and each result (MiniLM: 8
sentences × 64 tokens, 100 runs; LeNet: 64 digits, 1000 runs), 2 threads. A latency target (`--target latency=F --allocator knapsack`) is
re-measured on the whole model by onnxlr itself, and searched again with a share lowered by the miss
(twice at most); the bench then times the result once more against the original.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from onnxlr.factorization import FitSettings
from onnxlr.graph import count_parameters
from onnxlr.io import load_model
from onnxlr.models import metrics, minilm, mnist, text
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager
from onnxlr.planning import rank_search
from onnxlr.planning.targets import layer_budget
from onnxlr.runtimes.calibration import StatisticsService
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, emit, marked  # noqa: E402

MARK = "allocators"
THREADS = 2
ALLOCATORS = ("uniform", "greedy", "knapsack", "evolutionary")
MINILM_SHARES = (0.9, 0.85, 0.8)
LENET_SHARES = (0.6, 0.4, 0.25)
LATENCY_SHARES = (0.9, 0.8, 0.7)


def _latency(models: dict[str, bytes], feeds, repeats: int = 30) -> dict[str, float]:
    sessions = {name: make_session(m, "CPUExecutionProvider", THREADS) for name, m in models.items()}
    return {name: lat.median_ms for name, lat in measure(sessions, feeds, warmup=3, repeats=repeats).items()}


def run_model(name, model, calib, score, time_feeds, shares, repeats):
    """Rows of the table and points of the Pareto plot for one model."""
    service = StatisticsService.of(model, calib)
    stats = service.collect_for(model, FactorizeMatMul(FactorizeMatMulConfig()))
    cache: dict = {}
    started = time.perf_counter()
    space = rank_search.search_space(model, FitSettings(method="whitened"), stats, None,
                                     service.batches(rank_search.SEARCH_BATCH_SIZE), threads=THREADS, cache=cache)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    runs = space.runner.evaluations
    rank_search.measure_end_to_end(space.table, space.candidates, space.runner)
    sensitivity = (time.perf_counter() - started, space.runner.evaluations - runs, space.table.measured_levels)
    rows, points = [], []
    total = count_parameters(model)
    for share in shares:
        budget, _ = layer_budget(model, ("params", share))
        built = {}
        for allocator in ALLOCATORS:
            result = space.search(budget, allocator, seed=0, progress=False)
            ranks = {key[0]: rank for key, rank in result.ranks.items()}
            fixed = FactorizeMatMulConfig(method="whitened", ranks=ranks)
            out = PassManager([FactorizeMatMul(fixed, stats, cache=cache)]).run(model)[0]
            built[allocator] = (out, result)
            print(f"{name} {share} {allocator}: {score(out)} {result.seconds:.1f}s", file=sys.stderr, flush=True)
        latency = _latency({"original": model.SerializeToString(),
                            **{a: m.SerializeToString() for a, (m, _) in built.items()}}, time_feeds, repeats)
        for allocator, (out, result) in built.items():
            fidelity, value = score(out)
            params = count_parameters(out)
            dense = sum(1 for row in result.layers if row["rank"] == 0)
            label = allocator if result.allocator == allocator else f"{allocator} (kept its start, {result.allocator})"
            rows.append(f"| {share:.2f} | {label} | {params:,} ({params / total:.3f}) | {dense} | {fidelity} | "
                        f"{latency['original'] / latency[allocator]:.2f}× | {result.seconds:.1f} | "
                        f"{result.evaluations} | {result.batch_runs} |")
            points.append((allocator, params / total, latency[allocator] / latency["original"], value))
    header = [f"### {name}", "",
              f"Shared set-up: statistics and decompositions {setup:.0f} s; end-to-end sensitivity of "
              f"{sensitivity[2]} (layer, level) pairs in {sensitivity[0]:.0f} s ({sensitivity[1]} batch runs).", ""]
    return header, rows, points


def minilm_case(cache: Path):
    model = load_model(minilm.build(cache))
    calib, evaluation = text.build_splits(cache)
    feeds = text.load(evaluation)
    reference = minilm.embed(model, feeds)

    def score(candidate):
        emb = minilm.embed(candidate.SerializeToString(), feeds)
        cos = metrics.cosine_rows(reference, emb)
        return f"{cos.mean():.4f} ({cos.min():.3f}) | {metrics.topk_overlap(reference, emb, 10):.3f}", float(cos.mean())

    time_feeds = {k: v[:8] for k, v in feeds.items()}
    return model, calib, score, time_feeds, 100


def lenet_case(cache: Path):
    model = load_model(mnist.build(cache))
    images, labels = mnist.load_test(cache)
    session = make_session(model.SerializeToString(), "CPUExecutionProvider", THREADS)
    reference = session.run(None, {"image": images})[0]

    def score(candidate):
        logits = make_session(candidate.SerializeToString(), "CPUExecutionProvider", THREADS).run(
            None, {"image": images})[0]
        acc = metrics.accuracy(logits, labels)
        return f"{acc:.3f} | {metrics.top1_agreement(reference, logits):.3f}", acc

    return model, cache / mnist.CALIB_FILE, score, {"image": images[:64]}, 1000


def latency_rows(model, calib, time_feeds, dims) -> list[str]:
    """``--target latency=F`` through the API (lookup table measured or read from the cache), the result
    re-timed against the original on the whole model."""
    import onnxlr

    rows = []
    for share in LATENCY_SHARES:
        started = time.perf_counter()
        out, report = onnxlr.optimize(model, calib=calib, target=f"latency={share}", dims=dims,
                                      allocator="knapsack", threads=THREADS, validate=False)
        seconds = time.perf_counter() - started
        record = report.pass_named("factorize_matmul").config["allocation"]
        timing = _latency({"original": model.SerializeToString(), "optimized": out.SerializeToString()}, time_feeds,
                          repeats=100)
        ratio = timing["optimized"] / timing["original"]
        checks = " → ".join(f"{c['share_searched']:.3f} ({c['measured_ratio']:.3f})" for c in record["latency_checks"])
        rows.append(f"| latency={share} | {checks} | {record['cost']:.3f} of {record['budget']:.3f} ms | {ratio:.3f} | "
                    f"{'met' if ratio <= share else 'missed'} | {count_parameters(out) / count_parameters(model):.3f} | "
                    f"{seconds:.0f} s |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def plot(points_by_model: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(points_by_model), 2, figsize=(10, 4 * len(points_by_model)), squeeze=False)
    for row, (name, points) in enumerate(points_by_model.items()):
        metric = "cosine to the original" if "MiniLM" in name else "test accuracy"
        for col, (index, label) in enumerate(((1, "parameters kept (share)"), (2, "latency (share of original)"))):
            ax = axes[row][col]
            for allocator in ALLOCATORS:
                mine = sorted((p[index], p[3]) for p in points if p[0] == allocator)
                ax.plot([x for x, _ in mine], [y for _, y in mine], marker="o", label=allocator)
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.set_title(f"{name.split(' (')[0]}: {metric} vs {label.split(' (')[0]}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def section(cache: Path, plot_path: Path | None) -> str:
    lines = ["## Allocators at equal budgets, issue #6", "",
             "Command: `python bench/allocators.py --write docs/benchmarks.md --plot docs/allocators.png`. "
             + " ".join(__doc__.split("\n\n")[2].split()), ""]
    points = {}
    for name, case, shares, cols in (
            ("all-MiniLM-L6-v2 (calibrated and searched on 256 sentences, scored on 512 others)", minilm_case,
             MINILM_SHARES, "cosine mean (min) | top-10 overlap"),
            ("LeNet on MNIST (calibrated and searched on 256 training digits, scored on the 1000 test digits)",
             lenet_case, LENET_SHARES, "accuracy | top-1 agreement")):
        model, calib, score, time_feeds, repeats = case(cache)
        header, rows, points[name] = run_model(name, model, calib, score, time_feeds, shares, repeats)
        lines += [*header, f"| target params | allocator | params (share) | layers dense | {cols} | speed-up | "
                  "search s | evaluations | batch runs |", "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    model, calib, _, time_feeds, _ = minilm_case(cache)
    lines += ["### Latency targets (MiniLM, 8 × 64 tokens, knapsack on the measured lookup table)", "",
              "| target | share searched (its measured ratio) | predicted layer time | re-measured latency ratio "
              "| | params share | wall time |",
              "|---|---|---|---|---|---|---|",
              *latency_rows(model, calib, time_feeds, {"batch": 8, "sequence": 64}), ""]
    if plot_path is not None:
        plot(points, plot_path)
        lines += [f"![Pareto fronts of the allocators]({plot_path.name})", ""]
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--plot", type=Path, help="PNG of the accuracy-size and accuracy-latency fronts")
    args = parser.parse_args(argv)
    return emit(section(args.cache_dir, args.plot), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
