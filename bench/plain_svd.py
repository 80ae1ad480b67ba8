"""Plain (data-free) SVD on the reference models: fidelity, size and latency at three rank ratios.

    python bench/plain_svd.py [--cache-dir DIR] [--write docs/benchmarks.md]

MiniLM: cosine (mean, min) of embeddings and top-10 neighbour overlap against the original on the
512 evaluation sentences; latency at batch 8 x 64 tokens. MNIST LeNet: held-out accuracy on 1000
digits; latency at batch 64. For each model, the original and every variant are timed interleaved in
one run (ONNX Runtime CPU, 2 intra-op threads) and the speed-up is the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import onnxruntime as ort

import onnxlr
from onnxlr.graph import count_parameters
from onnxlr.io import load_model
from onnxlr.models import metrics, minilm, mnist, text
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

RATIOS = (0.25, 0.5, 0.75)
THREADS = 2
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
        emb = minilm.embed(blob, feeds)
        cos = metrics.cosine_rows(reference, emb)
        rows.append(f"| {label} | {rewritten} | {params:,} | {len(blob) / 1e6:.1f} | {cos.mean():.3f} ({cos.min():.3f}) | "
                    f"{metrics.topk_overlap(reference, emb, k=10):.3f} | {timing[label].median_ms:.1f} | "
                    f"{base / timing[label].median_ms:.2f}× |")
    return rows


def bench_mnist(cache: Path, repeats: int) -> list[str]:
    path = mnist.build(cache)
    images, labels = mnist.load_test(cache)
    variants = _variants(path)
    timing = _timing(variants, {"image": images[:64]}, repeats)
    reference = None
    rows = ["| variant | Gemms rewritten | params | accuracy | top-1 agreement | median ms (b64) | speed-up |",
            "|---|---|---|---|---|---|---|"]
    base = timing["original"].median_ms
    for label, (blob, params, rewritten) in variants.items():
        logits = make_session(blob, "CPUExecutionProvider", THREADS).run(None, {"image": images})[0]
        reference = logits if reference is None else reference
        rows.append(f"| {label} | {rewritten} | {params:,} | {metrics.accuracy(logits, labels):.3f} | "
                    f"{metrics.top1_agreement(reference, logits):.3f} | {timing[label].median_ms:.3f} | "
                    f"{base / timing[label].median_ms:.2f}× |")
    return rows


def section(cache: Path, repeats: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"<!-- {MARK}:begin -->",
        "## Plain SVD (data-free), issue #2",
        "",
        f"Command: `python bench/plain_svd.py --write docs/benchmarks.md` (onnxruntime {ort.__version__}, "
        f"CPUExecutionProvider, {THREADS} threads, {os.cpu_count()} cores, {cpu}; {repeats} interleaved timed runs "
        "after 5 warm-ups, medians). Rank ratio R keeps ⌈R·min(k,n)⌉ singular values; layers where that "
        "rank would not save parameters are left dense.",
        "",
        "### all-MiniLM-L6-v2 (512 evaluation sentences, fidelity against the original)",
        "",
        *bench_minilm(cache, repeats),
        "",
        "### LeNet on MNIST (1000 held-out digits)",
        "",
        *bench_mnist(cache, repeats),
        f"<!-- {MARK}:end -->",
    ]
    return "\n".join(lines)


def write_section(doc: Path, body: str, mark: str = MARK) -> None:
    """Replace the section of ``doc`` between ``mark``'s begin/end comments (or append it)."""
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {mark}:begin -->", f"<!-- {mark}:end -->"
    if begin in old and end in old:
        new = old[: old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(new)


def bench_parser(doc: str, mark: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: ``--cache-dir`` and ``--write``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("ONNXLR_CACHE", Path.home() / ".cache" / "onnxlr")))
    parser.add_argument("--write", type=Path, help=f"markdown file whose {mark} section is replaced")
    return parser


def emit(body: str, args: argparse.Namespace, mark: str) -> int:
    """Print a section and, with ``--write``, put it into the markdown file."""
    print(body)
    if args.write:
        write_section(args.write, body, mark)
    return 0


def cache_main(section, doc: str, mark: str, argv=None) -> int:
    """``main`` of a benchmark whose section needs only the cache folder: ``section(cache_dir)``."""
    args = bench_parser(doc, mark).parse_args(argv)
    return emit(section(args.cache_dir), args, mark)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    return emit(section(args.cache_dir, args.repeats), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
