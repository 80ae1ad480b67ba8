"""Quantization and sparsity recipes (issue #5) against ONNX Runtime's own quantizers, side by side.

    python bench/quantize.py [--cache-dir DIR] [--write docs/benchmarks.md]
    python bench/quantize.py --ab 5      # the speed goal alone: ORT int8 per channel vs onnxlr int8

Every recipe of ``onnxlr recipes`` and ORT's ``quantize_dynamic`` (per tensor, per channel) and
``MatMulNBitsQuantizer`` (4-bit, block 32) run on the same model, in one process; the variants' latency
is measured interleaved (A B C … A B C …) after warm-ups and quoted as the ratio of medians to the
original's. Calibration and evaluation data are disjoint: MiniLM is calibrated on 256 sentences and
scored on 512 others (batch 8 × 64 tokens for latency), the MNIST LeNet calibrated on 256 training
digits and scored on the 1000 test digits (batch 64 for latency, 5× the repeats). Size = bytes of the serialized model.
``lowrank+int8`` factorizes with ``--target params=0.9`` first.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

import onnxlr
from onnxlr.models import minilm, mnist, text
from onnxlr.planning.recipes import RECIPES
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, embedding_cells, emit, lenet_rows, machine, marked  # noqa: E402

MARK = "quantize"
THREADS = 2
RECIPE_OPTIONS = {"lowrank+int8": {"target": "params=0.9"}}


def ort_baselines(path: Path) -> dict[str, tuple[bytes, float]]:
    """label -> (serialized model, build seconds) for ONNX Runtime's own quantizers."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, per_channel in (("ORT quantize_dynamic, per tensor", False),
                                   ("ORT quantize_dynamic, per channel", True)):
            dst = Path(tmp) / "q.onnx"
            start = time.perf_counter()
            quantize_dynamic(str(path), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)
            out[label] = (dst.read_bytes(), time.perf_counter() - start)
        start = time.perf_counter()
        quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=4, block_size=32, is_symmetric=True)
        quantizer.process()
        out["ORT MatMulNBits 4-bit, block 32"] = (quantizer.model.model.SerializeToString(),
                                                  time.perf_counter() - start)
    return out


def recipes(path: Path, calib) -> dict[str, tuple[bytes, float]]:
    """label -> (serialized model, build seconds) for every onnxlr recipe (statistics, passes, checks)."""
    out = {}
    for name in RECIPES:
        if name == "lowrank":
            continue  # measured in the calibrated and allocation sections
        start = time.perf_counter()
        model, _ = onnxlr.optimize(path, recipe=name, calib=calib, validate=False, **RECIPE_OPTIONS.get(name, {}))
        out[f"onnxlr {name}"] = (model.SerializeToString(), time.perf_counter() - start)
    return out


def variants(path: Path, calib) -> dict[str, tuple[bytes, float]]:
    return {"original (fp32)": (path.read_bytes(), 0.0), **ort_baselines(path), **recipes(path, calib)}


def timing(models: dict[str, tuple[bytes, float]], feeds, repeats: int):
    sessions = {label: make_session(blob, "CPUExecutionProvider", THREADS) for label, (blob, _) in models.items()}
    return measure(sessions, feeds, warmup=5, repeats=repeats)


def bench_minilm(cache: Path, repeats: int) -> list[str]:
    path = minilm.build(cache)
    calib_npz, eval_npz = text.build_splits(cache)
    feeds = text.load(eval_npz)
    models = variants(path, calib_npz)
    times = timing(models, {k: v[:8] for k, v in feeds.items()}, repeats)
    reference = minilm.embed(models["original (fp32)"][0], feeds)
    base = times["original (fp32)"].median_ms
    rows = ["| variant | size (MB) | speed-up (b8×64) | cosine mean (min) | top-10 overlap | build (s) |",
            "|---|---|---|---|---|---|"]
    for label, (blob, seconds) in models.items():
        cells = [label, f"{len(blob) / 1e6:.2f}", f"{base / times[label].median_ms:.2f}×",
                 *embedding_cells(reference, blob, feeds), f"{seconds:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def bench_mnist(cache: Path, repeats: int) -> list[str]:
    path = mnist.build(cache)
    images, labels = mnist.load_test(cache)
    models = variants(path, cache / "mnist_calib.npz")
    times = timing(models, {"image": images[:64]}, 5 * repeats)  # a run takes ~2 ms: more of them
    base = times["original (fp32)"].median_ms
    columns = {label: [f"{len(blob) / 1e3:.1f}", f"{base / times[label].median_ms:.2f}×", f"{seconds:.1f}"]
               for label, (blob, seconds) in models.items()}
    return ["| variant | size (KB) | speed-up (b64) | build (s) | accuracy | top-1 agreement |",
            "|---|---|---|---|---|---|",
            *lenet_rows({label: blob for label, (blob, _) in models.items()}, images, labels, columns)]


def section(cache: Path, repeats: int) -> str:
    lines = [
        "## Quantization and sparsity recipes, issue #5",
        "",
        f"Command: `python bench/quantize.py --write docs/benchmarks.md` ({machine()}; {repeats} interleaved timed "
        "runs of every variant after 5 warm-ups, speed-up = original median / variant median). "
        "`onnxlr recipes` describes each recipe.",
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


def ab(cache: Path, runs: int, repeats: int = 300) -> None:
    """The speed goal alone: original, ORT per-channel int8 and onnxlr int8 on MiniLM, interleaved,
    ``repeats`` timed runs each, ``runs`` times over (prints one line per run)."""
    path = minilm.build(cache)
    calib_npz, eval_npz = text.build_splits(cache)
    feeds = {k: v[:8] for k, v in text.load(eval_npz).items()}
    models = {"original": (path.read_bytes(), 0.0)}
    models.update({k: v for k, v in ort_baselines(path).items() if "per channel" in k})
    models["onnxlr int8"] = (onnxlr.optimize(path, recipe="int8", calib=calib_npz, validate=False)[0]
                             .SerializeToString(), 0.0)
    print("  ".join(f"{label}: {len(blob):,} bytes" for label, (blob, _) in models.items()))
    for run in range(runs):
        times = timing(models, feeds, repeats)
        base = times["original"].median_ms
        print(f"run {run + 1}: " + "  ".join(f"{label} {base / t.median_ms:.3f}×" for label, t in times.items()))


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--ab", type=int, metavar="RUNS",
                        help="only time ORT per-channel int8 against onnxlr int8 on MiniLM, RUNS times")
    args = parser.parse_args(argv)
    if args.ab:
        ab(args.cache_dir, args.ab)
        return 0
    return emit(section(args.cache_dir, args.repeats), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
