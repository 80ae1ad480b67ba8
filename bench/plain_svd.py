"""Plain (data-free) SVD on the reference models: fidelity, size and latency at three rank ratios.

    python bench/plain_svd.py [--cache-dir DIR] [--write docs/benchmarks.md]

MiniLM: cosine (mean, min) of embeddings and top-10 neighbour overlap against the original on the
512 evaluation sentences; latency at batch 8 x 64 tokens. MNIST LeNet: held-out accuracy on 1000
digits; latency at batch 64. For each model, the original and every variant are timed interleaved in
one run (ONNX Runtime CPU, 2 intra-op threads) and the speed-up is the ratio of medians.
"""

from __future__ import annotations

import sys
from pathlib import Path


import onnxlr
from onnxlr.graph import count_parameters
from onnxlr.io import load_model
from onnxlr.models import minilm, mnist, text
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, bench_parser, embedding_cells, emit, lenet_rows, machine, marked  # noqa: E402

RATIOS = (0.25, 0.5, 0.75)
MARK = "plain-svd"


def _variants(model_path: Path) -> dict[str, tuple[bytes, int, str]]:
    """label -> (serialized model, params, layers rewritten) for the original and each ratio."""
    original = load_model(model_path)
    out = {"original": (original.SerializeToString(), count_parameters(original), "–")}
    for ratio in RATIOS:
        model, report = onnxlr.optimize(original, rank_ratio=ratio, validate=False)
        record = report.pass_named("factorize_matmul")
        out[f"rank ratio {ratio}"] = (model.SerializeToString(), report.optimized.params,
                                      f"{len(record.rewritten)}/{len(record.rewritten) + len(record.skipped)}")
    return out


def _timing(variants, feeds, repeats):
    sessions = {label: make_session(blob, "CPUExecutionProvider", THREADS) for label, (blob, _, _) in variants.items()}
    return measure(sessions, feeds, warmup=5, repeats=repeats)


def bench_minilm(cache: Path, repeats: int) -> list[str]:
    path = minilm.build(cache)
    _, eval_npz = text.build_splits(cache)
    feeds = text.load(eval_npz)
    variants = _variants(path)
    timing = _timing(variants, {k: v[:8] for k, v in feeds.items()}, repeats)
    reference = minilm.embed(variants["original"][0], feeds)
    rows = ["| variant | MatMuls rewritten | params | size (MB) | cosine mean (min) | top-10 overlap | median ms (b8×64) | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    base = timing["original"].median_ms
    for label, (blob, params, rewritten) in variants.items():
        cells = [label, str(rewritten), f"{params:,}", f"{len(blob) / 1e6:.1f}", *embedding_cells(reference, blob, feeds, 3),
                 f"{timing[label].median_ms:.1f}", f"{base / timing[label].median_ms:.2f}×"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def bench_mnist(cache: Path, repeats: int) -> list[str]:
    path = mnist.build(cache)
    images, labels = mnist.load_test(cache)
    variants = _variants(path)
    timing = _timing(variants, {"image": images[:64]}, repeats)
    base = timing["original"].median_ms
    columns = {label: [str(rewritten), f"{params:,}", f"{timing[label].median_ms:.3f}", f"{base / timing[label].median_ms:.2f}×"]
               for label, (_, params, rewritten) in variants.items()}
    return ["| variant | Gemms rewritten | params | median ms (b64) | speed-up | accuracy | top-1 agreement |",
            "|---|---|---|---|---|---|---|",
            *lenet_rows({label: blob for label, (blob, _, _) in variants.items()}, images, labels, columns)]


def section(cache: Path, repeats: int) -> str:
    lines = [
        "## Plain SVD (data-free), issue #2",
        "",
        f"Command: `python bench/plain_svd.py --write docs/benchmarks.md` ({machine()}; {repeats} interleaved "
        "timed runs after 5 warm-ups, medians). Rank ratio R keeps ⌈R·min(k,n)⌉ singular values; layers where that "
        "rank would not save parameters are left dense.",
        "",
        "### all-MiniLM-L6-v2 (512 evaluation sentences, fidelity against the original)",
        "",
        *bench_minilm(cache, repeats),
        "",
        "### LeNet on MNIST (1000 held-out digits)",
        "",
        *bench_mnist(cache, repeats),
    ]
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    return emit(section(args.cache_dir, args.repeats), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
