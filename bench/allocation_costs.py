"""Which per-layer cost should the knapsack minimise? MiniLM at three budgets, against uniform ranks.

    python bench/allocation_costs.py [--cache-dir DIR] [--write docs/benchmarks.md]

Every row keeps the MatMul parameters of the uniform row of its level (rank ⌊(1−level)·kn/(k+n)⌋ per
layer) and is fitted with `whitened`; only the ranks differ. Costs of truncating layer l to rank r,
from the tail of its whitened spectrum s (the calibrated output error, exactly):
`abs` = Σ_{i>r} s_i² (what `--target` uses); `rel` = the same divided by ‖XW‖² (relative error);
`sens` = `abs` times the layer's mean output sensitivity (forward probes, as for `fisher`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from onnxlr import linalg
from onnxlr.allocation import allocate_ranks
from onnxlr.graph import import_graph
from onnxlr.io import load_model
from onnxlr.matching import find_layers
from onnxlr.models import metrics, minilm, text
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager
from onnxlr.runtimes.calibration import StatisticsService

sys.path.insert(0, str(Path(__file__).parent))
from calibrated import LEVELS, level_ranks  # noqa: E402
from common import cache_main, marked  # noqa: E402

MARK = "allocation-costs"


def section(cache: Path) -> str:
    model = load_model(minilm.build(cache))
    calib, evaluation = text.build_splits(cache)
    layers, _ = find_layers(import_graph(model))
    service = StatisticsService.of(model, calib)
    stats = service.collect_for(model, FactorizeMatMul(FactorizeMatMulConfig()))
    sensitivity = service.sensitivity(model, sorted({layer.node.outputs[0].name for layer in layers}))
    feeds = text.load(evaluation)
    reference = minilm.embed(model, feeds)
    tails, weights = [], {"abs": [], "rel": [], "sens": []}
    for layer in layers:
        st = stats[layer.node.inputs[0].name]
        s = linalg.WhitenedSVD.fit(layer.W, linalg.clamped_eigh(st.centered_gram)).s
        tails.append(np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]]))
        weights["abs"].append(1.0)
        weights["rel"].append(1.0 / float(np.sum(layer.W * (st.gram @ layer.W))))
        d = sensitivity[layer.node.outputs[0].name]
        weights["sens"].append(float(d.sum() / d.size))
    shapes = [layer.W.shape for layer in layers]
    cache_ = {}

    def fidelity(ranks):
        config = FactorizeMatMulConfig(method="whitened", ranks=ranks)
        emb = minilm.embed(PassManager([FactorizeMatMul(config, stats, cache=cache_)]).run(model)[0], feeds)
        cos = metrics.cosine_rows(reference, emb)
        return f"{cos.mean():.4f} ({cos.min():.3f}) | {metrics.topk_overlap(reference, emb, 10):.3f}"

    rows = ["| level | allocation | layers left dense | cosine mean (min) | top-10 overlap |", "|---|---|---|---|---|"]
    for level in LEVELS:
        uniform = level_ranks(model, level)
        budget = sum(uniform[layer.node.name] * sum(layer.W.shape) for layer in layers)
        rows.append(f"| {level:.0%} | uniform | 0 | {fidelity(uniform)} |")
        for name, w in weights.items():
            ranks = allocate_ranks(shapes, [wi * t for wi, t in zip(w, tails)], budget)
            chosen = {layer.weight.name: r or 0 for layer, r in zip(layers, ranks)}
            dense = sum(r is None for r in ranks)
            rows.append(f"| {level:.0%} | knapsack, cost `{name}` | {dense} | {fidelity(chosen)} |")
            print(rows[-1], file=sys.stderr, flush=True)
    lines = ["## Rank allocation: which cost, issue #3 (and #6)", "",
             "Command: `python bench/allocation_costs.py --write docs/benchmarks.md`. "
             + __doc__.split("\n\n")[2].replace("\n", " "), "", *rows]
    return marked(MARK, lines)


def main(argv=None) -> int:
    return cache_main(section, __doc__, MARK, argv)

if __name__ == "__main__":
    sys.exit(main())
