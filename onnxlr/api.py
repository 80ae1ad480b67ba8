"""Public Python API: :func:`optimize`, :func:`validate`, :func:`inspect` and :func:`write` mirror the CLI
commands. The work is done by :mod:`onnxlr.planning`; this module only maps keywords onto its option
groups (:mod:`onnxlr.planning.options`).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from onnxlr import io
from onnxlr.planning import optimizer
from onnxlr.planning import validation as checking
from onnxlr.planning.inspect import inspect
from onnxlr.planning.options import OptimizeOptions, ValidationOptions, optimize_options
from onnxlr.report import Report

__all__ = ["optimize", "validate", "inspect", "write"]


def optimize(model: str | os.PathLike | onnx.ModelProto, *, options: OptimizeOptions | None = None,
             **keywords) -> tuple[onnx.ModelProto, Report]:
    """Compress a model — by default factorize its MatMul/Gemm (and Conv) layers — and validate the result
    against the original.

    Parameters
    ----------
    model : path to an .onnx file, or a ModelProto (not modified).
    options : the run, as option groups (:class:`onnxlr.planning.options.OptimizeOptions`); or give
        the same as keywords:

        - ``recipe`` (``lowrank``, ``int8``, ``int4``…; ``onnxlr recipes`` lists them), ``chains`` (compose
          chains of linear layers within this relative error);
        - the rank rule (:class:`~onnxlr.planning.options.RankRule`): ``rank_ratio``, ``energy``,
          ``target`` (``"params=0.5"``, ``"macs=…"``, ``"bytes=12MB"``, ``"latency=0.7"``, ``"lossless"``),
          ``allocator``, ``seed``, ``ranks`` ({layer or weight name: rank}), ``method``, ``sequential``,
          ``force``, ``refit``, ``bias_correction``, ``svd_solver``, ``embeddings``;
        - convolutions (:class:`~onnxlr.planning.options.ConvRule`): ``conv``, ``conv_ratio``,
          ``rank_multiple``, ``conv_max_error``, ``latency_guard``;
        - calibration: ``calib`` (an .npz, a folder, a dict of arrays or an iterable of feed dicts),
          ``calib_samples``;
        - validation (:class:`~onnxlr.planning.options.ValidationOptions`): ``validate``, ``providers``,
          ``devices``, ``inputs``, ``dims``, ``max_error``, ``batch_size``, ``repeats``;
        - execution: ``threads``, ``workers``, ``executor``.

    Returns
    -------
    (optimized ModelProto, Report): ``report.passed`` says whether ``max_error`` held; write the model
    with :func:`write`.
    """
    return optimizer.optimize(model, options or optimize_options(**keywords))


def validate(original: str | os.PathLike | onnx.ModelProto, optimized: str | os.PathLike | onnx.ModelProto, *,
             options: ValidationOptions | None = None, threads: int | None = None, **keywords) -> Report:
    """Compare two models' outputs and latency on each provider. ``options`` (or its fields as keywords:
    ``providers``, ``devices``, ``inputs``, ``dims``, ``max_error``, ``batch_size``, ``repeats``) as for
    :func:`optimize`; ``threads``: ONNX Runtime's intra-op threads."""
    return checking.validate(original, optimized, options or ValidationOptions(**keywords), threads)


def write(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
          external_data: bool | None = None) -> Path:
    """Write ``model`` atomically after checking it; refuses to overwrite ``source`` or its external
    data files (:func:`onnxlr.io.check_output_path`)."""
    if source is not None:
        io.check_output_path(path, source)
    return io.save_model(model, path, external_data=external_data)
