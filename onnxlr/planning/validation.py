"""Validation of a result against its original: both run side by side on every provider and device asked
for, on sample inputs (:mod:`onnxlr.runtimes.validate`), and the report of that alone (``onnxlr validate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxlr import io
from onnxlr.feeds import fixed_batch, sample_inputs
from onnxlr.passes.name_nodes import NameNodes, repeated_names
from onnxlr.pipeline import PassManager
from onnxlr.calibration import CalibrationSet
from onnxlr.planning.options import CalibrationOptions, ValidationOptions
from onnxlr.report import ModelSummary, Report
from onnxlr.runtimes.devices import parse_devices
from onnxlr.runtimes.providers import default_threads
from onnxlr.runtimes.validate import Validation, validate_models


# Calibration samples validated on when no --inputs are given (in-sample: a weaker check than held-out).
CALIBRATION_SAMPLES = 64


def validation_inputs(model: onnx.ModelProto, validation: ValidationOptions, calibration: CalibrationOptions
                      ) -> tuple[dict, str]:
    """``(feeds, label)`` to validate on: the given inputs; without them the calibration data (in-sample,
    at its real shapes, and said so); without either, synthetic inputs (:func:`onnxlr.feeds.sample_inputs`)."""
    if validation.inputs is not None or not calibration.given:
        return sample_inputs(model, validation.inputs, validation.dims)
    batches = list(CalibrationSet(calibration.source, model, samples=CALIBRATION_SAMPLES))
    try:  # scalar inputs (a sample rate) are the same in every batch
        feeds = {k: np.concatenate([b[k] for b in batches]) if np.ndim(v) else v for k, v in batches[0].items()}
    except ValueError:  # batches of different shapes, or feeds given whole: the first batch alone
        feeds = batches[0]
    count = max((v.shape[0] for v in feeds.values() if np.ndim(v)), default=1)
    return feeds, (f"the calibration data, in sample ({count} samples the fit saw; give --inputs for held-out "
                   "data)")


def run_validation(original: onnx.ModelProto | Path, optimized: onnx.ModelProto | Path, sampled: tuple[dict, str],
                   options: ValidationOptions, threads: int | None = None) -> Validation:
    """Both models (a path: a model ONNX Runtime opens from its file, external data beside it) on
    ``sampled = (feeds, label)``."""
    feeds, label = sampled
    return validate_models(
        *(m if isinstance(m, Path) else m.SerializeToString() for m in (original, optimized)), feeds,
        providers=options.providers, devices=parse_devices(options.devices), threads=threads or default_threads(),
        batch_size=batch_size(original, options), repeats=options.repeats, inputs_label=label)


def batch_size(model: onnx.ModelProto | Path, options: ValidationOptions) -> int:
    """Samples per run: the model's own batch when it fixes one, else the option's."""
    if isinstance(model, Path):
        model = onnx.load(model, load_external_data=False)
    return fixed_batch(model) or options.batch_size


def validate(original, optimized, options: ValidationOptions, threads: int | None = None) -> Report:
    """The report of two models (paths or ModelProtos) compared on ``options``; a file with external
    data stays in its files (mapped) and ONNX Runtime opens it by path."""
    ref, ref_path = io.open_model(original, mapped=True)
    opt, opt_path = io.open_model(optimized, mapped=True)
    # ONNX Runtime refuses a model with repeated node names; the names do not change what it computes
    ref, opt = (PassManager([NameNodes()]).run(m)[0] if repeated_names(m) else m for m in (ref, opt))
    sources = [Path(p) if io.is_mapped(m) else m for m, p in ((ref, ref_path), (opt, opt_path))]
    validation = run_validation(*sources, sample_inputs(ref, options.inputs, options.dims), options, threads)
    return Report(ModelSummary.of(ref, ref_path), ModelSummary.of(opt, opt_path), validation=validation,
                  tolerance=options.max_error)
