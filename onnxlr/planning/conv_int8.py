"""Static int8 for a CNN, chosen by measurement: which options keep the outputs, and whether int8 is
faster on the target at all.

The route (each step a pass): fold BatchNorms and fuse decomposed activations (float, exact — kept
whatever follows), then the gate convs, cross-layer equalization and the QDQ writer
(:mod:`onnxlr.passes.quantize_conv_int8`). Choices made here, each accepted only if the outputs on the
calibration data do not get worse (by ``evaluate`` when given — a task check — else the mean relative L2
error of the outputs against the float model, top-1 disagreement for classifier-shaped outputs):

1. equalization on/off × activation range rule (minmax, percentile, MSE, entropy);
2. bias correction on/off, then GPTQ rounding of the conv weights on their im2col patches or nearest;
3. the head (each output's nearest weight layer and what follows, :func:`integer_regions.head_nodes`)
   in float or int8 — a range-mixing Concat/Split is kept float in any case by the writer;
4. with a task check that the best choice still fails: mixed precision — the rounded tensors ranked by
   the output error each causes (its rounding noise times the output's measured sensitivity to it:
   :func:`rounding_harm`), and the fewest of the worst kept float (with their producers and readers)
   that leave the task output unchanged (1, 2, 4…, then bisection);
5. then latency on the target: the float model and the int8 candidates are timed interleaved on a
   calibration batch (boundary Q/DQ and transposes included, as they run); int8 is kept only when the
   whole model is faster by more than the run's noise (and, with ``evaluate``, only when its task output
   on the calibration data is unchanged) — a LeNet's tiny convs and a depthwise-heavy
   classifier at 224² are not, and stay float.

ONNX Runtime's optimized graph is inspected to confirm that the int8 convs became ``QLinearConv``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlr import progress
from onnxlr.errors import OnnxlrError
from onnxlr.activation_ranges import RULES
from onnxlr.graph import import_graph
from onnxlr.integer_regions import head_nodes
from onnxlr.passes.equalize_conv import EqualizeConv
from onnxlr.passes.fold_batchnorm import FoldBatchNorm
from onnxlr.passes.fuse_activations import FuseActivations
from onnxlr.passes.gate_conv import GateConv
from onnxlr.passes.quantize_conv_int8 import QuantizeConvInt8, QuantizeConvInt8Config
from onnxlr.pipeline import LayerChange, PassManager, PassRecord
from onnxlr.runtimes.fusions import fused_op_counts
from onnxlr.runtimes.latency import measure, speedup_noise
from onnxlr.runtimes.providers import default_threads, make_session

SCORE_BATCHES = 8  # calibration batches the choices are scored on
SENSITIVITY_PROBES = 16  # probes of the output sensitivity that ranks roundings for mixed precision
MIN_SPEEDUP = 1.05  # int8 must beat float by this much (and by more than the noise) to be kept


@dataclass(frozen=True)
class Choice:
    """One configuration of the int8 route."""

    equalize: bool = True
    rule: str = "mse"
    bias_correction: bool = True
    rounding: str = "nearest"
    float_head: bool = False
    float_nodes: tuple[str, ...] = ()  # nodes kept float for the task's sake (mixed precision)

    def label(self) -> str:
        return (f"{'CLE' if self.equalize else 'no CLE'}, {self.rule}, "
                f"{'bias corr.' if self.bias_correction else 'no bias corr.'}, {self.rounding} rounding, "
                f"{'head float' if self.float_head else 'head int8'}"
                + (f", {len(self.float_nodes)} nodes float" if self.float_nodes else ""))


@dataclass
class Result:
    """The model kept, the records of the passes that made it, and the search's own record."""

    model: onnx.ModelProto
    records: list[PassRecord]
    search: PassRecord
    int8: onnx.ModelProto | None = None  # the best int8 candidate, kept or not (benchmarks show both)
    uniform: onnx.ModelProto | None = None  # the best choice before mixed precision kept nodes float


def float_prepass(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """BatchNorm folding and activation fusion: float rewrites that keep the outputs (up to rounding)."""
    return PassManager([FoldBatchNorm(), FuseActivations()]).run(model)


class ConvInt8Search:
    """Builds and scores int8 variants of ``model`` (after :func:`float_prepass`) with the statistics
    service ``service`` (:class:`onnxlr.runtimes.calibration.StatisticsService`).

    evaluate: ``evaluate(model) -> error`` on the calibration data, lower is better (a task check); None:
        the outputs' divergence from the float model.
    min_speedup: a mixed-precision candidate slower than this over float ends that search.
    """

    def __init__(self, model: onnx.ModelProto, service, *, evaluate: Callable[[onnx.ModelProto], float] | None = None,
                 provider: str = "CPUExecutionProvider", threads: int | None = None, repeats: int = 20,
                 min_speedup: float = MIN_SPEEDUP):
        self.prepassed, self.prepass_records = float_prepass(model)
        self.gated, [self.gate_record] = PassManager([GateConv()]).run(self.prepassed)
        self.service, self.evaluate_task = service, evaluate
        self.provider, self.threads, self.repeats = provider, threads or default_threads(), repeats
        self.min_speedup = min_speedup
        self.batches = service.batches()[:SCORE_BATCHES]
        reference = make_session(self.prepassed.SerializeToString(), "CPUExecutionProvider", self.threads)
        self.reference = [reference.run(None, feeds) for feeds in self.batches]
        self.head = head_nodes(import_graph(self.gated))
        self.trials: list[dict] = []
        self.best: tuple[float, ...] = (0.0, 0.0)  # the chosen trial's (task error, divergence)
        self._equalized: tuple[onnx.ModelProto, PassRecord] | None = None
        self.uniform: onnx.ModelProto | None = None

    def equalized(self) -> tuple[onnx.ModelProto, PassRecord]:
        if self._equalized is None:
            rewrite = EqualizeConv()
            rewrite.stats = self.service.collect_for(self.gated, rewrite)
            model, [record] = PassManager([rewrite]).run(self.gated)
            self._equalized = (model, record)
        return self._equalized

    def build(self, choice: Choice) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """The int8 model of ``choice`` and the records of its passes."""
        records = [self.gate_record, *([self.equalized()[1]] if choice.equalize else [])]
        floats = {name: "in the head, kept float (chosen on the calibration data)" for name in self.head} \
            if choice.float_head else {}
        floats.update({name: "its rounding is among those costing the output most (rounding noise × measured "
                             "sensitivity): kept float so the task output on the calibration data holds"
                       for name in choice.float_nodes})
        rewrite = QuantizeConvInt8(QuantizeConvInt8Config(rule=choice.rule, bias_correction=choice.bias_correction,
                                                          rounding=choice.rounding, float_nodes=floats))
        base = self.base(choice)
        rewrite.stats = self.service.collect_for(base, rewrite)
        model, [record] = PassManager([rewrite]).run(base)
        return model, [*records, record]

    def base(self, choice: Choice) -> onnx.ModelProto:
        """The float model ``choice`` quantizes (equalized or not): same tensors, same names."""
        return self.equalized()[0] if choice.equalize else self.gated

    def score(self, model: onnx.ModelProto) -> tuple[float, ...]:
        """(task error, output divergence) on the calibration batches — lower is better."""
        session = make_session(model.SerializeToString(), "CPUExecutionProvider", self.threads)
        divergence = np.mean([_divergence(ref, session.run(None, feeds))
                              for ref, feeds in zip(self.reference, self.batches)])
        task = self.evaluate_task(model) if self.evaluate_task is not None else 0.0
        return float(task), float(divergence)

    def trial(self, choice: Choice, timed: bool = False) -> tuple[tuple[float, ...], onnx.ModelProto, list[PassRecord]]:
        """Build and score ``choice``; ``timed``: also its speed-up over float on the target (a short
        interleaved timing, in the trial's record)."""
        start = time.perf_counter()
        model, records = self.build(choice)
        key = self.score(model)
        self.trials.append({"choice": choice.label(), "task_error": key[0], "divergence": key[1]})
        if timed:
            times = _time(self, {"float": self.prepassed, "int8": model}, repeats=max(5, self.repeats // 4))
            self.trials[-1]["speedup"] = round(times["float"].median_ms / times["int8"].median_ms, 3)
        self.trials[-1]["seconds"] = round(time.perf_counter() - start, 1)
        progress.phase(f"int8 trial {choice.label()}: task error {key[0]:.4g}, divergence {key[1]:.4g}")
        return key, model, records

    def choose(self, rules: Sequence[str] = RULES) -> tuple[Choice, onnx.ModelProto, list[PassRecord]]:
        """The best choice by the calibration outputs, decided step by step (module docstring)."""
        found = [(self.trial(c), c) for c in (Choice(equalize=e, rule=r) for e in (True, False) for r in rules)]
        (best, model, records), choice = min(found, key=lambda f: f[0][0])
        for change in ({"bias_correction": False}, {"rounding": "gptq"}, {"float_head": True}):
            candidate = dataclasses.replace(choice, **change)
            key, cand_model, cand_records = self.trial(candidate)
            if key <= best:  # kept only if the outputs do not get worse
                best, model, records, choice = key, cand_model, cand_records, candidate
        self.uniform = model  # int8 everywhere the writer can: kept to show what mixed precision changed
        if self.evaluate_task is not None and best[0] > 0:
            best, model, records, choice = self.keep_sensitive_float(choice, best, model, records)
        self.best = best
        return choice, model, records

    def keep_sensitive_float(self, choice: Choice, best, model, records):
        """The fewest rounded tensors, worst first by :func:`rounding_harm`, kept float (with their producers
        and readers) so that the task output on the calibration data is unchanged: 1, 2, 4… of them while
        the candidate stays faster than float (timed on the target; more float is never faster), then
        bisection between the last count that failed and the first that held. Returns the (key, model,
        records, choice) kept — the input ones when no count holds while fast enough."""
        harm = rounding_harm(self.service, self.base(choice), model)
        ranking = sorted(harm, key=harm.get, reverse=True)

        def worst(count: int) -> tuple[str, ...]:
            return tuple(name for key in ranking[:count] for name in key)

        progress.phase(f"mixed precision: {len(harm)} rounded tensors ranked by the output error they cause")
        found, failed, count = None, 0, 1
        while found is None and count <= len(ranking):
            trial = self.trial(dataclasses.replace(choice, float_nodes=worst(count)), timed=True)
            if self.trials[-1]["speedup"] < self.min_speedup:
                return best, model, records, choice
            if trial[0][0] <= 0:
                found = trial
            else:
                failed, count = count, count * 2
        if found is None:
            return best, model, records, choice
        held = count
        while held - failed > 1 and held - failed > held // 8:  # bisection to within an eighth
            middle = (failed + held) // 2
            trial = self.trial(dataclasses.replace(choice, float_nodes=worst(middle)))
            if trial[0][0] <= 0:
                found, held = trial, middle
            else:
                failed = middle
        key, found_model, found_records = found
        return key, found_model, found_records, dataclasses.replace(choice, float_nodes=worst(held))


def search(model: onnx.ModelProto, service, *, evaluate=None, provider: str = "CPUExecutionProvider",
           threads: int | None = None, rules: Sequence[str] = RULES, repeats: int = 20) -> Result:
    """The fastest of ``model``, its exact float rewrites and its best int8 candidate on ``provider``
    (timed interleaved): int8 only if faster than both by more than the noise and, with ``evaluate``, its
    task output on the calibration data unchanged; the float rewrites only if measurably faster than the
    original (ONNX Runtime may run a decomposed activation faster than the fused one, and a rewrite that
    gains nothing here can cost on another provider). The search record says which and why."""
    run = ConvInt8Search(model, service, evaluate=evaluate, provider=provider, threads=threads, repeats=repeats)
    choice, int8_model, int8_records = run.choose(rules)
    times = _time(run, {"original": model, "float": run.prepassed, "int8": int8_model})
    ms = {label: t.median_ms for label, t in times.items()}
    rewrote = any(c.action == "rewritten" for r in run.prepass_records for c in r.layers)
    rewrite_noise = speedup_noise(times["original"], times["float"]) or 0.0
    # the rewrites are kept only where they pay on the target: a fused HardSwish that gains nothing on
    # the CPU provider runs at 0.4x on OpenVINO's
    rewrites_pay = rewrote and ms["float"] * (1.0 + rewrite_noise) < ms["original"]
    floor = "float" if rewrites_pay else "original"
    speedup, noise = ms[floor] / ms["int8"], speedup_noise(times[floor], times["int8"]) or 0.0
    counts = fused_op_counts(int8_model.SerializeToString(), run.threads)
    planned = sum(1 for r in int8_records for c in r.rewritten if r.name == "quantize_conv_int8" and c.op == "Conv")
    # with a task check, int8 must also leave the task output on the calibration data unchanged
    task_error = run.best[0] if evaluate is not None else 0.0
    kept = "int8" if speedup >= max(MIN_SPEEDUP, 1.0 + noise) and task_error <= 0.0 else floor
    summary = {"choice": dataclasses.asdict(choice), "choice_label": choice.label(), "trials": run.trials,
               "original_ms": ms["original"], "float_ms": ms["float"], "int8_ms": ms["int8"],
               "speedup": round(speedup, 3), "noise": round(noise, 3), "provider": provider,
               "qlinearconv": counts.get("QLinearConv", 0), "int8_convs_planned": planned, "kept": kept,
               "task_error": task_error}
    verdict = _verdict(kept, floor, speedup, noise, task_error, provider)
    record = PassRecord("conv_int8_search", summary, [LayerChange("model", "int8", "rewritten" if kept == "int8" else "skipped",
                                                                  "" if kept == "int8" else verdict, {"verdict": verdict})])
    if kept == "int8":
        return Result(int8_model, [*run.prepass_records, *int8_records], record, int8_model, run.uniform)
    if kept == "float":
        return Result(run.prepassed, run.prepass_records, record, int8_model, run.uniform)
    return Result(model, [], record, int8_model, run.uniform)


def _verdict(kept: str, floor: str, speedup: float, noise: float, task_error: float, provider: str) -> str:
    """One line saying what the search kept and why."""
    base = "the float rewrites" if floor == "float" else "the original"
    why = "" if floor == "float" else " (the float rewrites were not faster)"
    if kept == "int8":
        return f"int8 kept: {speedup:.2f}x faster than {base}{why} on {provider}"
    if task_error > 0:
        return (f"int8 rejected: the best choice changes the task output on the calibration data (error "
                f"{task_error:.4g}); every conv stays float, {base} kept{why}")
    return (f"int8 rejected: {speedup:.2f}x of {base}'s speed on {provider} (needs "
            f"{max(MIN_SPEEDUP, 1 + noise):.2f}x); every conv stays float, {base} kept{why}")


def rounding_harm(service, base: onnx.ModelProto, model: onnx.ModelProto,
                  probes: int = SENSITIVITY_PROBES) -> dict[tuple[str, ...], float]:
    """The output error each rounded tensor of ``model`` (int8, written from the float ``base``) is
    expected to cause: its rounding noise, ``scale² / 12`` per element, times the output's sensitivity to
    it, ``Σ_j d_j`` (measured on ``base`` by finite differences on calibration samples,
    :meth:`~onnxlr.runtimes.calibration.StatisticsService.sensitivity`) — end to end, not local: a
    rounding the rest of the network amplifies ranks high, one it ignores ranks low. Keys: ``base``'s
    nodes to keep float so that the tensor is not rounded — its producer (with the conv an activation is
    folded into: a Relu, a gate's Clip) and every reader."""
    graph = import_graph(base)
    tensors = graph.tensors()
    inits = {i.name: i for i in model.graph.initializer}
    present = {name for n in model.graph.node for name in n.output}
    scales = {n.input[0]: float(np.max(numpy_helper.to_array(inits[n.input[1]])))
              for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] in tensors and n.input[1] in inits}
    try:
        sensitivity = service.sensitivity(base, sorted(scales), probes=probes)
    except OnnxlrError:  # samples of different sizes (a detector's pages): one sample's, the first
        sensitivity = service.sensitivity(base, sorted(scales), probes=probes, samples=1)
    harm = {}
    for name, scale in scales.items():
        tensor = tensors[name]
        nodes = list(tensor.outputs)
        if tensor.inputs:
            producer = tensor.inputs[0]
            folded = [t.inputs[0] for t in producer.inputs if t.inputs and t.name not in present]
            nodes = [producer, *folded, *nodes]
        key = tuple(dict.fromkeys(n.name for n in nodes))
        harm[key] = harm.get(key, 0.0) + scale ** 2 / 12 * float(np.sum(sensitivity.get(name, 0.0)))
    return harm


def _time(run: ConvInt8Search, models: dict[str, onnx.ModelProto], repeats: int | None = None) -> dict:
    """Each model's timing on the target (median, spread), interleaved, on the first calibration batch."""
    sessions = {label: make_session(m.SerializeToString(), run.provider, run.threads) for label, m in models.items()}
    progress.phase(f"timing {', '.join(models)} on {run.provider}")
    return measure(sessions, run.batches[0], warmup=3, repeats=repeats or run.repeats)


def _divergence(reference: list, produced: list) -> float:
    """Mean over float outputs of the relative L2 error, plus top-1 disagreement of (batch, classes) ones."""
    errors = []
    for ref, out in zip(reference, produced):
        ref, out = np.asarray(ref), np.asarray(out)
        if not np.issubdtype(ref.dtype, np.floating) or ref.size == 0:
            continue
        rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))
        if ref.ndim == 2 and ref.shape[1] > 1:
            rel += float(np.mean(ref.argmax(1) != out.argmax(1)))
        errors.append(rel)
    return float(np.mean(errors)) if errors else 0.0
