"""How optimize's time and peak memory grow with model size, with the fitted growth exponent.

    python bench/scaling.py [--write docs/benchmarks.md] [--work-dir DIR] [--largest-width 2048]

Synthetic transformer stacks (models/synthetic.py: 12·width² MatMul parameters per block) from ~1M to
~1B parameters and CNN stacks (3×3 convs) from ~1M to ~230M are built with every weight in an external
data file; each is optimized by `onnxlr optimize --rank-ratio 0.2 --no-validate` (plain SVD: the
optimizer's own cost, no ONNX Runtime run) in a fresh process, whose wall time and peak resident memory
(``wait4``'s ru_maxrss: everything the process held at its peak, the Python interpreter and
libraries included) are recorded. Models with external data are processed streamed (onnxlr.io mapped
load). The growth exponent is the slope of log(time) (log(peak memory)) against log(parameters),
least squares over the sizes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, emit, marked  # noqa: E402

from onnxlr.models.synthetic import cnn_stack, transformer_stack  # noqa: E402

MARK = "scaling"
TRANSFORMERS = ((64, 20), (128, 20), (256, 16), (512, 12), (1024, 8), (1536, 12), (2048, 20))  # (width, blocks)
CNNS = ((64, 24), (128, 24), (256, 24), (512, 24), (1024, 24))  # (channels, layers)


def run_optimize(model: Path, out: Path, *extra: str, validate: bool = False) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, its report text) of one `onnxlr optimize` process."""
    command = [sys.executable, "-m", "onnxlr", "optimize", str(model), "-o", str(out), *extra,
               *([] if validate else ["--no-validate"])]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def _bytes_of(model: Path) -> int:
    return sum(f.stat().st_size for f in model.parent.glob(model.name + "*"))


def _fit(params, values) -> float:
    return float(np.polyfit(np.log(params), np.log(values), 1)[0])


def growth_line(kind: str, params, seconds, peak) -> str:
    """The fitted exponents over every size, and from 50M parameters up (past the fixed start-up:
    imports, ~2.5 s and ~270 MB, which flatten the small end)."""
    params, seconds, peak = map(np.asarray, (params, seconds, peak))
    big = params >= 5e7
    return (f"- {kind}, {params[0] / 1e6:.1f}M–{params[-1] / 1e6:,.0f}M: time ∝ params^{_fit(params, seconds):.2f}, "
            f"peak memory ∝ params^{_fit(params, peak):.2f}; from 50M up: time ∝ params^"
            f"{_fit(params[big], seconds[big]):.2f}, peak ∝ params^{_fit(params[big], peak[big]):.2f}")


def bench(kind: str, sizes, work: Path, largest: int | None) -> tuple[list[str], list[tuple]]:
    rows, points = [], []
    for width, depth in sizes:
        if largest is not None and width > largest:
            continue
        folder = work / f"{kind}_{width}x{depth}"
        folder.mkdir(parents=True, exist_ok=True)
        model = folder / "model.onnx"
        if kind == "transformer":
            transformer_stack(model, width=width, blocks=depth)
            params = 12 * width * width * depth
        else:
            cnn_stack(model, channels=width, layers=depth)
            params = 9 * width * width * depth
        size = _bytes_of(model)
        out = folder / "out.onnx"
        extra = ["--rank-ratio", "0.2"] + (["--conv", "channel", "--conv-ratio", "0.4"] if kind == "cnn" else [])
        seconds, peak, log = run_optimize(model, out, *extra)
        written = _bytes_of(out)
        rows.append(f"| {kind} {width}×{depth} | {params / 1e6:,.1f}M | {size / 1e6:,.0f} MB | {seconds:.1f} | "
                    f"{peak:,.0f} | {peak * 1024**2 / size:.2f} | {written / 1e6:,.0f} MB |")
        print(rows[-1], file=sys.stderr)
        points.append((params, seconds, peak, size))
        shutil.rmtree(folder)
    return rows, points


def section(work: Path, largest: int | None) -> str:
    lines = ["## Optimizer cost vs model size, issue #9", "",
             "Command: `python bench/scaling.py --write docs/benchmarks.md` (2 cores; each run `onnxlr optimize "
             "MODEL --rank-ratio 0.2 --no-validate`, CNNs with `--conv channel --conv-ratio 0.4`, in a fresh "
             "process; every model stored with external data, so processed streamed). Peak = the process's "
             "maximum resident set (interpreter, onnx, onnxruntime and numpy included: about 270 MB before "
             "any model is read); peak / size = that over the model's bytes on disk.", "",
             "| model | params | size | time s | peak MB | peak / size | output |", "|---|---|---|---|---|---|---|"]
    fits = []
    for kind, sizes in (("transformer", TRANSFORMERS), ("cnn", CNNS)):
        rows, points = bench(kind, sizes, work, largest)
        lines += rows
        if len(points) >= 3:
            params, seconds, peak, _ = map(np.array, zip(*points))
            fits.append(growth_line(kind, params, seconds, peak))
    lines += ["", "Fitted growth (least squares on log–log):", "", *fits]
    return marked(MARK, lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--work-dir", type=Path, help="where the models are built (default: a temporary folder; "
                        "the largest needs ~6 GB free)")
    parser.add_argument("--largest-width", type=int, help="skip models wider than this (a quick run)")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="onnxlr-scaling-"))
    try:
        return emit(section(work, args.largest_width), args, MARK)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
