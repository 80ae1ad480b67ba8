"""Static int8 for a CNN, chosen by measurement: which options keep the outputs, and whether int8 is
faster on the target at all.

The route (each step a pass): fold BatchNorms and fuse decomposed activations (float, exact — kept
whatever follows), then the gate convs, cross-layer equalization and the QDQ writer
(:mod:`onnxlr.passes.quantize_conv_int8`). Choices made here, each accepted only if the outputs on the
calibration data do not get worse (by ``evaluate`` when given — a task check — else the mean relative L2
error of the outputs against the float model, top-1 disagreement for classifier-shaped outputs):

1. equalization on/off × activation range rule (minmax, percentile, MSE, entropy);
2. bias correction on/off;
3. the head (each output's nearest weight layer and what follows, :func:`integer_regions.head_nodes`)
   in float or int8 — a range-mixing Concat/Split is kept float in any case by the writer;
4. with a task check that the best choice still fails: mixed precision — the rounded nodes (convs, gates,
   Adds, Muls…) ranked by the error each adds to its own output (relative L2 error of its output against
   the float model, minus that of its inputs, measured on calibration batches: :func:`error_added`), and
   the fewest of the worst kept float that leave the task output unchanged (1, 2, 4…, then bisection);
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
import onnx_graphsurgeon as gs

from onnxlr import progress
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
from onnxlr.runtimes.paired import relative_errors
from onnxlr.runtimes.providers import default_threads, make_session

SCORE_BATCHES = 8  # calibration batches the choices are scored on
MIN_SPEEDUP = 1.05  # int8 must beat float by this much (and by more than the noise) to be kept


@dataclass(frozen=True)
class Choice:
    """One configuration of the int8 route."""

    equalize: bool = True
    rule: str = "mse"
    bias_correction: bool = True
    float_head: bool = False
    float_nodes: tuple[str, ...] = ()  # nodes kept float for the task's sake (mixed precision)

    def label(self) -> str:
        return (f"{'CLE' if self.equalize else 'no CLE'}, {self.rule}, "
                f"{'bias corr.' if self.bias_correction else 'no bias corr.'}, "
                f"{'head float' if self.float_head else 'head int8'}"
                + (f", {len(self.float_nodes)} nodes float" if self.float_nodes else ""))


@dataclass
class Result:
    """The model kept, the records of the passes that made it, and the search's own record."""

    model: onnx.ModelProto
    records: list[PassRecord]
    search: PassRecord
    int8: onnx.ModelProto | None = None  # the best int8 candidate, kept or not (benchmarks show both)


def float_prepass(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """BatchNorm folding and activation fusion: float rewrites that keep the outputs (up to rounding)."""
    return PassManager([FoldBatchNorm(), FuseActivations()]).run(model)


class ConvInt8Search:
    """Builds and scores int8 variants of ``model`` (after :func:`float_prepass`) with the statistics
    service ``service`` (:class:`onnxlr.runtimes.calibration.StatisticsService`).

    evaluate: ``evaluate(model) -> error`` on the calibration data, lower is better (a task check); None:
        the outputs' divergence from the float model.
    """

    def __init__(self, model: onnx.ModelProto, service, *, evaluate: Callable[[onnx.ModelProto], float] | None = None,
                 provider: str = "CPUExecutionProvider", threads: int | None = None, repeats: int = 20):
        self.prepassed, self.prepass_records = float_prepass(model)
        self.gated, [self.gate_record] = PassManager([GateConv()]).run(self.prepassed)
        self.service, self.evaluate_task = service, evaluate
        self.provider, self.threads, self.repeats = provider, threads or default_threads(), repeats
        self.batches = service.batches()[:SCORE_BATCHES]
        reference = make_session(self.prepassed.SerializeToString(), "CPUExecutionProvider", self.threads)
        self.reference = [reference.run(None, feeds) for feeds in self.batches]
        self.head = head_nodes(import_graph(self.gated))
        self.trials: list[dict] = []
        self.best: tuple[float, ...] = (0.0, 0.0)  # the chosen trial's (task error, divergence)
        self._equalized: tuple[onnx.ModelProto, PassRecord] | None = None

    def equalized(self) -> tuple[onnx.ModelProto, PassRecord]:
        if self._equalized is None:
            rewrite = EqualizeConv()
            rewrite.stats = self.service.collect_for(self.gated, rewrite)
            model, [record] = PassManager([rewrite]).run(self.gated)
            self._equalized = (model, record)
        return self._equalized

    def build(self, choice: Choice) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """The int8 model of ``choice`` and the records of its passes."""
        base, records = self.gated, [self.gate_record]
        if choice.equalize:
            base, record = self.equalized()
            records.append(record)
        return self._quantize(base, choice, records)

    def base(self, choice: Choice) -> onnx.ModelProto:
        """The float model ``choice`` quantizes (equalized or not): same tensors, same names."""
        return self.equalized()[0] if choice.equalize else self.gated

    def _quantize(self, base: onnx.ModelProto, choice: Choice, records: list[PassRecord]):
        floats = {name: "in the head, kept float (chosen on the calibration data)" for name in self.head} \
            if choice.float_head else {}
        floats.update({name: "adds the most error to its output among the int8 nodes: kept float so the task "
                             "output on the calibration data holds" for name in choice.float_nodes})
        rewrite = QuantizeConvInt8(QuantizeConvInt8Config(rule=choice.rule, bias_correction=choice.bias_correction,
                                                          float_nodes=floats))
        rewrite.stats = self.service.collect_for(base, rewrite)
        model, [record] = PassManager([rewrite]).run(base)
        return model, [*records, record]

    def score(self, model: onnx.ModelProto) -> tuple[float, ...]:
        """(task error, output divergence) on the calibration batches — lower is better."""
        session = make_session(model.SerializeToString(), "CPUExecutionProvider", self.threads)
        divergence = np.mean([_divergence(ref, session.run(None, feeds))
                              for ref, feeds in zip(self.reference, self.batches)])
        task = self.evaluate_task(model) if self.evaluate_task is not None else 0.0
        return float(task), float(divergence)

    def trial(self, choice: Choice) -> tuple[tuple[float, ...], onnx.ModelProto, list[PassRecord]]:
        start = time.perf_counter()
        model, records = self.build(choice)
        key = self.score(model)
        self.trials.append({"choice": choice.label(), "task_error": key[0], "divergence": key[1],
                            "seconds": round(time.perf_counter() - start, 1)})
        progress.phase(f"int8 trial {choice.label()}: task error {key[0]:.4g}, divergence {key[1]:.4g}")
        return key, model, records

    def choose(self, rules: Sequence[str] = RULES) -> tuple[Choice, onnx.ModelProto, list[PassRecord]]:
        """The best choice by the calibration outputs, decided step by step (module docstring)."""
        found = [(self.trial(c), c) for c in (Choice(equalize=e, rule=r) for e in (True, False) for r in rules)]
        (best, model, records), choice = min(found, key=lambda f: f[0][0])
        for change in (dict(bias_correction=False), dict(float_head=True)):
            candidate = dataclasses.replace(choice, **change)
            key, cand_model, cand_records = self.trial(candidate)
            if key <= best:  # kept only if the outputs do not get worse
                best, model, records, choice = key, cand_model, cand_records, candidate
        if self.evaluate_task is not None and best[0] > 0:
            best, model, records, choice = self.keep_sensitive_float(choice, best, model, records)
        self.best = best
        return choice, model, records

    def keep_sensitive_float(self, choice: Choice, best, model, records):
        """The fewest nodes, worst first by :func:`error_added`, kept float so that the task output on the
        calibration data is unchanged: 1, 2, 4… up to half the rounded nodes, then bisection between the last
        count that failed and the first that held. Returns the (key, model, records, choice) kept — the
        input ones when no count up to half holds."""
        added = error_added(self.base(choice), model, self.batches[:2], self.threads)
        ranking = sorted(added, key=added.get, reverse=True)

        def worst(count: int) -> tuple[str, ...]:
            return tuple(name for key in ranking[:count] for name in key)

        progress.phase(f"mixed precision: {len(added)} rounded nodes ranked by the error they add")
        found, failed, count = None, 0, 1
        while found is None and count <= max(1, len(ranking) // 2):
            trial = self.trial(dataclasses.replace(choice, float_nodes=worst(count)))
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
    """The int8 model of ``model`` if it is faster on ``provider`` and its outputs hold, else the float
    pre-passed model; the search record says which and why."""
    run = ConvInt8Search(model, service, evaluate=evaluate, provider=provider, threads=threads, repeats=repeats)
    choice, int8_model, int8_records = run.choose(rules)
    timed = _time(run, {"float": run.prepassed, "int8": int8_model})
    speedup = timed["float"] / timed["int8"]
    noise = timed.get("noise") or 0.0
    counts = fused_op_counts(int8_model.SerializeToString(), run.threads)
    planned = sum(1 for r in int8_records for c in r.rewritten if r.name == "quantize_conv_int8" and c.op == "Conv")
    # with a task check, int8 must also leave the task output on the calibration data unchanged
    task_error = run.best[0] if evaluate is not None else 0.0
    keep_int8 = speedup >= max(MIN_SPEEDUP, 1.0 + noise) and task_error <= 0.0
    summary = {"choice": dataclasses.asdict(choice), "choice_label": choice.label(), "trials": run.trials, "float_ms": timed["float"],
               "int8_ms": timed["int8"], "speedup": round(speedup, 3), "noise": round(noise, 3),
               "provider": provider, "qlinearconv": counts.get("QLinearConv", 0), "int8_convs_planned": planned,
               "kept": "int8" if keep_int8 else "float", "task_error": task_error}
    if keep_int8:
        verdict = f"int8 kept: {speedup:.2f}x faster than float on {provider}"
    elif task_error > 0:
        verdict = (f"int8 rejected: the best choice changes the task output on the calibration data (error "
                   f"{task_error:.4g}); every conv stays float")
    else:
        verdict = (f"int8 rejected: {speedup:.2f}x of float's speed on {provider} (needs "
                   f"{max(MIN_SPEEDUP, 1 + noise):.2f}x); every conv stays float")
    record = PassRecord("conv_int8_search", summary, [LayerChange("model", "int8", "rewritten" if keep_int8 else "skipped",
                                                                  "" if keep_int8 else verdict, {"verdict": verdict})])
    if keep_int8:
        return Result(int8_model, [*run.prepass_records, *int8_records], record, int8_model)
    return Result(run.prepassed, run.prepass_records, record, int8_model)


def error_added(reference: onnx.ModelProto, model: onnx.ModelProto, batches: list[dict],
                threads: int) -> dict[tuple[str, ...], float]:
    """The error each node adds in ``model`` (int8) against ``reference`` (its float form, same tensor
    names), on ``batches``: the relative L2 error of its output minus the largest of its inputs' before
    their rounding — what rounding its inputs and its weights costs it. Keys: the reference's nodes to
    keep float so that the node reads unrounded inputs — the node, each rounded input's producer (with an
    activation folded into it: a Relu, a gate's Clip) and every reader of that input."""
    graph = import_graph(reference)
    rounded = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    present = {name for n in model.graph.node for name in n.output}

    def seen(tensor) -> str | None:  # the tensor, or the folded activation's output standing for it
        if tensor.name in present:
            return tensor.name
        folded = [r for r in tensor.outputs if r.op in ("Relu", "Clip") and r.outputs[0].name in present]
        return folded[0].outputs[0].name if len(tensor.outputs) == 1 and folded else None

    def keep_float(tensor) -> list[str]:  # nodes to keep float so that ``tensor`` is not rounded
        if tensor.inputs and tensor.name not in present:  # folded into its producer's producer
            return [tensor.inputs[0].name, *keep_float(tensor.inputs[0].inputs[0])]
        producer = [tensor.inputs[0].name] if tensor.inputs else []
        return [*producer, *(r.name for r in tensor.outputs)]

    found: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    for node in graph.nodes:
        out = seen(node.outputs[0]) if node.outputs else None
        inputs = [t for t in node.inputs if not isinstance(t, gs.Constant) and seen(t) is not None]
        if out is None or not inputs:
            continue
        names = [node.name] + [name for t in inputs if seen(t) in rounded for name in keep_float(t)]
        if len(names) == 1:  # reads nothing rounded: nothing to keep float for it
            continue
        found[tuple(dict.fromkeys(names))] = (out, [seen(t) for t in inputs])
    wanted = {out for out, _ in found.values()} | {name for _, names in found.values() for name in names}
    errors = relative_errors(reference, model, sorted(wanted), batches, threads=threads)
    return {key: errors.get(out, 0.0) - max(errors.get(name, 0.0) for name in inputs)
            for key, (out, inputs) in found.items()}


def _time(run: ConvInt8Search, models: dict[str, onnx.ModelProto]) -> dict[str, float]:
    """Median ms of each model on the target, interleaved, on the first calibration batch; "noise": the
    relative noise of the float/int8 ratio."""
    sessions = {label: make_session(m.SerializeToString(), run.provider, run.threads) for label, m in models.items()}
    progress.phase(f"timing float and int8 on {run.provider}")
    times = measure(sessions, run.batches[0], warmup=3, repeats=run.repeats)
    out = {label: t.median_ms for label, t in times.items()}
    out["noise"] = speedup_noise(times["float"], times["int8"])
    return out


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
