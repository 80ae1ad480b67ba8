"""Transformers past ONNX Runtime's own int8 (issue #22): MiniLM speed and fidelity against the anchors.

    python bench/transformers.py [--cache-dir DIR] [--rounds 4] [--repeats 60] [--write docs/benchmarks.md]

all-MiniLM-L6-v2, calibrated on 256 sentences, scored on the 512 others (mean and worst cosine of the
embeddings, top-10 neighbour overlap, against the fp32 original). Latency on the first 8 held-out
sentences (8 × 64 tokens), every variant interleaved in one process (A B C … A B C …, ``--repeats``
timed runs each after warm-ups), ``--rounds`` times over; each round's ratio of medians is quoted, and a
second session of the fp32 model is the noise pair (its ratio to the first shows what "no difference"
looks like on this machine). Sessions run with ORT's thread spinning off (runtimes/runner.py: with it on,
interleaved sessions slow each other).

Variants: fp32; ORT ``quantize_dynamic`` per channel (the anchor); the same with the attention mask
softened by onnxlr's pass (to show how much of the gain any int8 model gets from that fix alone); onnxlr
``--recipe int8`` (which softens the mask when the calibration data show it exact).
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
from onnxlr.passes.soften_attention_mask import SoftenAttentionMask
from onnxlr.pipeline import PassManager
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, embedding_cells, emit, machine, marked  # noqa: E402

MARK = "transformers"
THREADS = 2
FP32, NOISE, ORT, ORT_SOFT, ONNXLR = ("fp32", "fp32 (second session: noise pair)", "ORT dynamic int8 per channel",
                                      "ORT dynamic int8 + softened mask", "onnxlr int8")


def build_variants(path: Path, calib_npz: Path) -> dict[str, tuple[bytes, float]]:
    """label -> (serialized model, seconds to build it)."""
    out = {FP32: (path.read_bytes(), 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantize_dynamic(str(path), str(Path(tmp) / "q.onnx"), per_channel=True, weight_type=QuantType.QInt8)
        out[ORT] = ((Path(tmp) / "q.onnx").read_bytes(), time.perf_counter() - start)
    softened, _ = PassManager([SoftenAttentionMask()]).run(onnx.load_model_from_string(out[ORT][0]))
    out[ORT_SOFT] = (softened.SerializeToString(), out[ORT][1])
    start = time.perf_counter()
    model, _ = onnxlr.optimize(path, recipe="int8", calib=calib_npz, validate=False)
    out[ONNXLR] = (model.SerializeToString(), time.perf_counter() - start)
    return out


def rounds(models: dict[str, tuple[bytes, float]], feeds, count: int, repeats: int) -> list[dict[str, float]]:
    """Per round, label -> median ms, every model (and the noise pair) interleaved."""
    sessions = {label: make_session(blob, "CPUExecutionProvider", THREADS) for label, (blob, _) in models.items()}
    sessions[NOISE] = make_session(models[FP32][0], "CPUExecutionProvider", THREADS)
    out = []
    for _ in range(count):
        times = measure(sessions, feeds, warmup=5, repeats=repeats)
        out.append({label: t.median_ms for label, t in times.items()})
    return out


def section(cache: Path, count: int, repeats: int) -> str:
    path = minilm.build(cache)
    calib_npz, eval_npz = text.build_splits(cache)
    feeds = text.load(eval_npz)
    models = build_variants(path, calib_npz)
    timed = rounds(models, {k: v[:8] for k, v in feeds.items()}, count, repeats)
    reference = minilm.embed(models[FP32][0], feeds)
    rows = ["| variant | size (MB) | cosine mean (min) | top-10 overlap | speed-up over fp32, per round (median) "
            "| speed-up over ORT int8, per round (median) | build (s) |", "|---|---|---|---|---|---|---|"]
    for label in [*models, NOISE]:
        blob, seconds = models.get(label, models[FP32])
        over_fp32 = [r[FP32] / r[label] for r in timed]
        over_ort = [r[ORT] / r[label] for r in timed]
        cells = [label, f"{len(blob) / 1e6:.2f}", *embedding_cells(reference, blob, feeds),
                 _ratios(over_fp32), _ratios(over_ort), f"{seconds:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    lines = [
        "## Transformers: faster than ONNX Runtime's own int8, issue #22",
        "",
        f"Command: `python bench/transformers.py --write docs/benchmarks.md --rounds {count} --repeats {repeats}` "
        f"({machine()}; all-MiniLM-L6-v2, latency on 8 sentences × 64 tokens, every variant interleaved, "
        f"{repeats} timed runs each after 5 warm-ups, {count} rounds; fidelity on the 512 held-out sentences, "
        "calibration on the 256 others).",
        "",
        *rows,
    ]
    return marked(MARK, lines)


def _ratios(values: list[float]) -> str:
    return f"{' '.join(f'{v:.2f}' for v in values)} ({np.median(values):.2f}×)"


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)
    return emit(section(args.cache_dir, args.rounds, args.repeats), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
