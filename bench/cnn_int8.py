"""Static int8 for CNNs (issue #21): onnxlr's int8-cnn route against ONNX Runtime's quantize_static, per
reference CNN, speed and task output side by side.

    flock /work/scratch/timing.lock python bench/cnn_int8.py [--models layout,orientation] [--write docs/benchmarks.md]

Per model (:mod:`onnxlr.models.cnn`), in one process: fp32 (twice: the noise pair), fp32 after onnxlr's
exact float rewrites (BatchNorm folding, HardSwish fusion), ORT ``quantize_static`` QDQ per channel as a
user runs it by default (after ``quant_pre_process``), the same with the head excluded by hand the way ORT
maintainers advise (``reduce_range=True``, the nodes from each output back to its nearest weight layer in
``nodes_to_exclude``), and onnxlr (``onnxlr.planning.conv_int8.search``: choices judged by the task on the
calibration data, int8 kept only if measured faster). Latency: interleaved runs on the model's timing
input after warm-ups, medians, speed-up = fp32 median / variant median. Task check on held-out data
disjoint from calibration.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxlr.graph import import_graph
from onnxlr.integer_regions import head_nodes
from onnxlr.models import cnn
from onnxlr.planning import conv_int8, optimizer
from onnxlr.runtimes.calibration import StatisticsService
from onnxlr.runtimes.devices import Device
from onnxlr.runtimes.fusions import fused_op_counts
from onnxlr.runtimes.latency import measure
from onnxlr.runtimes.providers import make_session

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, bench_parser, emit, machine, marked, write_section  # noqa: E402

MARK = "cnn_int8"
OPENVINO = Path(__file__).resolve().parents[1] / ".venv-openvino" / "bin" / "python"
OPENVINO_CALL_BYTES = 200 * 2**20
REJECTED = "onnxlr int8 candidate (rejected by the search)"


def prepared(path: Path) -> onnx.ModelProto:
    """The model as onnxlr's optimizer sees it: opset ≥ 13 (per-axis DequantizeLinear), then
    :func:`onnxlr.planning.optimizer.prepare`."""
    model = onnx.load(str(path))
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        model = onnx.version_converter.convert_version(model, 13)
    return optimizer.prepare(model)[0]


class _Reader:
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def ort_anchors(model: onnx.ModelProto, calib: list[dict]) -> dict[str, bytes]:
    """ORT quantize_static QDQ per channel: default, and head excluded by hand."""
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = {}
    # ORT's symbolic shape inference writes scratch files into the working directory
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        src, pre = Path(tmp) / "src.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, str(src))
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # noqa: BLE001 - PP-OCR: "Incomplete symbolic shape inference"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        head = sorted(head_nodes(import_graph(onnx.load(str(pre)))))
        for label, kwargs in (("ORT static QDQ, default", {}),
                              ("ORT static QDQ, head excluded by hand", {"reduce_range": True, "nodes_to_exclude": head})):
            dst = Path(tmp) / "q.onnx"
            quantize_static(str(pre), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True, **kwargs)
            out[label] = dst.read_bytes()
    return out


def variants(ref: cnn.Reference, repeats: int) -> tuple[dict[str, bytes], dict]:
    model = prepared(ref.path)
    start = time.perf_counter()
    service = StatisticsService.of(model, ref.calib, batch_size=1 if ref.name != "ppocr_rec" else 8, threads=THREADS)
    calib_ref = ref.task(model, ref.calib_task)
    evaluate = lambda m: ref.compare(calib_ref, ref.task(m, ref.calib_task))["error"]  # noqa: E731
    # entropy ranges are left out here for time (KL over ~400 tensors per build); the search offers them
    result = conv_int8.search(model, service, evaluate=evaluate, threads=THREADS, repeats=repeats,
                              rules=("minmax", "mse", "percentile"))
    built = {"seconds": time.perf_counter() - start, **result.search.config}
    fp32 = ref.path.read_bytes()
    models = {"fp32": fp32, "fp32 (noise pair)": fp32,
              "fp32 + onnxlr float rewrites": conv_int8.float_prepass(model)[0].SerializeToString(),
              **ort_anchors(model, ref.calib), "onnxlr int8-cnn": result.model.SerializeToString()}
    if built["kept"] != "int8":  # what the search measured and rejected, to show why
        models[REJECTED] = result.int8.SerializeToString()
    if result.uniform is not None and result.uniform is not result.int8:  # before mixed precision
        models["onnxlr int8 everywhere (before mixed precision)"] = result.uniform.SerializeToString()
    return models, built


def openvino_times(models: dict[str, bytes], feed: dict, repeats: int) -> dict[str, float]:
    """Median ms of each model on OpenVINO EP through ``--device OPENVINO`` (every model interleaved in
    one process there); empty without that device."""
    if not OPENVINO.exists():
        return {}
    rows = len(next(iter(feed.values())))  # the whole timing feed, as on the CPU EP (rec: 8 lines)
    response = Device.parse(str(OPENVINO)).run(models, feed, providers=["OpenVINOExecutionProvider"], threads=THREADS,
                                               batch_size=rows, warmup=3, repeats=repeats, profile_runs=0)
    (result,) = response["results"]
    return {label: entry["latency"]["median_ms"] for label, entry in result["models"].items() if "latency" in entry}


class _Recorder:
    """A session that records the feeds a task check gives it (to replay them on a device)."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        outputs = self.session.run(names, feeds)
        self.feeds.append(({k: np.asarray(v) for k, v in feeds.items()}, sum(o.nbytes for o in outputs)))
        return outputs


class _Replay:
    """A session answering recorded feeds with the outputs a device computed for them."""

    def __init__(self, like, answers: dict):
        self.like, self.answers = like, answers  # ``like``: a session of the same graph (inputs, outputs)

    def get_inputs(self):
        return self.like.get_inputs()

    def get_outputs(self):
        return self.like.get_outputs()

    def run(self, names, feeds):
        return self.answers[_feed_key(feeds)]


def _feed_key(feeds: dict) -> str:
    return hashlib.sha1(b"".join(k.encode() + np.ascontiguousarray(v).tobytes()
                                 for k, v in sorted(feeds.items()))).hexdigest()


def openvino_tasks(ref: cnn.Reference, models: dict[str, bytes], recorder: _Recorder, reference) -> dict[str, dict]:
    """Each model's task check on the held-out data with the model run by OpenVINO EP on ``--device
    OPENVINO`` against ``reference``, fp32's task output on the local CPU EP, which ``recorder`` saw being
    computed: its feeds are sent stacked (one device call per input shape and size bound, every model in
    it), and the task post-processing replays them."""
    if not OPENVINO.exists():
        return {}
    groups: dict[tuple, list[dict]] = {}
    for feeds, nbytes in recorder.feeds:
        key = tuple((k, v.shape) for k, v in sorted(feeds.items()))
        chunks = groups.setdefault(key, [[]])
        # a device answers in one JSON line: at most ~200 MB of outputs per call (a rec model's
        # per-step class scores are 17 MB per batch of lines)
        if chunks[-1] and (len(chunks[-1]) + 1) * nbytes * len(models) > OPENVINO_CALL_BYTES:
            chunks.append([])
        chunks[-1].append(feeds)
    device, answers = Device.parse(str(OPENVINO)), {label: {} for label in models}
    for group in (chunk for chunks in groups.values() for chunk in chunks):
        rows = len(next(iter(group[0].values())))
        stacked = {k: np.concatenate([f[k] for f in group]) for k in group[0]}
        (result,) = device.run(models, stacked, providers=["OpenVINOExecutionProvider"], threads=THREADS,
                               batch_size=rows, warmup=0, repeats=0, profile_runs=0)["results"]
        if result["failed"] or not result["available"]:
            return {}
        for label, entry in result["models"].items():
            outputs = list(entry["outputs"].values())
            for i, feeds in enumerate(group):
                answers[label][_feed_key(feeds)] = [o[i * rows:(i + 1) * rows] for o in outputs]
    return {label: ref.compare(reference, ref.outputs(_Replay(recorder.session, answers[label]), ref.heldout))
            for label in models}


def op_profile(models: dict[str, bytes], feed: dict, top: int = 5) -> dict[str, str]:
    """Per model, where ONNX Runtime's CPU provider spends its time: ms per op type (medians of its own
    profiler, summed over nodes), the ``top`` largest — why int8 is or is not faster."""
    from onnxlr.runtimes.runner import profile_nodes, session_options

    nodes = profile_nodes(models, "CPUExecutionProvider", session_options("CPUExecutionProvider", None, THREADS),
                          THREADS, feed, runs=10)
    out = {}
    for label, per_node in nodes.items():
        by_op: dict[str, float] = {}
        for entry in per_node.values():
            by_op[entry["op"]] = by_op.get(entry["op"], 0.0) + entry["ms"]
        ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
        out[label] = f"{sum(by_op.values()):.1f} ms in kernels: " + ", ".join(f"{op} {ms:.1f}" for op, ms in ranked)
    return out


def rows(ref: cnn.Reference, repeats: int) -> tuple[list[str], dict]:
    models, built = variants(ref, repeats)
    sessions = {label: make_session(blob, "CPUExecutionProvider", THREADS) for label, blob in models.items()}
    times = measure(sessions, ref.timing, warmup=3, repeats=repeats)
    base = times["fp32"].median_ms
    recorder = _Recorder(sessions["fp32"])  # its feeds are replayed on OpenVINO
    reference = ref.outputs(recorder, ref.heldout)
    vino = openvino_times(models, ref.timing, repeats)
    vino_tasks = openvino_tasks(ref, models, recorder, reference)
    int8_label = REJECTED if built["kept"] != "int8" else "onnxlr int8-cnn"
    built["profile"] = op_profile({"float rewrites": models["fp32 + onnxlr float rewrites"],
                                   "int8": models[int8_label]}, ref.timing)
    truth = (lambda output: f"; {ref.truth(output)}") if ref.truth else (lambda output: "")  # noqa: E731
    out = []
    for label, blob in models.items():
        output = ref.outputs(sessions[label], ref.heldout)
        check = ref.compare(reference, output)
        convs = fused_op_counts(blob, THREADS).get("QLinearConv", 0)
        ov = f"{vino[label]:.3g} ({vino['fp32'] / vino[label]:.2f}×)" if label in vino and "fp32" in vino else "-"
        ov_task = vino_tasks[label]["summary"] if label in vino_tasks else "-"
        out.append(f"| {ref.name} | {label} | {times[label].median_ms:.1f} | {base / times[label].median_ms:.2f}× | "
                   f"{ov} | {len(blob) / 1e6:.2f} | {convs} | {check['summary']}{truth(output)} | {ov_task} |")
    for change, data in ref.variations.items():  # the task check's noise floor: fp32 on invisibly changed input
        output = ref.outputs(sessions["fp32"], data)
        out.append(f"| {ref.name} | fp32, held-out input {change} (noise floor of the check) | - | - | - | - | - | "
                   f"{ref.compare(reference, output)['summary']}{truth(output)} | - |")
    return out, built


def model_rows(section: str) -> dict[str, list[str]]:
    """Per model, its table rows and its note in a section this script wrote (to keep the models a run
    does not re-measure)."""
    out: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| model ", "|---")):
            out.setdefault(line.split(" | ")[0][2:], []).append(line)
        elif line.startswith("- ") and ": onnxlr kept" in line:
            out.setdefault(line[2:line.index(":")], []).append(line)
    return out


def section(names: list[str], cache: Path, repeats: int, written=None, previous: str = "") -> str:
    """The markdown section; the models not in ``names`` keep their rows and notes from ``previous`` (the
    section as it stands); ``written(section so far)`` is called after each model (a long run leaves
    what it measured in the file even if stopped)."""
    head = ["## Static int8 for CNNs, issue #21", "",
            f"Command: `flock /work/scratch/timing.lock python bench/cnn_int8.py [--models a,b] --write docs/benchmarks.md` "
            f"({machine()}; {repeats} interleaved timed runs of every variant of a model after 3 warm-ups, one "
            "process; speed-up = fp32 median / variant median; the noise pair is fp32 loaded twice; a run with "
            "`--models` re-measures those models and keeps the others' rows, each model's note says when it was "
            "measured). QLinearConv = integer convs in ONNX Runtime's optimized graph. Task check on held-out data "
            "(models/cnn.py); the *noise floor* rows run fp32 itself on the held-out images after a change a viewer "
            "cannot see (every pixel one grey level brighter; a JPEG re-encode at quality 95): how much of "
            "\"unchanged\" the check's own sensitivity breaks.", "",
            "OpenVINO: the same models on OpenVINOExecutionProvider through `--device .venv-openvino/bin/python` "
            "(interleaved there, median ms and speed-up over its fp32); its task check runs every held-out input "
            "there and compares with fp32 on the local CPU EP.", "",
            "| model | variant | CPU EP median (ms) | CPU EP speed-up | OpenVINO EP median (speed-up) | size (MB) | "
            "QLinearConv | task check (held-out, CPU EP) | task check (held-out, OpenVINO EP) |",
            "|---|---|---|---|---|---|---|---|---|"]
    per_model = model_rows(previous)

    def body() -> str:
        table = [line for lines in per_model.values() for line in lines if line.startswith("|")]
        notes = [line for lines in per_model.values() for line in lines if line.startswith("-")]
        return marked(MARK, [*head, *table, "", *notes])

    for name in names:
        table, built = rows(cnn.reference(name, cache), repeats)
        print("\n".join(table), file=sys.stderr, flush=True)  # each model's rows as soon as they are measured
        per_model[name] = [*table, (
            f"- {name}: onnxlr kept **{built['kept']}** (measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"search, on a calibration batch: original {built['original_ms']:.3g} ms, float rewrites "
            f"{built['float_ms']:.3g} ms, int8 {built['int8_ms']:.3g} ms, noise {built['noise']}); choice: "
            f"{built['choice_label']}; task error on the calibration data {built['task_error']:.3g}; "
            f"{built['int8_convs_planned']} convs planned int8, {built['qlinearconv']} QLinearConv; "
            f"built in {built['seconds']:.0f} s. CPU EP profile, float rewrites: "
            f"{built['profile']['float rewrites']}; int8: {built['profile']['int8']}")]
        if written is not None:
            written(body())
    return body()


def main(argv=None) -> int:
    parser = bench_parser(__doc__, MARK)
    parser.add_argument("--models", default=",".join(cnn.NAMES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    partial = (lambda body: write_section(args.write, body, MARK)) if args.write else None
    previous = args.write.read_text() if args.write and args.write.exists() else ""
    begin, end = f"<!-- {MARK}:begin -->", f"<!-- {MARK}:end -->"
    previous = previous[previous.index(begin):previous.index(end)] if begin in previous and end in previous else ""
    return emit(section(args.models.split(","), args.cache_dir, args.repeats, partial, previous), args, MARK)


if __name__ == "__main__":
    sys.exit(main())
