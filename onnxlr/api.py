"""Public Python API: ``optimize``, ``validate`` and ``inspect`` mirror the CLI commands."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from onnxlr import io, linalg
from onnxlr.errors import OnnxlrError
from onnxlr.graph import import_graph
from onnxlr.calibration import calibration_batches, find_mask_input
from onnxlr.passes.factorize_embedding import FactorizeEmbedding, FactorizeEmbeddingConfig, find_tables
from onnxlr.passes.factorize_matmul import DATA_AWARE, FactorizeMatMul, FactorizeMatMulConfig, find_layers
from onnxlr.pipeline import PassManager
from onnxlr.report import ModelSummary, Report
from onnxlr.runtimes import feeds as feeds_mod
from onnxlr.runtimes.compare import TOLERANCE_METRICS, Tolerance
from onnxlr.runtimes.providers import default_threads, parse_providers
from onnxlr.runtimes.sensitivity import output_sensitivity
from onnxlr.runtimes.stats import collect_stats
from onnxlr.runtimes.validate import validate_models

ModelLike = str | os.PathLike | onnx.ModelProto
InputsLike = str | os.PathLike | Mapping[str, np.ndarray] | None
CalibLike = str | os.PathLike | Iterable[Mapping[str, np.ndarray]] | None

# Used when no rank rule is given at all: keep half the singular values of every layer.
DEFAULT_RANK_RATIO = 0.5


def _load(model: ModelLike) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, ""
    return io.load_model(model), str(model)


def parse_tolerance(spec: float | str | Tolerance | None) -> Tolerance | None:
    """``0.05`` or ``"rel_l2=0.05"`` / ``"max_abs=1e-3"`` / ``"cosine=0.99"`` -> Tolerance."""
    if spec is None or isinstance(spec, Tolerance):
        return spec
    metric, _, value = str(spec).rpartition("=") if "=" in str(spec) else ("rel_l2", "", str(spec))
    metric = metric.strip() or "rel_l2"
    if metric not in TOLERANCE_METRICS:
        raise OnnxlrError(f"unknown --max-error metric {metric!r} (use {', '.join(TOLERANCE_METRICS)})")
    try:
        number = float(value)
    except ValueError:
        raise OnnxlrError(f"malformed --max-error {spec!r}: expected a number or METRIC=NUMBER") from None
    if not np.isfinite(number) or number < 0:
        raise OnnxlrError(f"--max-error must be a finite non-negative number, got {value}")
    return Tolerance(metric, number)


def sample_inputs(model: onnx.ModelProto, inputs: InputsLike = None, dims: Mapping[str, int] | None = None,
                  seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Feeds for validation and a label saying where they came from."""
    if inputs is None:
        label = "synthetic inputs" + (f" ({', '.join(f'{k}={v}' for k, v in dims.items())})" if dims else "")
        return feeds_mod.synthetic_feeds(model, dict(dims or {}), seed=seed), label
    if isinstance(inputs, Mapping):
        feeds = {k: np.asarray(v) for k, v in inputs.items()}
        feeds_mod.check_feeds(model, feeds, "inputs")
        return feeds, "given inputs"
    return feeds_mod.load_npz(inputs, model), str(inputs)


def _validate(original: onnx.ModelProto, optimized: onnx.ModelProto, *, providers, inputs, dims,
              threads, batch_size, repeats):
    feeds, label = sample_inputs(original, inputs, dims)
    return validate_models(
        original.SerializeToString(), optimized.SerializeToString(), feeds,
        providers=parse_providers(providers), threads=threads or default_threads(),
        batch_size=batch_size, repeats=repeats, inputs_label=label,
    )


def calibration_stats(model: onnx.ModelProto, calib: CalibLike, *, samples: int | None = None,
                      batch_size: int = 8, mask: str | None = None, threads: int | None = None,
                      embeddings: bool = False):
    """Activation statistics of every factorizable layer's input, in one streaming ORT run.

    Returns ``(stats, counts)``: ``stats[input tensor] -> TensorStats`` (Gram, mean, mean |x|) and,
    with ``embeddings``, ``counts[indices tensor] -> (V,)`` lookups of each embedding-table row.
    """
    graph = import_graph(model)
    layers, _ = find_layers(graph)
    tensors = sorted({layer.node.inputs[0].name for layer in layers})
    tables = {t.indices.name: np.asarray(t.table.values).shape[0] for t in find_tables(graph)[0]} if embeddings else {}
    if not tensors and not tables:
        return {}, {}
    batches = functools.partial(calibration_batches, calib, model, samples=samples, batch_size=batch_size)
    return collect_stats(model, tensors, batches, mask_input=find_mask_input(model, mask),
                         threads=threads or default_threads(), counts=tables)


# Output sensitivities cost 1 + 2*probes runs per batch: measure them on a bounded subset.
SENSITIVITY_SAMPLES = 64
SENSITIVITY_PROBES = 32


def output_sensitivities(model: onnx.ModelProto, calib: CalibLike, *, samples: int = SENSITIVITY_SAMPLES,
                         batch_size: int = 8, mask: str | None = None, threads: int | None = None,
                         probes: int = SENSITIVITY_PROBES) -> dict[str, np.ndarray]:
    """Per factorizable layer output tensor, each unit's effect on the model output (n,), measured
    with forward Jacobian-vector probes in ONNX Runtime (:mod:`onnxlr.runtimes.sensitivity`)."""
    layers, _ = find_layers(import_graph(model))
    tensors = sorted({layer.node.outputs[0].name for layer in layers})
    if not tensors:
        return {}
    batches = functools.partial(calibration_batches, calib, model, samples=samples, batch_size=batch_size)
    return output_sensitivity(model, tensors, batches, probes=probes, mask_input=find_mask_input(model, mask),
                              threads=threads or default_threads())


def optimize(
    model: ModelLike,
    *,
    calib: CalibLike = None,
    calib_samples: int | None = None,
    method: str | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
    force: bool = False,
    refit: bool = True,
    bias_correction: bool = True,
    embeddings: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    inputs: InputsLike = None,
    dims: Mapping[str, int] | None = None,
    max_error: float | str | Tolerance | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    repeats: int = 20,
    validate: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Factorize a model's MatMul/Gemm layers and validate the result against the original.

    Parameters
    ----------
    model : path to an .onnx file, or a ModelProto (not modified).
    calib : calibration samples: .npz keyed by input name, a folder of .npz/.npy files, or an
        iterable of feed dicts. Data-aware methods fit each layer's output on them.
    calib_samples : use at most this many calibration samples.
    method : ``svd``, ``whitened``, ``fisher``, ``asvd`` or ``isvt``; default ``whitened`` with
        ``calib``, ``svd`` without. ``fisher`` also measures each layer's output sensitivity on up to
        ``SENSITIVITY_SAMPLES`` calibration samples.
    rank_ratio : keep ``ceil(rank_ratio * min(k, n))`` singular values of each (k, n) weight.
    energy : keep the smallest rank holding this share of each weight's squared spectrum.
        With neither, ``rank_ratio=DEFAULT_RANK_RATIO``.
    ranks : per-layer ranks keyed by node or weight name (override the rule above).
    force : rewrite layers even when their rank would not save parameters.
    refit, bias_correction : data-aware methods refit the output factor to the layer's true output
        and fold the mean output error into the bias; switch off for ablations.
    embeddings : also factorize embedding tables (Gather on a constant [vocab, d] table) under the
        same rank rule, weighted by token frequency in ``calib`` when given.
    providers : execution providers to validate on (``"cpu,cuda"`` or a list).
    inputs : sample inputs: .npz path or dict keyed by input name; None for synthetic ones.
    dims : values of symbolic input dimensions for synthetic inputs.
    max_error : tolerance (see :func:`parse_tolerance`); ``report.passed`` says if it held.
    threads : intra-op threads for ONNX Runtime (default: all cores of this process).
    batch_size : samples per run (axis 0) when comparing and timing.
    repeats : timed runs per model and provider.
    validate : False to skip running ONNX Runtime.

    Returns
    -------
    (optimized ModelProto, Report)
    """
    original, path = _load(model)
    if rank_ratio is None and energy is None and not ranks:
        rank_ratio = DEFAULT_RANK_RATIO
    method = method or ("whitened" if calib is not None else "svd")
    ranks = dict(ranks or {})
    table_ranks = {}
    if embeddings:  # per-layer ranks naming an embedding table go to the embedding pass
        names = {n for t in find_tables(import_graph(original))[0] for n in (t.node.name, t.table.name)}
        table_ranks = {k: v for k, v in ranks.items() if k in names}
        ranks = {k: v for k, v in ranks.items() if k not in names}
    config = FactorizeMatMulConfig(method=method, rank_ratio=rank_ratio, energy=energy, ranks=ranks,
                                   force=force, refit=refit, bias_correction=bias_correction)
    tolerance = parse_tolerance(max_error)
    parse_providers(providers)  # fail on an unknown provider before the slow part
    if method in DATA_AWARE and calib is None:
        raise OnnxlrError(f"method {method!r} needs calibration data (--calib)")
    stats, counts, sensitivity = None, {}, None
    if method == "fisher" and isinstance(calib, Iterator):
        calib = list(calib)  # read twice (statistics, then sensitivities): a one-shot iterator is kept
    if calib is not None:
        stats, counts = calibration_stats(original, calib, samples=calib_samples, batch_size=batch_size,
                                          threads=threads, embeddings=embeddings)
    if method == "fisher":
        sensitivity = output_sensitivities(original, calib, samples=min(calib_samples or SENSITIVITY_SAMPLES,
                                                                        SENSITIVITY_SAMPLES),
                                           batch_size=batch_size, threads=threads)
    passes = [FactorizeMatMul(config, stats, sensitivity)]
    if embeddings:
        passes.append(FactorizeEmbedding(FactorizeEmbeddingConfig(
            rank_ratio=rank_ratio, energy=energy, ranks=table_ranks, force=force), counts))
    optimized, records = PassManager(passes).run(original)
    try:
        io.check_model(optimized)
    except Exception as exc:  # a broken rewrite is a bug in onnxlr, not a user error
        raise RuntimeError(f"onnxlr produced an invalid model: {exc}") from exc
    report = Report(ModelSummary.of(original, path), ModelSummary.of(optimized), records, tolerance=tolerance)
    if validate:
        report.validation = _validate(original, optimized, providers=providers, inputs=inputs, dims=dims,
                                      threads=threads, batch_size=batch_size, repeats=repeats)
    return optimized, report


def validate(
    original: ModelLike,
    optimized: ModelLike,
    *,
    providers: str | Sequence[str] = ("cpu",),
    inputs: InputsLike = None,
    dims: Mapping[str, int] | None = None,
    max_error: float | str | Tolerance | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    repeats: int = 20,
) -> Report:
    """Compare two models' outputs and latency on each provider (see :func:`optimize`)."""
    tolerance = parse_tolerance(max_error)
    ref, ref_path = _load(original)
    opt, opt_path = _load(optimized)
    report = Report(ModelSummary.of(ref, ref_path), ModelSummary.of(opt, opt_path), tolerance=tolerance)
    report.validation = _validate(ref, opt, providers=providers, inputs=inputs, dims=dims,
                                  threads=threads, batch_size=batch_size, repeats=repeats)
    return report


INSPECT_RANK_FRACTIONS = (0.1, 0.25, 0.5)


def inspect(model: ModelLike, *, dims: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Per MatMul/Gemm layer: weight shape, params, MACs, whether factorizable, break-even rank and
    the spectrum energy kept at a few ranks.

    MACs are per output row (``k*n``) and, when the input's leading dimensions are known (fixed or
    set through ``dims``), for one full run.
    """
    proto, _ = _load(model)
    rows = _leading_rows(proto, dict(dims or {}))
    layers, skipped = find_layers(import_graph(proto))
    out = []
    for layer in layers:
        k, n = layer.W.shape
        s = linalg.svd(layer.W)[1]
        kept = linalg.energy_kept(s)
        m = s.size
        x = layer.node.inputs[0].name
        out.append({
            "node": layer.node.name, "op": layer.node.op, "weight": layer.weight.name,
            "shape": [k, n], "params": k * n, "macs_per_row": k * n,
            "macs": rows[x] * k * n if rows.get(x) else None,
            "factorizable": True, "reason": "",
            "break_even_rank": round(linalg.break_even_rank(k, n), 1),
            "energy_at_rank": {int(max(1, round(f * m))): round(float(kept[max(1, round(f * m)) - 1]), 4)
                               for f in INSPECT_RANK_FRACTIONS},
            "rank_for_energy": {e: linalg.rank_for_energy(s, e) for e in (0.9, 0.99)},
        })
    for change in skipped:
        out.append({"node": change.node, "op": change.op, "factorizable": False, "reason": change.reason})
    return out


def _leading_rows(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, int]:
    """Tensor name -> product of all but the last dimension, where shape inference can tell."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:
        return {}
    rows = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input):
        shape = value.type.tensor_type.shape.dim
        if len(shape) >= 1 and all(d.HasField("dim_value") for d in shape):
            rows[value.name] = int(np.prod([d.dim_value for d in shape[:-1]]))
    return rows


def write(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
          external_data: bool | None = None) -> Path:
    """Write ``model`` atomically after checking it; refuses to overwrite ``source``."""
    if source is not None and Path(path).resolve() == Path(source).resolve():
        raise OnnxlrError(f"output path {path} is the input model; choose another path")
    return io.save_model(model, path, external_data=external_data)
