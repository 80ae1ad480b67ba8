"""Providers and devices (issue #7): error and latency per execution provider, mobile checks, .ort size.

    python bench/providers.py [--cache-dir DIR] [--write docs/benchmarks.md] [--device .venv-openvino/bin/python]

Each reference model is optimized by three recipes (``lowrank``: factorization at ``--target params=0.8`` (MiniLM; 0.5
for LeNet) with the knapsack; ``int8``: integer MatMuls, ORT's fused kernels; ``int8-qdq``: the same as
QuantizeLinear/DequantizeLinear pairs, the portable form for other providers) and validated by
``onnxlr.validate(original, optimized, providers="all", devices=[local, the OpenVINO venv])``: every
provider of each onnxruntime build, outputs over the evaluation data, latency interleaved with the
original (batch 8 × 64 tokens for MiniLM, 64 digits for LeNet), ORT's per-node profile. Mobile: ORT's
static NNAPI / CoreML partition check of both models at the validated shapes. ``.ort``: the optimized
model in ONNX Runtime's format, loaded back and compared with the .onnx.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

import onnxlr
from onnxlr.feeds import sample_inputs
from onnxlr.models import minilm, mnist, text
from onnxlr.runtimes.mobile import convert_to_ort
from onnxlr.runtimes.runner import NOT_DEVICES, batches

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, emit, marked  # noqa: E402

MARK = "providers"
THREADS = 2
RECIPES = ("lowrank", "int8", "int8-qdq")
TARGET = {"MiniLM": "params=0.8", "LeNet": "params=0.5"}


def rows_for(name: str, path: Path, calib, inputs, batch: int, device: str, repeats: int) -> list[str]:
    rows, notes = [], []
    for recipe in RECIPES:
        options = {"target": TARGET[name], "allocator": "knapsack"} if recipe == "lowrank" else {}
        start = time.perf_counter()
        optimized, _ = onnxlr.optimize(path, recipe=recipe, calib=calib, validate=False, threads=THREADS, **options)
        built = time.perf_counter() - start
        report = onnxlr.validate(path, optimized, providers="all", devices=[device], inputs=inputs,
                                 threads=THREADS, batch_size=batch, repeats=repeats)
        v = report.validation
        for p in v.providers:
            if not p.available or p.reason:
                if p.provider not in NOT_DEVICES:
                    notes.append(f"{name} {recipe}, {p.provider} on {p.device}: {p.reason}")
                continue
            o = p.outputs[0]
            where = "this venv" if p.device == "local" else "OpenVINO venv"
            placement = ", ".join(f"{n} on {prov.replace('ExecutionProvider', '')}"
                                  for prov, n in p.profile.placement["optimized"].items())
            if p.profile.layers:
                before, after = (sum(getattr(t, f) for t in p.profile.layers) for f in ("before_ms", "after_ms"))
                slowest = p.profile.layers[0]
                notes.append(f"{name} {recipe}, {p.provider.replace('ExecutionProvider', '')} on {where}: ORT profile, "
                             f"{len(p.profile.layers)} rewritten layers {before:.2f} → {after:.2f} ms of kernel time "
                             f"(all kernels {p.profile.total_ms[0]:.2f} → {p.profile.total_ms[1]:.2f} ms); slowest "
                             f"`{slowest.node}` {slowest.before_ms:.3f} → {slowest.after_ms:.3f} ms")
            rows.append(f"| {name} | {recipe} | {p.provider.replace('ExecutionProvider', '')} ({where}, ORT "
                        f"{p.onnxruntime}) | {o.cosine:.4f} | {o.rel_l2:.4f} | {p.latency_original.median_ms:.2f} | "
                        f"{p.latency_optimized.median_ms:.2f} | {p.speedup:.2f} | {placement} |")
        for check in v.mobile:
            a, b = check.original, check.optimized
            notes.append(f"{name} {recipe}, {check.target} (static): {a.partitions} partitions, "
                         f"{a.supported_nodes}/{a.nodes} nodes → {b.partitions} partitions, "
                         f"{b.supported_nodes}/{b.nodes} nodes, suitability {a.suitability} → {b.suitability}")
        for warning in v.warnings:
            notes.append(f"{name} {recipe}: warning: {warning}")
        with tempfile.TemporaryDirectory() as tmp:
            feeds, _ = sample_inputs(optimized, inputs)
            conversion = convert_to_ort(optimized, Path(tmp) / "m.ort", feeds=next(batches(feeds, batch)))
        notes.append(f"{name} {recipe}: built in {built:.1f} s; .onnx {optimized.ByteSize():,} B, .ort "
                     f"{conversion.bytes:,} B ({'runs, max abs diff %.2g' % conversion.max_abs_diff if conversion.ok else conversion.reason})")
    return rows + [""] + [f"- {n}" for n in notes]


def section(cache: Path, device: str, repeats: int) -> str:
    mini = minilm.build(cache)
    calib_npz, eval_npz = text.build_splits(cache)
    lenet = mnist.build(cache)
    head = ["| model | recipe | provider (environment) | cosine | rel L2 | original ms | optimized ms | speed-up "
            "| optimized nodes placed |", "|---|---|---|---|---|---|---|---|---|"]
    lenet_rows = rows_for("LeNet", lenet, cache / "mnist_calib.npz", cache / "mnist_test.npz", 64, device, repeats * 5)
    mini_rows = rows_for("MiniLM", mini, calib_npz, eval_npz, 8, device, repeats)
    split = lambda rows: ([r for r in rows if r.startswith("|")], [r for r in rows if not r.startswith("|")])  # noqa: E731
    (t1, n1), (t2, n2) = split(mini_rows), split(lenet_rows)
    lines = ["## Providers and devices, issue #7", "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             f"Command: `python bench/providers.py --device {device} --write docs/benchmarks.md`; "
             f"{platform.processor() or platform.machine()}, {THREADS} threads, onnxruntime {ort.__version__} here.",
             "", *head, *t1, *t2, "", "Every provider of each build is listed; " + ", ".join(
                 f"{p} ({why})" for p, why in NOT_DEVICES.items()) + " is listed and not run.", "",
             *[n for n in n1 + n2 if n]]
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--device", default=".venv-openvino/bin/python",
                        help="command prefix of the Python holding onnxruntime-openvino")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    return emit(section(args.cache_dir, args.device, args.repeats), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
