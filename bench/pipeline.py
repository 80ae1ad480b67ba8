"""MiniLM's full optimize pipeline: wall time and peak memory, serial and with worker processes.

    python bench/pipeline.py [--write docs/benchmarks.md]

Each configuration is one fresh `onnxlr optimize` process on all-MiniLM-L6-v2 (calibrated on 256
sentences, validated on 512 others on the CPU provider: outputs compared and latency timed), so the
times include start-up, calibration, factorization, the rank search where there is one, writing and
validation. Peak = the process's maximum resident set (``wait4``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, emit, marked  # noqa: E402
from scaling import run_optimize  # noqa: E402

from onnxlr.models import minilm, text  # noqa: E402

MARK = "pipeline"
CONFIGS = (
    ("rank ratio 0.5", ["--rank-ratio", "0.5"]),
    ("rank ratio 0.5, 2 workers", ["--rank-ratio", "0.5", "--workers", "2"]),
    ("target params=0.8 (auto allocator)", ["--target", "params=0.8"]),
    ("target params=0.8, evolutionary", ["--target", "params=0.8", "--allocator", "evolutionary"]),
    ("target params=0.8, evolutionary, 2 workers", ["--target", "params=0.8", "--allocator", "evolutionary",
                                                    "--workers", "2"]),
)


def section(cache: Path, only: str | None = None) -> str:
    model = minilm.build(cache)
    calib, held_out = text.build_splits(cache)
    lines = ["## MiniLM full pipeline time, issue #9", "",
             "Command: `python bench/pipeline.py --write docs/benchmarks.md` (2 cores). `onnxlr optimize "
             "minilm.onnx --calib calib.npz --inputs eval.npz --repeats 20 …` in a fresh process each: start-up, "
             "calibration statistics, factorization, the rank search where there is one, validation on the "
             "CPU provider and writing, all included. Workers: processes with 1 BLAS thread each (the parent "
             "keeps calibrating and validating with ONNX Runtime's threads).", "",
             "| configuration | wall s | peak MB | output cosine (mean / worst sample) |", "|---|---|---|---|"]
    out = cache / "pipeline.small.onnx"
    for name, extra in CONFIGS:
        if only and only not in name:
            continue
        seconds, peak, log = run_optimize(model, out, "--calib", str(calib), "--inputs", str(held_out), *extra,
                                          validate=True)
        found = re.search(r"cosine ([0-9.]+) \(worst sample ([0-9.]+)\)", log)
        cosine = f"{found.group(1)} / {found.group(2)}" if found else "?"
        lines.append(f"| {name} | {seconds:.1f} | {peak:,.0f} | {cosine} |")
        print(lines[-1], file=sys.stderr)
    out.unlink(missing_ok=True)
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--only", help="run only the configurations whose name contains this (printed, "
                        "not written: a partial table)")
    args = parser.parse_args(argv)
    if args.only:
        args.write = None  # a partial table is not written over the whole one
    return emit(section(args.cache_dir, args.only), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
