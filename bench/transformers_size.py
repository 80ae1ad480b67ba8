"""How small can MiniLM get at cosine 0.99 (issue #22, "8× smaller"): the size/fidelity frontier of the
``mixed`` recipe (one storage format per layer under one byte budget) beside the 4-bit anchors.

    python bench/transformers_size.py [--cache-dir DIR] [--sizes 11.3,12.5,15] [--rounds 3] [--repeats 40]
        [--lock /work/scratch/timing.lock] [--write docs/benchmarks.md]

all-MiniLM-L6-v2, calibrated on 256 sentences, scored on the 512 others (mean and worst cosine of the
embeddings, top-10 neighbour overlap, against the fp32 original). Sizes are serialized bytes. Latency
on the first 8 held-out sentences (8 × 64 tokens), every variant interleaved in one process with a
second fp32 session as the noise pair, ``--rounds`` rounds of ``--repeats`` timed runs each; the median
of the rounds' ratios to fp32 is quoted. On a shared machine give ``--lock``: the timing then runs
only while holding that lock (``flock``'s lock), the builds before it do not.

Variants: fp32; ORT ``quantize_dynamic`` per channel (int8 anchor); ORT's own 4-bit quantizer
(``MatMulNBitsQuantizer``, block 32, the 4-bit anchor: linears only); onnxlr ``int8``, ``int4`` (now with
4-bit tables); ``mixed`` at each ``--sizes`` target (MB).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

import onnxlr
from onnxlr.models import minilm, text

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, embedding_cells, emit, interleaved_rounds, machine, marked  # noqa: E402

MARK = "transformers_size"
THREADS = 2
FP32, NOISE = "fp32", "fp32 (second session: noise pair)"
GOAL_MB = 11.3  # 8x smaller than the 90.4 MB fp32 export


def mixed_models(path: Path, calib: Path, sizes: list[float]) -> dict[float, tuple[onnx.ModelProto, object, float]]:
    """The ``mixed`` recipe at each size (MB) from one run of the optimizer, so the formats' errors and
    sensitivities are computed once: size -> (model, its mixed_precision record, seconds). The run uses
    the mixed planner in the factorizer's place (what the optimizer does for a recipe with ``mixed_bits``
    once it dispatches on it)."""
    from onnxlr import io
    from onnxlr.planning import optimizer
    from onnxlr.planning.mixed_precision import MixedPlanner
    from onnxlr.planning.options import optimize_options
    from onnxlr.planning.targets import Target

    options = optimize_options("mixed", calib=calib, target=f"bytes={sizes[0]}MB", validate=False)
    before, optimizer.Factorizer = optimizer.Factorizer, MixedPlanner
    try:
        start = time.perf_counter()
        original, _ = io.open_model(path)
        run = optimizer._Run(options, original, str(path), None, None, None, [])
        out, setup = {}, None
        for size in sizes:
            built = run.build(Target("bytes", size * 1e6))
            setup = time.perf_counter() - start if setup is None else setup
            settings = optimize_options("mixed", calib=calib, target=f"bytes={size}MB", validate=False).describe()
            model = optimizer.with_provenance(built.model, settings, None)
            record = next(r for r in built.records if r.name == "mixed_precision")
            out[size] = (model, record, time.perf_counter() - start)
            start = time.perf_counter()
    finally:
        optimizer.Factorizer = before
    return out


def ort_variants(path: Path) -> dict[str, tuple[bytes, float]]:
    """ORT's dynamic int8 per channel and its MatMulNBits 4-bit quantizer (block 32, asymmetric)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantize_dynamic(str(path), str(Path(tmp) / "q.onnx"), per_channel=True, weight_type=QuantType.QInt8)
        out["ORT dynamic int8 per channel"] = ((Path(tmp) / "q.onnx").read_bytes(), time.perf_counter() - start)
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=False)
    quantizer.process()
    out["ORT MatMulNBits 4-bit b32"] = (quantizer.model.model.SerializeToString(), time.perf_counter() - start)
    return out


def onnxlr_variants(path: Path, calib: Path, sizes: list[float]) -> tuple[dict[str, tuple[bytes, float]], dict]:
    """onnxlr int8, int4 and mixed at each size (MB); also the mixed runs' allocation records."""
    out, records = {}, {}
    for recipe in ("int8", "int4"):
        start = time.perf_counter()
        model, _ = onnxlr.optimize(path, recipe=recipe, calib=calib, validate=False)
        out[f"onnxlr {recipe}"] = (model.SerializeToString(), time.perf_counter() - start)
    for size, (model, record, seconds) in mixed_models(path, calib, sizes).items():
        label = f"onnxlr mixed, target {size:g} MB"
        out[label] = (model.SerializeToString(), seconds)
        records[label] = record
    return out, records


def format_mix(record) -> str:
    """``int4 b64 ×30, int8 ×4, …`` of a mixed allocation."""
    counts: dict[str, int] = {}
    for change in record.layers:
        counts[change.details["format"]] = counts.get(change.details["format"], 0) + 1
    return ", ".join(f"{fmt} ×{n}" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def section(cache: Path, sizes: list[float], count: int, repeats: int, lock: Path | None = None) -> str:
    path = minilm.build(cache)
    calib_npz, eval_npz = text.build_splits(cache)
    feeds = text.load(eval_npz)
    models = {FP32: (path.read_bytes(), 0.0), **ort_variants(path)}
    built, records = onnxlr_variants(path, calib_npz, sizes)
    models.update(built)
    timed = interleaved_rounds(models, {k: v[:8] for k, v in feeds.items()}, count, repeats, lock) if count else []
    reference = minilm.embed(models[FP32][0], feeds)
    fp32_mb = len(models[FP32][0]) / 1e6
    rows = ["| variant | size (MB) | smaller | cosine mean (min) | top-10 overlap | speed vs fp32, per round (median) "
            "| build (s) |", "|---|---|---|---|---|---|---|"]
    for label in [*models, NOISE]:
        blob, seconds = models.get(label, models[FP32])
        speed = [r[FP32] / r[label] for r in timed]
        cells = [label, f"{len(blob) / 1e6:.2f}", f"{fp32_mb / (len(blob) / 1e6):.2f}×",
                 *embedding_cells(reference, blob, feeds),
                 f"{' '.join(f'{v:.2f}' for v in speed)} ({np.median(speed):.2f}×)" if speed else "–", f"{seconds:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    mixes = [f"- {label}: {format_mix(record)}; predicted divergence "
             f"{record.config.get('predicted_divergence', float('nan')):.3g}" for label, record in records.items()]
    lines = [
        "## Transformers: how small at cosine 0.99, issue #22",
        "",
        f"Command: `python bench/transformers_size.py --lock /work/scratch/timing.lock --write docs/benchmarks.md "
        f"--sizes {','.join(f'{s:g}' for s in sizes)} --rounds {count} --repeats {repeats}` ({machine()}; "
        f"all-MiniLM-L6-v2, {fp32_mb:.1f} MB fp32, the 8× goal is {fp32_mb / 8:.2f} MB; latency on 8 sentences × 64 "
        f"tokens, every variant interleaved with a second fp32 session as the noise pair, {repeats} timed runs each "
        f"after 5 warm-ups, {count} rounds; fidelity on the 512 held-out sentences, calibration on the 256 others).",
        "",
        *rows,
        "",
        "Formats the mixed allocations chose (per MatMul weight and embedding table):",
        "",
        *mixes,
    ]
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--sizes", default=f"{GOAL_MB},12.5,15", help="mixed targets in MB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--lock", type=Path, help="time only while holding this file's lock (e.g. "
                        "/work/scratch/timing.lock): the builds run unlocked")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    return emit(section(args.cache_dir, sizes, args.rounds, args.repeats, args.lock), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
