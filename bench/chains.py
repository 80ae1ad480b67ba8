"""Linear chains (issue #10): which reference models have them, and what composing them changes.

    python bench/chains.py [--cache-dir DIR] [--write docs/benchmarks.md]

Every reference model is searched for chains of linear layers (``find_chains``) as it arrives.
Where chains occur, the compose pass (calibrated; ``max_error`` 1e-3, the default, 1e-2 and 5e-2) runs on the model as exported
and after a calibrated factorization (PP-OCRv4 det: convs ``auto`` at conv ratio 0.5 with the layer
error bound 0.05, as in the conv benchmark; MiniLM: MatMul rank ratio 0.5), and the model before and
after the pass is compared: parameters, MACs at the working shape, latency (whole model, 2 threads,
both sessions timed interleaved in one process, median of 30 runs) and fidelity on held-out inputs.
Calibration and evaluation data are disjoint: PP-OCRv4 det is calibrated on 2 of
the 5 real page tiles and scored on the 3 others; the direction classifier on 6 of the 16 text-line
crops of the page (first 192 columns, its input width) and scored on the 10 others; MiniLM calibrated
on 256 sentences and scored on 512 others.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxlr import api, chains
from onnxlr.graph import count_parameters, import_graph
from onnxlr.io import load_model
from onnxlr.macs import count_macs
from onnxlr.models import metrics, minilm, mnist, ppocr, pypi_models, text
from onnxlr.passes.compose_chains import ComposeChainsConfig, ComposeLinearChains
from onnxlr.passes.linear_chains import find_chains
from onnxlr.passes.fold_constants import FoldConstants
from onnxlr.pipeline import PassManager
from onnxlr.runtimes.calibration import StatisticsService
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import cache_main, marked  # noqa: E402

MARK = "chains"
THREADS = 2
REPEATS = 30
MAX_ERRORS = (ComposeChainsConfig.max_error, 1e-2, 5e-2)  # the default, and two looser tolerances


def _folded(path) -> onnx.ModelProto:
    return PassManager([FoldConstants()]).run(load_model(path))[0]


def _session(model: onnx.ModelProto):
    return make_session(model.SerializeToString(), "CPUExecutionProvider", THREADS)


class Subject:
    """A reference model with its calibration feeds, held-out feeds, working dims and fidelity."""

    def __init__(self, name, path, calib, held_out, dims, fidelity, timing_feeds=None, factorize=None):
        self.name, self.model = name, _folded(path)
        self.calib, self.held_out, self.dims, self.fidelity = calib, held_out, dims, fidelity
        self.factorize = factorize  # optimize() options of the factorized stage; None: no such stage
        self.timing_feeds = timing_feeds or {k: v[:1] for k, v in held_out.items()}

    def outputs(self, model):
        return _session(model).run(None, self.held_out)[0]


def _det_fidelity(ref, got):
    return ", ".join(f"{k} {v:.4g}" for k, v in ppocr.det_agreement(ref, got).items())


def _probs_fidelity(ref, got):
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    return f"top-1 agreement {metrics.top1_agreement(ref, got):.3f}, rel L2 {rel:.2e}"


def _embedding_fidelity(ref, got):
    return f"cosine {metrics.cosine_rows(ref, got).mean():.4f} (worst {metrics.cosine_rows(ref, got).min():.4f})"


def subjects(cache: Path) -> list[Subject]:
    out = []
    det_x = ppocr.sample_inputs(cache)["det"][ppocr.INPUT_NAME]
    rec_x = ppocr.sample_inputs(cache)["rec"][ppocr.INPUT_NAME]
    v4_det = pypi_models.locate("ppocrv4_det")
    if v4_det:
        out.append(Subject("PP-OCRv4 det", v4_det, {"x": det_x[:2]}, {"x": det_x[2:]},
                           {"p2o.DynamicDimension.1": 640, "p2o.DynamicDimension.2": 640}, _det_fidelity,
                           factorize={"conv_ratio": 0.5, "conv_max_error": 0.05}))
    cls = pypi_models.locate("ppocr_cls")
    if cls:
        crops = np.ascontiguousarray(rec_x[..., :192])
        out.append(Subject("PP-OCR mobile v2.0 cls", cls, {"x": crops[:6]}, {"x": crops[6:]}, {}, _probs_fidelity))
    calib_npz, eval_npz = text.build_splits(cache)
    with np.load(calib_npz) as c, np.load(eval_npz) as e:
        calib = {k: c[k] for k in c.files}
        held = {k: e[k] for k in e.files}
    out.append(Subject("all-MiniLM-L6-v2", minilm.build(cache), calib, held,
                       {"batch": 1, "sequence": 64}, _embedding_fidelity,
                       timing_feeds={k: v[:8] for k, v in held.items()}, factorize={"rank_ratio": 0.5}))
    return out


def survey(cache: Path) -> list[str]:
    """Chains in every reference model, as it arrives."""
    paths = {"all-MiniLM-L6-v2": minilm.build(cache), "MNIST LeNet": mnist.build(cache)}
    paths.update({f"PP-OCRv6 {k}": v for k, v in ppocr.build(cache).items()})
    names = {"ppocrv4_det": "PP-OCRv4 det", "ppocrv4_rec": "PP-OCRv4 rec", "ppocr_cls": "PP-OCR mobile v2.0 cls",
             "silero_vad": "silero-vad", "silero_vad_ifless": "silero-vad (op18, If-less)"}
    for key, name in names.items():
        if pypi_models.locate(key):
            paths[name] = pypi_models.locate(key)
    rows = ["| model | MatMul / Gemm / Conv | chains as exported | their widths |", "|---|---|---|---|"]
    for name, path in paths.items():
        graph = import_graph(_folded(path))
        counts = [sum(n.op == op for n in graph.nodes) for op in ("MatMul", "Gemm", "Conv")]
        found = find_chains(graph)
        widths = "; ".join("→".join(map(str, c.widths())) + f" ({'→'.join(s.node.op for s in c.steps)})"
                           for c in found)
        rows.append(f"| {name} | {' / '.join(map(str, counts))} | {len(found)} | {widths or '—'} |")
    return rows


def compose(model: onnx.ModelProto, calib: dict, max_error: float) -> tuple[onnx.ModelProto, object, float]:
    start = time.perf_counter()
    composing = ComposeLinearChains(ComposeChainsConfig(max_error))
    composing.stats = StatisticsService.of(model, [calib]).collect_for(model, composing)
    composed, [record] = PassManager([composing]).run(model)
    return composed, record, time.perf_counter() - start


def factorize(subject: Subject) -> onnx.ModelProto:
    factorized, _ = api.optimize(subject.model, calib=[subject.calib], validate=False, batch_size=1, **subject.factorize)
    return factorized


def comparison(subjects_: list[Subject]) -> list[str]:
    rows = ["| model | stage | max error | chains found / rewritten | params | MACs | latency | fidelity to the original |",
            "|---|---|---|---|---|---|---|---|"]
    details = []
    for s in subjects_:
        reference = s.outputs(s.model)
        base_params, base_macs = count_parameters(s.model), count_macs(s.model, s.dims).total
        stages = [("as exported", s.model)]
        if s.factorize is not None:
            start = time.perf_counter()
            stages.append(("factorized", factorize(s)))
            print(f"{s.name}: factorized in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for (label, before), max_error in ((stage, e) for stage in stages for e in MAX_ERRORS):
            after, record, seconds = compose(before, s.calib, max_error)
            timing = measure({"before": _session(before), "after": _session(after)}, s.timing_feeds,
                             warmup=3, repeats=REPEATS)
            b_ms, a_ms = timing["before"].median_ms, timing["after"].median_ms
            p_b, p_a = count_parameters(before), count_parameters(after)
            m_b, m_a = count_macs(before, s.dims).total, count_macs(after, s.dims).total
            rows.append(
                f"| {s.name} | {label} → composed | {max_error:g} | {len(record.layers)} / {len(record.rewritten)} | "
                f"{p_b:,} → {p_a:,} ({p_a / p_b:.1%}; {p_a / base_params:.1%} of the original) | "
                f"{m_b / 1e6:,.1f} M → {m_a / 1e6:,.1f} M ({m_a / m_b:.1%}; {m_a / base_macs:.1%}) | "
                f"{b_ms:.2f} → {a_ms:.2f} ms ({b_ms / a_ms:.2f}×) | "
                f"{s.fidelity(reference, s.outputs(before))} → {s.fidelity(reference, s.outputs(after))} |")
            print(rows[-1], f"[composed in {seconds:.1f} s]", file=sys.stderr, flush=True)
            for c in record.rewritten:
                d = c.details
                details.append(f"| {s.name} | {label} | {max_error:g} | `{c.node}` | {'→'.join(d['ops'])} | "
                               f"{'→'.join(map(str, d['widths']))} | {'→'.join(map(str, d['new_widths']))} ({d['form']}) | "
                               f"{d['params']:,} → {d['params_after']:,} | "
                               + (f"output {d['calib_error']:.1e} |" if d["calibrated"] else
                                  f"weight {d['weight_error']:.1e} ({d.get('note', 'no statistics').split(':')[0]}) |"))
    return rows, details


def section(cache: Path) -> str:
    subs = subjects(cache)
    rows, details = comparison(subs)
    lines = [
        "## Linear chains, issue #10",
        "",
        f"Command: `python bench/chains.py --write docs/benchmarks.md` (onnxruntime {ort.__version__}, "
        f"{os.cpu_count()} cores). " + __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "### Which reference models have chains",
        "",
        *survey(cache),
        "",
        "### Before and after the compose pass",
        "",
        "Working shapes: PP-OCRv4 det 1×3×640×640, the classifier 1×3×48×192, MiniLM batch 1 × 64 tokens "
        "for MACs and 8 × 64 for latency. Fidelity: det — relative L2 and max |Δ| of the probability map "
        "and IoU of the text mask at rapidocr's threshold 0.3; cls — top-1 agreement and relative L2 of "
        "the class probabilities; MiniLM — mean (worst) cosine of the sentence embeddings; each against "
        "the original model, before → after composing.",
        "",
        *rows,
        "",
        "Every chain rewritten. Error: `output`, the relative error of the chain's output on the calibration "
        "data; `weight`, the relative error of the composed weight, where the chain's input had fewer than "
        f"{chains.MIN_ROWS_PER_INPUT} calibration rows per feature and the width was read off the weights:",
        "",
        "| model | stage | max error | chain (first node) | ops | widths | new widths | params | error |",
        "|---|---|---|---|---|---|---|---|---|",
        *details,
    ]
    return marked(MARK, lines)


def main(argv=None) -> int:
    return cache_main(section, __doc__, MARK, argv)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
