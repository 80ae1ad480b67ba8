"""One run of ``onnxlr optimize``: load → statistics → plan → passes → validate → report.

:func:`optimize` loads the model (a file with external data and no calibration data stays in its
files: *streamed*), checks that the original runs on the sample inputs before anything is rewritten,
folds computed weights into constants, and builds the result: the factorization its rules and target
plan (:mod:`onnxlr.planning.factorize`), then the recipe's steps, each on fresh statistics of the model
it gets. Searches that judge a result by running it — the lossless bisection, the latency loop, the
held-out step-back — build again at another budget. The report is made once, from the records of the
run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.version_converter

from onnxlr import io, prequantized, progress
from onnxlr.calibration import CalibrationSet
from onnxlr.errors import OnnxlrError
from onnxlr.executors import make_executor
from onnxlr.graph import import_graph, spilling
from onnxlr.passes.compose_chains import ComposeChainsConfig, ComposeLinearChains
from onnxlr.passes.flush_denormals import FlushDenormals
from onnxlr.passes.fold_constants import FoldConstants
from onnxlr.passes.name_nodes import NameNodes, repeated_names
from onnxlr.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from onnxlr.passes.quantize_nbits import QuantizeMatMulNBits
from onnxlr.pipeline import LayerChange, PassManager, PassRecord
from onnxlr.planning import attention_masks, latency_target, lossless
from onnxlr.planning.factorize import Factorizer, RunSetting
from onnxlr.planning.mixed_precision import MixedPlanner
from onnxlr.planning.options import OptimizeOptions
from onnxlr.planning.rank_search import SEARCH_DIVERGENCE
from onnxlr.planning.recipes import Step
from onnxlr.planning.targets import Target
from onnxlr.planning.validation import batch_size, run_validation, validation_inputs
from onnxlr.report import ModelSummary, Report, tolerance_met
from onnxlr.runtimes.calibration import StatisticsService
from onnxlr.runtimes.devices import parse_devices
from onnxlr.runtimes.providers import default_threads, parse_providers
from onnxlr.runtimes.validate import Validation, check_original_outputs
from onnxlr.version import __version__


@dataclass
class Built:
    """One build of the result: the model, the records of the passes that made it, its validation."""

    model: onnx.ModelProto
    records: list[PassRecord]
    validation: Validation | None = None


def optimize(model, options: OptimizeOptions) -> tuple[onnx.ModelProto, Report]:
    """Compress ``model`` (a path or a ModelProto, not modified) as ``options`` say; see
    :func:`onnxlr.optimize`."""
    parse_providers(options.validation.providers), parse_devices(options.validation.devices)  # fail early
    plain = not options.calibration.given and options.recipe.name == "lowrank" and options.chains is None
    original, path = io.open_model(model, mapped=plain)
    renamed = []
    if repeated_names(original):  # ONNX Runtime would refuse it: run (and rewrite) it renamed
        original, renamed = PassManager([NameNodes()]).run(original)
    streamed = io.is_mapped(original)
    sampled = None
    if options.validation.enabled:  # bad inputs, or an original that cannot run or gives NaN/Inf: fail first
        sampled = validation_inputs(original, options.validation, options.calibration)
        progress.phase(f"checking the original runs on {sampled[1]}")
        check_original_outputs(Path(path) if streamed else original, *sampled, threads=options.execution.threads,
                               batch_size=batch_size(original, options.validation))
    executor = options.execution.executor
    own = isinstance(executor, str)  # an executor object given is the caller's to close
    pool = make_executor(executor, options.execution.workers) if own else contextlib.nullcontext(executor)
    with (spilling() if streamed else contextlib.nullcontext()) as spill, pool as executor:
        return _Run(options, original, path, spill, executor, sampled, renamed).result()


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """The graph every recipe starts from, and the records of the passes that made it: every node named,
    weights computed from constants (int8 QDQ weights among them) folded into float initializers,
    subnormal float weights (slow on every CPU) set to 0."""
    return PassManager([NameNodes(), FoldConstants(), FlushDenormals()]).run(model)


class _Run:
    """The state one :func:`optimize` shares between builds: the folded model, the calibration service,
    the factorizer and the steps of the recipe."""

    def __init__(self, options: OptimizeOptions, original: onnx.ModelProto, path: str, spill, executor, sampled,
                 renamed: list[PassRecord]):
        self.options, self.original, self.path, self.spill, self.sampled = options, original, path, spill, sampled
        arrived = import_graph(original)
        self.int8_weights = prequantized.weight_quantized_nodes(arrived)
        self.work, folded = prepare(original)  # everything below sees the prepared model
        self.records = [r for r in [*renamed, prequantized.qoperator_record(arrived), *folded] if r.layers]
        calib, threads = options.calibration, options.execution.threads
        self.service = None
        if calib.given:
            data = CalibrationSet(calib.source, original, samples=calib.samples, batch_size=calib.batch_size)
            # a transformer's padding mask at a value Softmax computes fast with, where the data show it exact
            self.work, softened = attention_masks.soften_masks(self.work, data, threads or default_threads())
            self.records += [softened] if softened else []
            self.service = StatisticsService(data, threads=threads)
        self.steps, self.requantize = self._steps()
        self._upgrade_opset()
        self.factorizer = None
        if options.recipe.factorize:
            tolerance = options.validation.max_error
            setting = RunSetting(options.validation.providers, options.validation.dims, threads, executor,
                                 SEARCH_DIVERGENCE.get(tolerance.metric if tolerance else "", "rel_l2"))
            # a mixed recipe chooses a storage format per layer (rank and bits) in the factorizer's place
            planner = MixedPlanner if options.recipe.mixed_bits else Factorizer
            self.factorizer = planner(self.work, options.rank, options.conv, self.service, setting,
                                      keep=spill is None)

    def _steps(self) -> tuple[tuple[Step, ...], Step | None]:
        """The recipe's steps: composing chains first when asked (after the factorization, before any
        quantization), and storing weights that arrived int8 as int8 again last."""
        steps = self.options.recipe.steps
        if self.options.chains is not None:
            config = ComposeChainsConfig(max_error=self.options.chains)
            steps = (Step(ComposeLinearChains, lambda calibrated: config),
                     *(step for step in steps if step.pass_class is not ComposeLinearChains))
        if not self.int8_weights or any(s.pass_class in (QuantizeInt8, QuantizeMatMulNBits) for s in steps):
            return steps, None
        # their factors are named once the model is factorized: ``only`` is filled in then (_step)
        requantize = Step(QuantizeInt8, lambda calibrated: QuantizeInt8Config(
            activations="none", rounding="nearest", only=(), min_params=0))
        return (*steps, requantize), requantize

    def result(self) -> tuple[onnx.ModelProto, Report]:
        rank, tolerance = self.options.rank, self.options.validation.max_error
        target, search = rank.target if rank else None, None
        if target is not None and target.lossless:
            batches = self.service.batches(self.options.calibration.batch_size)
            target, search = lossless.lossless_target(
                self.work, tolerance, lambda t: self.factorizer.build(t)[0], batches,
                threads=self.options.execution.threads or default_threads())
        built = self.build(target)
        if target is not None and target.kind == "latency":
            built = self._meet_latency(built, target.value)
        # A lossless share found on the calibration data must also hold on the held-out inputs.
        for _ in range(lossless.RETRIES if search else 0):
            if tolerance_met(tolerance, built.validation) is not False:
                break
            built = self.build(lossless.step_back(search))
        passes = [*self.records, *([search] if search else []), *built.records]
        settings = self.options.describe()
        model = with_provenance(built.model, settings, built.validation)
        report = Report(ModelSummary.of(self.original, self.path), ModelSummary.of(model), passes,
                        validation=built.validation, tolerance=tolerance, streamed=self.spill is not None,
                        settings=settings)
        return model, report

    def build(self, target: Target | None) -> Built:
        """Factorize (if the recipe does), run the recipe's steps, check, validate."""
        model, records = self.work, []
        if self.factorizer is not None:
            model, records = self.factorizer.build(target)
        recipe = self.options.recipe
        if recipe.search is not None and self.service is not None:
            # choices judged by running the candidates (int8 kept only if measured faster on the target)
            provider = parse_providers(self.options.validation.providers)[0]
            found = recipe.search(model, self.service, provider=provider, threads=self.options.execution.threads)
            model, records = found.model, [*records, *found.records, found.search]
        else:
            for step in self.steps:
                model, record = self._step(model, step)
                records.append(record)
        if not any(c.action == "rewritten" for r in [*self.records, *records] if r.name != "name_nodes"
                   for c in r.layers):
            model = self.original  # nothing rewritten: the input as it was, not an export of it (which can grow)
        candidate = self._checked(model)
        validation = None
        if self.options.validation.enabled:
            progress.phase(f"validating on {self.sampled[1]}: providers {self.options.validation.providers}")
            original = Path(self.path) if self.spill is not None else self.original
            validation = run_validation(original, candidate, self.sampled, self.options.validation,
                                        self.options.execution.threads)
        return Built(model, records, validation)

    def _upgrade_opset(self) -> None:
        """Convert the model to the opset the steps' ops need (per-channel DequantizeLinear: 13), as ONNX
        Runtime's quantizer does, and say so."""
        calibrated = self.options.calibration.given
        needed = max((s.pass_class(s.config(calibrated), {}).min_opset() for s in self.steps), default=1)
        have = next((o.version for o in self.work.opset_import if o.domain in ("", "ai.onnx")), 1)
        if have >= needed:
            return
        try:
            self.work = onnx.version_converter.convert_version(self.work, needed)
        except Exception as exc:  # noqa: BLE001 - the converter raises its own errors
            raise OnnxlrError(f"recipe {self.options.recipe.name!r} writes ops of opset {needed}, and this model's "
                              f"opset {have} could not be converted: {' '.join(str(exc).split())[:200]}") from None
        self.records.append(PassRecord("convert_opset", {"from": have, "to": needed}, [LayerChange(
            "model", "opset", "rewritten", f"opset {have} -> {needed} (onnx.version_converter): the recipe writes "
            f"ops of opset {needed}")]))

    def _step(self, model: onnx.ModelProto, step: Step) -> tuple[onnx.ModelProto, PassRecord]:
        """One step of the recipe, on fresh statistics of the model it gets."""
        config = step.config(self.service is not None)
        if step is self.requantize:
            config = dataclasses.replace(config, only=prequantized.replacements(import_graph(model), self.int8_weights))
        rewrite = step.pass_class(config, {})
        progress.phase(f"pass {rewrite.name}")
        if self.service is not None:
            rewrite.stats = self.service.collect_for(model, rewrite)
        model, [record] = PassManager([rewrite]).run(model)
        return model, record

    def _checked(self, model: onnx.ModelProto):
        """``model``, or for a streamed run its file written beside the spill file, once it passes
        onnx.checker and shape inference."""
        try:
            if self.spill is not None:
                return io.save_model(model, self.spill.path.parent / "optimized.onnx", external_data=True)
            io.check_model(model)
            return model
        except OnnxlrError:
            raise  # no room to write the candidate: the user's disk, not a bug
        except Exception as exc:  # a broken rewrite is a bug in onnxlr, not a user error
            raise RuntimeError(f"onnxlr produced an invalid model: {exc}") from exc

    def _meet_latency(self, built: Built, share: float) -> Built:
        """Time the result and search again while it misses the target; the checks join the allocation's
        record."""
        where = self.factorizer.setting
        again, checks = latency_target.meet_latency(
            self.work, built.model, lambda s: self.build(Target("latency", s)), share, provider=where.provider,
            threads=where.threads or default_threads(), dims=where.dims)
        built = again or built
        allocation = next(r for r in built.records if r.name == "factorize_matmul").config["allocation"]
        allocation.update(latency_checks=checks, latency_met=checks[-1]["measured_ratio"] <= share)
        return built


def with_provenance(model: onnx.ModelProto, settings: dict, validation: Validation | None) -> onnx.ModelProto:
    """``model`` recording in its ``metadata_props`` what made it: onnxlr's version, the settings, and
    the validation figures (per provider: speed-up, the worst agreement of its outputs)."""
    figures = []
    for p in validation.providers if validation else []:
        if p.available and not p.reason:
            figures.append({"provider": p.provider, "device": p.device,
                            "speedup": round(p.speedup, 4) if p.speedup else None,
                            "outputs": {c.name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in
                                                 (("cosine_min", c.cosine_min), ("rel_l2", c.rel_l2),
                                                  ("agreement", c.agreement)) if v is not None}
                                        for c in p.outputs}})
    stamped = {"onnxlr.version": __version__, "onnxlr.settings": json.dumps(settings, sort_keys=True),
               "onnxlr.validation": json.dumps({"inputs": validation.inputs, "providers": figures} if validation
                                               else None)}
    kept = [m for m in model.metadata_props if m.key not in stamped]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in stamped.items():
        model.metadata_props.add(key=key, value=value)
    return model
