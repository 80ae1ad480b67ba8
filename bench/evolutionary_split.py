"""Does the evolutionary search still overfit when the factors it scores are fitted on other data?

    python bench/evolutionary_split.py [--cache-dir DIR]

An experiment, not (yet) what onnxlr does: MiniLM's factors are fitted on calibration sentences 0–191
and candidates are scored (end-to-end sensitivities and evolutionary fitness) on sentences 192–255
only; the models are then built with the ranks found and statistics of all 256 sentences, and scored
on the 512 evaluation sentences. Compare with the `allocators` section of docs/benchmarks.md, where
factors and scores share the 256 sentences. Prints one line per budget and allocator.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from onnxlr.factorization import FitSettings
from onnxlr.io import load_model
from onnxlr.models import metrics, minilm, text
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager
from onnxlr.planning import rank_search
from onnxlr.planning.targets import layer_budget
from onnxlr.runtimes.calibration import StatisticsService

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser  # noqa: E402

FIT_SAMPLES = 192
SHARES = (0.85, 0.8)


def main(argv=None) -> int:
    args = bench_parser(__doc__, "none").parse_args(argv)
    model = load_model(minilm.build(args.cache_dir))
    calib, evaluation = text.build_splits(args.cache_dir)
    feeds = text.load(evaluation)
    reference = minilm.embed(model, feeds)
    arrays = text.load(calib)
    fit = {k: v[:FIT_SAMPLES] for k, v in arrays.items()}
    scored = {k: v[FIT_SAMPLES:] for k, v in arrays.items()}
    needs = FactorizeMatMul(FactorizeMatMulConfig())
    stats_fit = StatisticsService.of(model, fit).collect_for(model, needs)
    stats_all = StatisticsService.of(model, calib).collect_for(model, needs)
    batches = StatisticsService.of(model, scored).batches(rank_search.SEARCH_BATCH_SIZE)
    space = rank_search.search_space(model, FitSettings(method="whitened"), stats_fit, None, batches, threads=2)
    started = time.perf_counter()
    rank_search.measure_end_to_end(space.table, space.candidates, space.runner, share=1.0)
    print(f"sensitivities: {time.perf_counter() - started:.0f} s on {len(space.runner.batches)} batches")
    cache: dict = {}
    for share in SHARES:
        budget, _ = layer_budget(model, ("params", share))
        for allocator in ("uniform", "knapsack", "evolutionary"):
            result = space.search(budget, allocator, seed=0, progress=False)
            ranks = {key[0]: rank for key, rank in result.ranks.items()}
            config = FactorizeMatMulConfig(method="whitened", ranks=ranks)
            out = PassManager([FactorizeMatMul(config, stats_all, cache=cache)]).run(model)[0]
            cos = metrics.cosine_rows(reference, minilm.embed(out.SerializeToString(), feeds))
            print(f"params={share} {allocator}: held-out cosine {cos.mean():.4f} ({cos.min():.3f}), "
                  f"search {result.seconds:.0f} s, scored divergence {result.divergence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
