"""Public Python API: ``optimize``, ``validate`` and ``inspect`` mirror the CLI commands."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import rank_search
from onnxlr import io, linalg, prequantized
from onnxlr.errors import OnnxlrError
from onnxlr.executors import SerialExecutor, make_executor
from onnxlr.graph import count_parameters, import_graph, spilling, truncated
from onnxlr.macs import count_macs
from onnxlr.calibration import calibration_batches, find_mask_input
from onnxlr import conv_factors
from onnxlr.passes.compose_chains import ComposeChainsConfig, ComposeLinearChains
from onnxlr.passes.factorize_conv import DECOMPOSITIONS, FactorizeConv, FactorizeConvConfig, find_convs
from onnxlr.passes.fold_constants import FoldConstants
from onnxlr.passes.factorize_embedding import FactorizeEmbedding, FactorizeEmbeddingConfig, find_tables
from onnxlr.passes.factorize_matmul import DATA_AWARE, FactorizeMatMul, FactorizeMatMulConfig, _override, find_layers
from onnxlr.passes.factorize_sequential import FactorizeMatMulSequential
from onnxlr.passes.prune import channel_rows
from onnxlr.pipeline import PassManager, PassRecord
from onnxlr.recipes import Step, get_recipe
from onnxlr.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from onnxlr.passes.quantize_nbits import QuantizeMatMulNBits
from onnxlr.report import ModelSummary, Report
from onnxlr.runtimes import feeds as feeds_mod
from onnxlr.runtimes.compare import TOLERANCE_METRICS, Tolerance
from onnxlr.runtimes.compare import compare as compare_outputs
from onnxlr.runtimes.devices import parse_devices
from onnxlr.runtimes.providers import default_threads, make_session, parse_providers
from onnxlr.runtimes.sensitivity import output_sensitivity
from onnxlr.runtimes.latency_guard import LatencyGuard
from onnxlr.runtimes.stats import PairedRuns, collect_stats, collect_unfolded_stats
from onnxlr.runtimes.swap import SwapRunner
from onnxlr.runtimes.validate import validate_models

ModelLike = str | os.PathLike | onnx.ModelProto
InputsLike = str | os.PathLike | Mapping[str, np.ndarray] | None
CalibLike = str | os.PathLike | Iterable[Mapping[str, np.ndarray]] | None

# Used when no rank rule is given at all: keep half the singular values of every layer.
DEFAULT_RANK_RATIO = 0.5
# Share of each conv's parameters its replacement may keep, unless conv_ratio says otherwise.
DEFAULT_CONV_RATIO = 0.5
DEFAULT_CHAIN_ERROR = ComposeChainsConfig.max_error


def _load(model: ModelLike, *, mapped: bool = False) -> tuple[onnx.ModelProto, str]:
    """The model and its path; ``mapped``: a file with external data stays in its files (io.load_model)."""
    if isinstance(model, onnx.ModelProto):
        io.check_versions(model)
        return model, ""
    return io.load_model(model, mapped=mapped), str(model)


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


TARGETS = ("params", "macs", "bytes", "latency")


SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_target(spec: str | tuple[str, float]) -> tuple[str, float]:
    """``"params=0.5"`` -> ``("params", 0.5)``: keep this share of the model's parameters (``macs``: of
    its multiply-adds per run); ``"bytes=12MB"`` -> ``("bytes", 12e6)``: a serialized size (B, KB, MB,
    GB, KiB, MiB, GiB; none = bytes)."""
    if isinstance(spec, tuple):
        kind, value = spec
    else:
        kind, sep, value = str(spec).partition("=")
        if not sep:
            raise OnnxlrError(f"malformed --target {spec!r}: expected KIND=VALUE, e.g. params=0.5")
    kind = kind.strip()
    if kind not in TARGETS:
        raise OnnxlrError(f"unknown --target kind {kind!r} (supported: {', '.join(TARGETS)}, lossless)")
    text = str(value).strip()
    unit = 1.0
    if kind == "bytes":
        number_part = re.match(r"[-+0-9.eE]*", text).group()
        suffix = text[len(number_part):].strip()
        if suffix.upper() not in SIZE_UNITS:
            raise OnnxlrError(f"malformed --target {spec!r}: unknown size unit {suffix!r}")
        text, unit = number_part, SIZE_UNITS[suffix.upper()]
    try:
        number = float(text) * unit
    except ValueError:
        raise OnnxlrError(f"malformed --target {spec!r}: {value!r} is not a number") from None
    if kind == "bytes":
        if number <= 0:
            raise OnnxlrError(f"--target bytes must be a positive size, got {value}")
    elif not 0.0 < number <= 1.0:
        raise OnnxlrError(f"--target {kind} must be a share in (0, 1], got {value}")
    return kind, number


def layer_param_budget(model: onnx.ModelProto, share: float, graph: gs.Graph | None = None) -> int:
    """Parameters left to the factorizable MatMul/Gemm weights when the whole model must keep
    ``share`` of its parameters (every other parameter stays as it is). ``graph``: ``model``
    already imported, if at hand."""
    return layer_budget(model, ("params", share), graph)[0]


def layer_budget(model: onnx.ModelProto, target: tuple[str, float], graph: gs.Graph | None = None,
                 dims: Mapping[str, int] | None = None) -> tuple[int, dict[str, float] | None]:
    """The budget left to the factorizable MatMul/Gemm weights when the whole model must keep
    ``share`` of its parameters (``params``) or of its multiply-adds per run at ``dims`` (``macs``), or
    fit in ``share`` bytes serialized (``bytes``); everything else stays as it is. Returns ``(budget, unit_costs)``: for ``macs`` the budget is in
    multiply-adds and ``unit_costs[weight]`` the rows the weight multiplies per run (one parameter
    costs that many MACs); None for ``params``."""
    kind, share = target
    graph = graph if graph is not None else import_graph(model)
    layers, _ = find_layers(graph)
    if kind == "params":
        total, unit_costs = count_parameters(model), None
        factorizable = sum({layer.weight.name: layer.W.size for layer in layers}.values())
        what = "parameters"
    elif kind == "bytes":
        # Every byte outside the factorizable weights stays; a parameter of a weight takes its itemsize.
        unit_costs = {layer.weight.name: float(layer.W.dtype.itemsize) for layer in layers}
        total = model.ByteSize()
        factorizable = sum({layer.weight.name: layer.W.nbytes for layer in layers}.values())
        budget = share - (total - factorizable)
        if budget <= 0:
            raise OnnxlrError(f"--target bytes={share:,.0f} is out of reach: the model holds {total - factorizable:,} "
                              f"bytes outside its factorizable MatMul/Gemm weights")
        return int(budget), unit_costs
    else:
        macs = count_macs(model, dims)
        unknown = [layer.node.name for layer in layers if layer.node.name not in macs.per_node]
        if unknown:
            raise OnnxlrError(f"cannot count the multiply-adds of {unknown[0]!r}: its shapes stay unknown; set "
                              f"the model's symbolic dimensions with --dim NAME=VALUE")
        unit_costs = {}
        for layer in layers:  # a weight read by several nodes costs the rows of all of them
            rows = macs.per_node[layer.node.name] / layer.W.size
            unit_costs[layer.weight.name] = unit_costs.get(layer.weight.name, 0.0) + rows
        total = macs.total
        factorizable = sum(macs.per_node[layer.node.name] for layer in layers)
        what = "multiply-adds"
    budget = share * total - (total - factorizable)
    if budget <= 0:
        raise OnnxlrError(f"--target {kind}={share:g} is out of reach: the factorizable MatMul/Gemm weights "
                          f"hold {factorizable:,} of the model's {total:,} {what} "
                          f"(the rest alone is {(total - factorizable) / total:.1%} of the model)")
    return int(budget), unit_costs


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


def _validate(original: onnx.ModelProto | Path, optimized: onnx.ModelProto | Path, *, providers, devices, sampled,
              threads, batch_size, repeats):
    """``sampled``: ``(feeds, label)`` from :func:`sample_inputs`. A model given as a path (a streamed
    one, with its external data beside it) is opened by ONNX Runtime from its file."""
    feeds, label = sampled
    return validate_models(
        *(m if isinstance(m, Path) else m.SerializeToString() for m in (original, optimized)), feeds,
        providers=providers, devices=parse_devices(devices), threads=threads or default_threads(),
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


def paired_collector(model: onnx.ModelProto, calib: CalibLike, *, samples: int | None = None,
                     batch_size: int = 8, mask: str | None = None, threads: int | None = None):
    """``(graph, {tensor: dtype}) -> {tensor: CrossStats}``: paired statistics of ``model`` and the current
    state of ``graph`` (a rewritten copy of it) on the calibration data, for sequential factorization.
    Both models are cut down to what computes ``tensors``, so early stages run only the first layers."""
    batches = functools.partial(calibration_batches, calib, model, samples=samples, batch_size=batch_size)
    runs = PairedRuns(batches, mask_input=find_mask_input(model, mask), threads=threads or default_threads())
    reference = import_graph(model)
    return lambda graph, tensors: runs.collect(truncated(reference, tensors, model),
                                               truncated(graph, tensors, model), list(tensors))


def conv_patch_stats(model: onnx.ModelProto, calib: CalibLike, *, samples: int | None = None,
                     batch_size: int = 8, threads: int | None = None) -> dict[str, Any]:
    """Per factorizable Conv node: statistics of the im2col patches it multiplies (rows of length
    Cin*K), in one streaming ORT run."""
    layers, _ = find_convs(import_graph(model))
    specs = {}
    for layer in layers:
        geo = layer.geometry()

        def rows(x, kernel=layer.kernel, geo=geo):
            pads = conv_factors.explicit_pads(x.shape[2:], kernel, geo["strides"], geo["dilations"],
                                              geo["pads"], geo["auto_pad"])
            return conv_factors.im2col(x, kernel, geo["strides"], pads, geo["dilations"])

        specs[layer.node.name] = (layer.node.inputs[0].name, rows)
    if not specs:
        return {}
    batches = functools.partial(calibration_batches, calib, model, samples=samples, batch_size=batch_size)
    return collect_unfolded_stats(model, specs, batches, threads=threads or default_threads())


def _conv_names(convs) -> set[str]:
    return {n for layer in convs for n in (layer.node.name, layer.weight.name)}


def input_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """Concrete shapes of the tensors shape inference can resolve once the model inputs' symbolic
    dimensions are fixed: from ``dims``, else 1 for a leading (batch) dimension."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    # Shapes an exporter stored keep their symbolic dimensions through inference (torch's export of
    # MiniLM: 'batch' and 'sequence' everywhere), so they are inferred afresh from the fixed inputs.
    del fixed.graph.value_info[:]
    dims = dict(dims or {})
    for value in fixed.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value < 0:  # -1: a free axis (paddle2onnx)
                if dim.dim_param in dims:
                    dim.dim_value = dims[dim.dim_param]
                elif axis == 0:
                    dim.dim_value = 1
    shapes = _inferred_shapes(fixed)
    layers = [n.output[0] for n in fixed.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.output]
    if any(name not in shapes for name in layers):
        # Shapes computed at run time (torch's position ids: Shape → Gather → Slice) defeat ONNX's data
        # propagation; with the inputs fixed, onnx-graphsurgeon folds those computations to constants.
        try:
            folded = fixed
            for _ in range(2):  # folding reveals shapes, which let the next fold go further
                graph = gs.import_onnx(onnx.shape_inference.infer_shapes(folded, data_prop=True))
                folded = gs.export_onnx(graph.fold_constants(fold_shapes=True, error_ok=True).cleanup())
            shapes = {**_inferred_shapes(folded), **shapes}
        except Exception:  # noqa: BLE001 - best effort, as above
            pass
    return shapes


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor name -> shape, for the tensors ONNX shape inference resolves completely (none if it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: layers with unknown shapes are reported as unmeasured
        return {}
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims_ = value.type.tensor_type.shape.dim
        if dims_ and all(d.HasField("dim_value") for d in dims_):
            shapes[value.name] = [d.dim_value for d in dims_]
    return shapes


# The search scores candidates on calibration batches of this many samples (fewer, larger runs).
SEARCH_BATCH_SIZE = 32
# The end-to-end divergence each --max-error metric is searched with (see runtimes.swap.DIVERGENCES).
SEARCH_DIVERGENCE = {"cosine": "cosine", "kl": "kl", "top1": "kl"}


def search_space(model: onnx.ModelProto, config: FactorizeMatMulConfig, stats, sensitivity, calib: CalibLike, *,
                 divergence: str = "rel_l2", samples: int | None = None, threads: int | None = None,
                 cache: dict | None = None, cost_of=None) -> rank_search.SearchSpace:
    """What every allocator of :mod:`onnxlr.rank_search` searches over for ``model``'s factorizable layers:
    their level table (costs in the units of ``config.unit_costs``, or of ``cost_of``: ``(layer,
    ranks) -> cost per rank``, 0 = dense), their candidate weights, and — with ``calib`` — one ORT
    session scoring candidates end to end with ``divergence``. Layers with a rank in ``config.ranks``
    keep it; their cost is ``space.spent``. ``cache``: see ``FactorizeMatMul`` (pass the same dict to
    the final pass to reuse the decompositions). Budget-independent: one space serves many budgets."""
    cache = {} if cache is None else cache
    layers, _ = find_layers(import_graph(model))
    factorize = FactorizeMatMul(dataclasses.replace(config, param_budget=None), stats, sensitivity, cache=cache)
    decompositions = factorize.decompositions(layers)
    given = {}  # weight key -> (layer, the user's rank; 0 where it would not save parameters: dense)
    for layer in layers:
        rank = _override(config, layer)
        if rank is not None:
            given[(layer.weight.name, layer.transposed)] = (
                layer, rank if linalg.saves_parameters(*layer.W.shape, rank) else 0)
    searched = [layer for layer in layers if (layer.weight.name, layer.transposed) not in given]
    table = rank_search.level_table(searched, decompositions, config.unit_costs, cost_of=cost_of)
    # what the layers with a user-given rank take of the budget
    spent = sum(float(rank_search.level_costs(layer, np.array([rank]), config.unit_costs, cost_of)[0])
                for layer, rank in given.values())
    candidates = rank_search.Candidates(factorize, layers, decompositions, table,
                                          fixed={key: rank for key, (_, rank) in given.items()})
    runner = None
    if calib is not None:
        batches = list(calibration_batches(calib, model, samples=samples, batch_size=SEARCH_BATCH_SIZE))
        runner = SwapRunner(model, layers, batches, divergence=divergence, threads=threads or default_threads())
    return rank_search.SearchSpace(table, candidates, runner, spent)


def choose_allocation(model: onnx.ModelProto, config: FactorizeMatMulConfig, stats, sensitivity,
                      calib: CalibLike, *, allocator: str = "auto", seed: int = 0,
                      space: rank_search.SearchSpace | None = None, executor=None,
                      **space_options) -> dict[str, Any]:
    """Ranks for ``config.param_budget`` chosen by ``allocator`` over ``space`` (built by
    :func:`search_space` with ``space_options`` when not given). Returns ``{"ranks": {weight name:
    rank, 0 = dense}, "allocator": the one kept, "record": the report's record of the search,
    "space": the space searched}``."""
    if calib is None and allocator == "evolutionary":
        raise OnnxlrError("the evolutionary allocator scores candidates end to end: it needs --calib")
    if isinstance(calib, Iterator):
        calib = list(calib)
    space = space or search_space(model, config, stats, sensitivity, calib, **space_options)
    result = space.search(config.param_budget, allocator, seed=seed, executor=executor)
    return {"ranks": {key[0]: rank for key, rank in result.ranks.items()}, "allocator": result.allocator,
            "record": result.record(), "space": space}


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


def _factorize(work: onnx.ModelProto, work_graph: gs.Graph, *, calib, calib_samples, method, rank_ratio, energy,
               ranks, target, force, refit, bias_correction, sequential, conv, conv_ratio, rank_multiple,
               conv_max_error, latency_guard, embeddings, providers, dims, threads, batch_size,
               allocator="auto", divergence="rel_l2", seed=0, memo=None, executor=None, svd_solver="auto"):
    """The low-rank part of :func:`optimize` (its parameters): returns (factorized model, pass records).
    ``memo``: a dict kept across calls on the same model and data (the lossless search builds many
    budgets): calibration statistics and decompositions are computed once and reused; None keeps
    nothing (a streamed model: decompositions of every weight would hold the whole model)."""
    keep = memo is not None
    memo = {} if memo is None else memo
    param_budget, unit_costs, cost_of = None, None, None
    if target is not None:
        if embeddings:
            raise OnnxlrError("--target does not allocate embedding tables yet; use --rank-ratio or --energy "
                              "with --embeddings")
        kind, share = parse_target(target)
        if kind == "latency":
            # Timed once per model: a missed target is searched again at another share (_meet_latency).
            if "latency" not in memo:
                memo["latency"] = rank_search.latency_model(work, find_layers(work_graph)[0],
                                                            provider=parse_providers(providers)[0],
                                                            threads=threads or default_threads(), dims=dims)
            param_budget, cost_of = memo["latency"].budget(share), memo["latency"].cost_of
        else:
            param_budget, unit_costs = layer_budget(work, (kind, share), work_graph, dims)
    elif rank_ratio is None and energy is None and not ranks:
        rank_ratio = DEFAULT_RANK_RATIO
    method = method or ("whitened" if calib is not None else "svd")
    ranks = dict(ranks or {})
    table_ranks = {}
    if embeddings:  # per-layer ranks naming an embedding table go to the embedding pass
        names = {n for t in find_tables(work_graph)[0] for n in (t.node.name, t.table.name)}
        table_ranks = {k: v for k, v in ranks.items() if k in names}
        ranks = {k: v for k, v in ranks.items() if k not in names}
    if conv != "none" and conv not in ("auto", *DECOMPOSITIONS):
        raise OnnxlrError(f"unknown conv decomposition {conv!r} (choose from auto, {', '.join(DECOMPOSITIONS)}, none)")
    convs, conv_skipped = find_convs(work_graph) if conv != "none" and (target is None or conv_ratio) else ([], [])
    conv_ranks = {k: v for k, v in ranks.items() if k in _conv_names(convs)}
    ranks = {k: v for k, v in ranks.items() if k not in conv_ranks}
    config = FactorizeMatMulConfig(method=method, rank_ratio=rank_ratio, energy=energy, param_budget=param_budget,
                                   unit_costs=unit_costs, ranks=ranks, force=force, refit=refit, bias_correction=bias_correction,
                                   svd_solver=svd_solver)
    if method in DATA_AWARE and calib is None:
        raise OnnxlrError(f"method {method!r} needs calibration data (--calib)")
    if sequential and method not in DATA_AWARE:
        raise OnnxlrError(f"sequential factorization needs a data-aware method (--method whitened…), not {method!r}")
    stats, counts, sensitivity = None, {}, None
    if (method == "fisher" or sequential) and isinstance(calib, Iterator):
        calib = list(calib)  # read more than once (statistics, sensitivities, stages): a one-shot iterator is kept
    if calib is not None and (not sequential or embeddings or param_budget is not None):  # one-shot statistics
        if "stats" not in memo:
            memo["stats"] = calibration_stats(work, calib, samples=calib_samples, batch_size=batch_size,
                                              threads=threads, embeddings=embeddings)
        stats, counts = memo["stats"]
    conv_stats = {}
    if convs and calib is not None and method in DATA_AWARE:
        if "conv_stats" not in memo:
            memo["conv_stats"] = conv_patch_stats(work, calib, samples=calib_samples, batch_size=batch_size,
                                                  threads=threads)
        conv_stats = memo["conv_stats"]
    if method == "fisher":
        if "sensitivity" not in memo:
            memo["sensitivity"] = output_sensitivities(
                work, calib, samples=min(calib_samples or SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES),
                batch_size=batch_size, threads=threads)
        sensitivity = memo["sensitivity"]
    # decompositions are kept for the searches that reuse them (budgets); a rank rule fits each
    # weight once, on the executor
    allocation, cache = None, memo.setdefault("factorize_cache", {}) if keep and param_budget is not None else None
    if param_budget is not None:
        # The allocators of onnxlr.rank_search, candidates judged end to end on the calibration data.
        # One search space per budget kind, kept in the memo: the lossless search tries many budgets.
        spaces = memo.setdefault("search_spaces", {})
        allocation = choose_allocation(work, config, stats, sensitivity, calib, allocator=allocator, seed=seed,
                                       space=spaces.get(kind), divergence=divergence, samples=calib_samples,
                                       threads=threads, cache=cache, cost_of=cost_of, executor=executor)
        spaces[kind] = allocation["space"]
        config = dataclasses.replace(config, param_budget=None, ranks={**allocation["ranks"], **config.ranks})
    if sequential:
        collect = paired_collector(work, calib, samples=calib_samples, batch_size=batch_size, threads=threads)
        passes = [FactorizeMatMulSequential(config, collect, sensitivity)]
    else:
        passes = [FactorizeMatMul(config, stats, sensitivity, cache=cache, executor=executor)]
    if convs or conv_skipped:  # the pass also reports the convs it cannot factorize, and why
        guard = None
        if latency_guard:
            guard = LatencyGuard(input_shapes(work, dims), provider=parse_providers(providers)[0],
                                 threads=threads or default_threads())
        conv_config = FactorizeConvConfig(decomposition=conv, param_ratio=conv_ratio or DEFAULT_CONV_RATIO,
                                          ranks=conv_ranks, rank_multiple=rank_multiple,
                                          max_layer_error=conv_max_error, force=force)
        passes.append(FactorizeConv(conv_config, conv_stats, guard))
    if embeddings:
        passes.append(FactorizeEmbedding(FactorizeEmbeddingConfig(
            rank_ratio=rank_ratio, energy=energy, ranks=table_ranks, force=force), counts))
    optimized, records = PassManager(passes).run(work)
    if allocation is not None:
        records[0].config["allocation"] = allocation["record"]
    return optimized, records


# A latency target is re-measured on the whole model; when missed, the search's share is lowered by the
# miss and the model rebuilt, at most this many times.
LATENCY_RETRIES = 2


def _meet_latency(work, optimized, report, build, share: float, *, provider: str, threads, dims):
    """Time the result against ``work`` (interleaved, whole model, synthetic inputs at ``dims``): the
    per-layer lookup table misses what the layers' neighbours and ORT's fusions do, so a missed target
    is searched again with the share lowered by the miss. The record lists every check."""
    asked, checks = share, []
    for attempt in range(LATENCY_RETRIES + 1):
        ratio = rank_search.latency_ratio(work, optimized, provider=provider, threads=threads or default_threads(),
                                          dims=dims)
        checks.append({"share_searched": round(share, 4), "measured_ratio": round(ratio, 4)})
        if ratio <= asked or attempt == LATENCY_RETRIES or share - (ratio - asked) <= 0:
            break
        share -= ratio - asked
        try:
            optimized, report = build(f"latency={share:.4f}")
        except OnnxlrError:  # the lowered budget is out of reach: the last result stands
            break
    record = report.pass_named("factorize_matmul").config["allocation"]
    record["latency_checks"] = checks
    record["latency_met"] = checks[-1]["measured_ratio"] <= asked
    return optimized, report


LOSSLESS_MAX_SHARE = 0.99
LOSSLESS_STEPS = 6
LOSSLESS_RETRIES = 3


def lossless_target(model: onnx.ModelProto, tolerance: Tolerance, build, calib: CalibLike, *,
                    samples: int | None = None, batch_size: int = 8, threads: int | None = None):
    """The smallest share of parameters whose factorization still meets ``tolerance`` end to end on the
    calibration data: bisection over ``--target params=S`` between 0 and ``LOSSLESS_MAX_SHARE`` in
    ``LOSSLESS_STEPS`` halvings, each candidate built by ``build(spec) -> ModelProto`` and compared with
    ``model`` on every calibration batch (the metric and threshold of ``tolerance``). Returns the
    target spec and a report record of every share tried; raises when not even the largest share
    meets the tolerance. Held-out validation (``inputs``) then confirms the result."""
    batches = list(calibration_batches(calib, model, samples=samples, batch_size=batch_size))
    threads = threads or default_threads()

    def outputs(candidate: onnx.ModelProto) -> dict[str, np.ndarray]:
        session = make_session(candidate.SerializeToString(), "CPUExecutionProvider", threads)
        names = [o.name for o in session.get_outputs()]
        runs = [session.run(None, {k: np.asarray(v) for k, v in batch.items()}) for batch in batches]
        return {name: np.concatenate([np.atleast_1d(r[i]) for r in runs]) for i, name in enumerate(names)}

    reference = outputs(model)
    record = PassRecord("lossless_search", {"tolerance": str(tolerance), "tried": {}})

    def meets(share: float) -> bool:
        try:
            got = outputs(build(f"params={share:.4f}"))
        except OnnxlrError:  # below the smallest reachable budget
            ok = False
        else:
            ok = all(tolerance.holds(compare_outputs(name, reference[name], got[name])) for name in reference)
        record.config["tried"][round(share, 4)] = ok
        return ok

    low, high = 0.0, LOSSLESS_MAX_SHARE
    if not meets(high):
        raise OnnxlrError(f"no factorization meets {tolerance} on the calibration data, even keeping "
                          f"{high:.0%} of the parameters")
    for _ in range(LOSSLESS_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    record.config["share"] = round(high, 4)
    return f"params={high:.4f}", record


def _compress(model: onnx.ModelProto, steps, calib: CalibLike, *, samples: int | None, batch_size: int,
              threads: int | None) -> tuple[onnx.ModelProto, list]:
    """Run a recipe's steps in order, each on fresh calibration statistics of the model it gets."""
    records = []
    for step in steps:
        config = step.config(calib is not None)
        tensors = step.pass_class.stats_tensors(import_graph(model), config) if calib is not None else []
        stats = tensor_stats(model, tensors, calib, samples=samples, batch_size=batch_size, threads=threads)
        model, [record] = PassManager([step.pass_class(config, stats)]).run(model)
        records.append(record)
    return model, records


def tensor_stats(model: onnx.ModelProto, tensors: Sequence[str], calib: CalibLike, *, samples: int | None = None,
                 batch_size: int = 8, threads: int | None = None) -> dict[str, Any]:
    """Statistics of ``tensors`` on the calibration data, in one streaming ORT run each for the
    per-row tensors and for the per-channel ones: a tensor read by a Conv gets channel vectors as rows
    (its NCHW activation moved to (N·H·W, C)), any other tensor its last axis."""
    if not tensors:
        return {}
    graph = import_graph(model)
    conv_inputs = {node.inputs[0].name for node in graph.nodes if node.op == "Conv"}
    channel = [t for t in tensors if t in conv_inputs]
    rows = [t for t in tensors if t not in conv_inputs]
    batches = functools.partial(calibration_batches, calib, model, samples=samples, batch_size=batch_size)
    threads = threads or default_threads()
    stats = collect_stats(model, rows, batches, mask_input=find_mask_input(model, None), threads=threads)[0] if rows else {}
    if channel:
        stats.update(collect_unfolded_stats(model, {t: (t, channel_rows) for t in channel}, batches, threads=threads))
    return stats


def optimize(
    model: ModelLike,
    *,
    recipe: str = "lowrank",
    calib: CalibLike = None,
    calib_samples: int | None = None,
    method: str | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
    target: str | tuple[str, float] | None = None,
    allocator: str = "auto",
    seed: int = 0,
    force: bool = False,
    refit: bool = True,
    bias_correction: bool = True,
    sequential: bool = False,
    conv: str = "auto",
    conv_ratio: float | None = None,
    rank_multiple: int = 8,
    conv_max_error: float | None = None,
    latency_guard: bool = False,
    embeddings: bool = False,
    chains: float | None = None,
    providers: str | Sequence[str] = ("cpu",),
    devices: str | Sequence[str] = (),
    inputs: InputsLike = None,
    dims: Mapping[str, int] | None = None,
    max_error: float | str | Tolerance | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    repeats: int = 20,
    validate: bool = True,
    svd_solver: str = "auto",
    workers: int | None = None,
    executor: "str | SerialExecutor" = "local",
) -> tuple[onnx.ModelProto, Report]:
    """Compress a model — by default factorize its MatMul/Gemm layers — and validate the result
    against the original.

    Parameters
    ----------
    model : path to an .onnx file, or a ModelProto (not modified).
    recipe : which passes run (:mod:`onnxlr.recipes`): ``lowrank`` (default; the rank options below),
        ``int8``, ``int8-qdq``, ``int8-weights``, ``lowrank+int8``, ``prune+int8``, ``int4``,
        ``int4+comp``, ``sparse+comp``. The rank options are an error with a recipe that does not
        factorize.
    calib : calibration samples: .npz keyed by input name, a folder of .npz/.npy files, or an
        iterable of feed dicts. Data-aware methods fit each layer's output on them.
    calib_samples : use at most this many calibration samples.
    method : ``svd``, ``whitened``, ``fisher``, ``asvd`` or ``isvt``; default ``whitened`` with
        ``calib``, ``svd`` without. ``fisher`` also measures each layer's output sensitivity on up to
        ``SENSITIVITY_SAMPLES`` calibration samples.
    rank_ratio : keep ``ceil(rank_ratio * min(k, n))`` singular values of each (k, n) weight.
    energy : keep the smallest rank holding this share of each weight's squared spectrum.
        With neither, ``rank_ratio=DEFAULT_RANK_RATIO``.
    target : ``"params=0.5"``: the whole model keeps this share of its parameters (``"macs=0.5"``: of
        its multiply-adds per run at ``dims``; ``"lossless"``: the smallest share that still meets
        ``max_error`` on the calibration data, found by bisection, :func:`lossless_target`); the ranks of the
        factorizable layers are allocated to fit (``onnxlr.allocation``: least summed truncation error
        of the method's spectrum, some layers possibly left dense). Excludes ``rank_ratio``/``energy``.
    allocator : how ``target`` spreads the budget over the layers (:mod:`onnxlr.rank_search`): ``uniform``,
        ``greedy``, ``knapsack``, ``evolutionary`` (needs ``calib``; seeded by ``seed``) or ``auto``
        (default: uniform and two knapsacks, the best end to end on ``calib`` kept). Candidates are
        scored by the divergence matching ``max_error``'s metric (cosine gap, KL of softmax for
        ``kl``/``top1``, else squared relative L2).
    seed : seed of the evolutionary search (the result is deterministic for a given seed).
    ranks : per-layer ranks keyed by node or weight name (override the rule above).
    force : rewrite layers even when their rank would not save parameters.
    refit, bias_correction : data-aware methods refit the output factor to the layer's true output
        and fold the mean output error into the bias; switch off for ablations.
    sequential : data-aware methods: factorize stage by stage, fitting each layer to reproduce the
        original output from the input the already-compressed layers give it (one pass over the
        calibration data per stage; :mod:`onnxlr.passes.factorize_sequential`).
    conv : how Conv layers are factorized: ``auto`` (per layer, the decomposition with the lowest
        calibrated error within the budget), ``channel``, ``spatial``, ``tucker2``, or ``none``.
    conv_ratio : share of each conv's parameters its replacement may keep (default 0.5; with
        ``target`` and no ``conv_ratio`` the convs are left alone: the target allocates MatMul/Gemm ranks).
    rank_multiple : conv ranks are rounded down to a multiple of this (SIMD-friendly widths); 1 = exact.
    conv_max_error : leave a conv dense when its best candidate's relative output error on the
        calibration data (weight error without data) exceeds this.
    latency_guard : keep a conv rewrite only if it runs faster in ONNX Runtime on the first provider,
        measured at the layer's input shape (symbolic dimensions from ``dims``, batch 1 otherwise).
    embeddings : also factorize embedding tables (Gather on a constant [vocab, d] table) under the
        same rank rule, weighted by token frequency in ``calib`` when given.
    chains : compose chains of linear layers (:mod:`onnxlr.passes.compose_chains`) into one map at the
        width its calibrated rank needs, each within this relative output error (``DEFAULT_CHAIN_ERROR``
        is 1e-3; 0 keeps the exact rank); None (default) leaves chains alone. Runs after the
        factorization and before any quantization, on fresh calibration statistics; such a run reads the
        whole model into memory (no streaming).
    providers : execution providers to validate on (``"cpu,cuda"``, ``"all"``, or a list; options after
        colons: ``"cuda:device_id=1"``, :mod:`onnxlr.runtimes.providers`).
    devices : command prefixes of other Pythons to validate on as well (``"ssh user@board"``, a venv's
        ``bin/python`` holding onnxruntime-openvino…, :mod:`onnxlr.runtimes.devices`).
    inputs : sample inputs: .npz path or dict keyed by input name; None for synthetic ones.
    dims : values of symbolic input dimensions for synthetic inputs.
    max_error : tolerance (see :func:`parse_tolerance`); ``report.passed`` says if it held.
    threads : intra-op threads for ONNX Runtime (default: all cores of this process).
    batch_size : samples per run (axis 0) when comparing and timing.
    repeats : timed runs per model and provider.
    validate : False to skip running ONNX Runtime.
    svd_solver : ``auto`` (randomized SVD where a single small rank of a large weight is wanted,
        :func:`onnxlr.linalg.svd_solver`; each layer's report says which it got), ``exact`` or
        ``randomized``.
    workers : processes (or Ray actors) fitting the weights side by side and scoring the evolutionary
        search's candidates; default 1, this process. Each gets the cores divided among them as BLAS
        threads (:mod:`onnxlr.executors`).
    executor : ``local`` (a process pool on this machine) or ``ray`` (a Ray cluster: ``RAY_ADDRESS``,
        else a local Ray instance; needs ``pip install onnxlr[ray]``), or an executor object of
        :mod:`onnxlr.executors` (kept open: several runs can share one Ray instance).

    A model file with external data and no calibration data is processed *streamed*: its tensors stay
    in their files, each weight is read through a memory map when it is factorized, its pages dropped
    afterwards, and the factors go to a temporary spill file; :func:`write` then copies everything into
    the output chunk by chunk. Peak memory stays near the largest weight's SVD work, not the model size
    (validation still runs ONNX Runtime on both models whole).

    Returns
    -------
    (optimized ModelProto, Report)
    """
    recipe_ = get_recipe(recipe)
    if allocator not in rank_search.ALLOCATORS:
        raise OnnxlrError(f"unknown allocator {allocator!r} (choose from {', '.join(rank_search.ALLOCATORS)})")
    if allocator != "auto" and target is None:
        raise OnnxlrError("--allocator spreads a --target budget over the layers: give --target too")
    factorize_options = {"method": method, "rank_ratio": rank_ratio, "energy": energy, "ranks": ranks or None,
                         "target": target, "sequential": sequential or None, "conv_ratio": conv_ratio,
                         "embeddings": embeddings or None}
    if not recipe_.factorize and any(v is not None for v in factorize_options.values()):
        given = next(k for k, v in factorize_options.items() if v is not None)
        raise OnnxlrError(f"{given.replace('_', '-')} applies to low-rank factorization; recipe {recipe!r} does not "
                          f"factorize (use lowrank or lowrank+int8)")
    if recipe_.needs_calib and calib is None:
        raise OnnxlrError(f"recipe {recipe!r} needs calibration data (--calib)")
    steps = recipe_.steps
    if chains is not None:  # first among the recipe's steps: after the factorization, before quantization
        config = ComposeChainsConfig(max_error=chains)
        steps = (Step(ComposeLinearChains, lambda calibrated: config),
                 *(step for step in steps if step.pass_class is not ComposeLinearChains))
    tolerance = parse_tolerance(max_error)
    parse_providers(providers), parse_devices(devices)  # fail on a malformed one before the slow part
    if isinstance(calib, Iterator) and (steps or method == "fisher" or sequential):
        calib = list(calib)  # read more than once (statistics of every step): a one-shot iterator is kept
    original, path = _load(model, mapped=calib is None and recipe == "lowrank" and chains is None)
    streamed = io.is_mapped(original)
    if validate:  # bad inputs, or an original that cannot run or gives NaN/Inf on them: fail before any rewrite
        sampled = sample_inputs(original, inputs, dims)  # read once, used again by every validation below
        feeds_mod.check_original_outputs(Path(path) if streamed else original, *sampled, threads=threads,
                                         batch_size=batch_size)
    own = isinstance(executor, str)  # an executor object given is the caller's to close
    pool_context = make_executor(executor, workers) if own else contextlib.nullcontext(executor)
    with (spilling() if streamed else contextlib.nullcontext()) as spill, pool_context as pool:
        return _optimize(original, path, spill, pool, recipe_, tolerance, sampled if validate else None,
                         calib=calib, calib_samples=calib_samples, method=method, rank_ratio=rank_ratio,
                         energy=energy, ranks=ranks, target=target, allocator=allocator, seed=seed, force=force,
                         refit=refit, bias_correction=bias_correction, sequential=sequential, conv=conv,
                         conv_ratio=conv_ratio, rank_multiple=rank_multiple, conv_max_error=conv_max_error,
                         latency_guard=latency_guard, embeddings=embeddings, steps=steps,
                         providers=providers, devices=devices,
                         dims=dims, threads=threads, batch_size=batch_size, repeats=repeats, validate=validate,
                         svd_solver=svd_solver)


def _optimize(original, path, spill, pool, recipe_, tolerance, sampled, *, calib, calib_samples, method,
              rank_ratio, energy, ranks, target, allocator, seed, force, refit, bias_correction, sequential, conv,
              conv_ratio, rank_multiple, conv_max_error, latency_guard, embeddings, steps, providers, devices, dims,
              threads, batch_size, repeats, validate, svd_solver):
    """:func:`optimize` once the model is loaded and its inputs checked (its parameters); ``spill``:
    the spill file of a streamed model, else None."""
    streamed = spill is not None
    arrived = import_graph(original)
    int8_weights = prequantized.weight_quantized_nodes(arrived)
    # Weights computed from constants (int8 QDQ weights among them) become float initializers first;
    # everything below sees the folded model.
    work, folded = PassManager([FoldConstants()]).run(original)
    records = [record for record in [prequantized.qoperator_record(arrived), *folded] if record.layers]
    search = None
    if recipe_.factorize and target == "lossless":
        if tolerance is None or calib is None:
            raise OnnxlrError("--target lossless needs --max-error (the tolerance to keep) and --calib "
                              "(the data the search runs on)")
    factorize = functools.partial(
        _factorize, work, calib=calib, calib_samples=calib_samples, method=method,
        rank_ratio=rank_ratio, energy=energy, ranks=ranks, force=force, refit=refit,
        bias_correction=bias_correction, sequential=sequential, conv=conv, conv_ratio=conv_ratio,
        rank_multiple=rank_multiple, conv_max_error=conv_max_error, latency_guard=latency_guard,
        embeddings=embeddings, providers=providers, dims=dims, threads=threads, batch_size=batch_size,
        allocator=allocator, seed=seed, memo={} if not streamed else None, executor=pool, svd_solver=svd_solver,
        divergence=SEARCH_DIVERGENCE.get(tolerance.metric if tolerance else "", "rel_l2"))
    if recipe_.factorize and target == "lossless":
        target, search = lossless_target(work, tolerance, lambda spec: factorize(import_graph(work), target=spec)[0],
                                         calib, samples=calib_samples, batch_size=batch_size, threads=threads)

    def build(target) -> tuple[onnx.ModelProto, Report]:
        """Factorize (if the recipe does), run the recipe's steps, check, validate."""
        optimized, built = work, list(records) + ([search] if search else [])
        if recipe_.factorize:
            optimized, factorized = factorize(import_graph(work), target=target)
            built += factorized
        run = steps
        if int8_weights and not any(step.pass_class in (QuantizeInt8, QuantizeMatMulNBits) for step in run):
            # The input stored these weights as int8: store them (and their factors) so again.
            names = prequantized.replacements(import_graph(optimized), int8_weights)
            run = (*run, Step(QuantizeInt8, lambda calibrated: QuantizeInt8Config(
                activations="none", rounding="nearest", only=names, min_params=0)))
        if run:
            optimized, compressed = _compress(optimized, run, calib, samples=calib_samples,
                                              batch_size=batch_size, threads=threads)
            built += compressed
        candidate = optimized
        try:
            if streamed:  # written beside the spill file, checked by path, validated from there
                candidate = io.save_model(optimized, spill.path.parent / "optimized.onnx", external_data=True)
            else:
                io.check_model(optimized)
        except OnnxlrError:
            raise  # no room to write the candidate: the user's disk, not a bug
        except Exception as exc:  # a broken rewrite is a bug in onnxlr, not a user error
            raise RuntimeError(f"onnxlr produced an invalid model: {exc}") from exc
        report = Report(ModelSummary.of(original, path), ModelSummary.of(optimized), built, tolerance=tolerance,
                        streamed=streamed)
        if validate:
            report.validation = _validate(Path(path) if streamed else original, candidate,
                                          providers=providers, devices=devices,
                                          sampled=sampled,
                                          threads=threads, batch_size=batch_size, repeats=repeats)
        return optimized, report

    optimized, report = build(target)
    target_kind, target_share = parse_target(target) if target not in (None, "lossless") else (None, None)
    if recipe_.factorize and target_kind == "latency":
        optimized, report = _meet_latency(work, optimized, report, build, target_share,
                                          provider=parse_providers(providers)[0], threads=threads, dims=dims)
    # A lossless share found on the calibration data must also hold on the held-out inputs: step back
    # towards the dense model (half the remaining distance each time) until it does.
    for _ in range(LOSSLESS_RETRIES if search else 0):
        if report.passed is not False:
            break
        share = search.config["share"]
        share = round(share + (LOSSLESS_MAX_SHARE - share) / 2, 4)
        search.config.setdefault("held_out_retries", []).append(share)
        search.config["share"] = share
        optimized, report = build(f"params={share:.4f}")
    return optimized, report


def validate(
    original: ModelLike,
    optimized: ModelLike,
    *,
    providers: str | Sequence[str] = ("cpu",),
    devices: str | Sequence[str] = (),
    inputs: InputsLike = None,
    dims: Mapping[str, int] | None = None,
    max_error: float | str | Tolerance | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    repeats: int = 20,
) -> Report:
    """Compare two models' outputs and latency on each provider (see :func:`optimize`)."""
    tolerance = parse_tolerance(max_error)
    # a file with external data stays in its files (mapped) and ONNX Runtime opens it by path
    ref, ref_path = _load(original, mapped=True)
    opt, opt_path = _load(optimized, mapped=True)
    report = Report(ModelSummary.of(ref, ref_path), ModelSummary.of(opt, opt_path), tolerance=tolerance)
    ref_source, opt_source = (Path(p) if io.is_mapped(m) else m for m, p in ((ref, ref_path), (opt, opt_path)))
    report.validation = _validate(ref_source, opt_source, providers=providers, devices=devices,
                                  sampled=sample_inputs(ref, inputs, dims),
                                  threads=threads, batch_size=batch_size, repeats=repeats)
    return report


INSPECT_RANK_FRACTIONS = (0.1, 0.25, 0.5)


def inspect(model: ModelLike, *, dims: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Per MatMul/Gemm and Conv layer: weight shape, params, MACs, whether factorizable, break-even
    rank and the spectrum energy kept at a few ranks (for a conv, of its channel unfolding).

    MACs are per output row / pixel (``macs_per_row``) and, when shape inference can tell the layer's
    output shape (symbolic input dimensions set through ``dims``, a leading batch dimension taken as
    1), for one full run (``macs``).
    """
    proto, _ = _load(model)
    proto = PassManager([FoldConstants()]).run(proto)[0]
    macs = count_macs(proto, dims).per_node
    graph = import_graph(proto)
    layers, skipped = find_layers(graph)
    convs, conv_skipped = find_convs(graph)
    # (node, weight, shape shown: the logical (k, n) of a MatMul/Gemm, the raw conv kernel, matrix)
    matrices = [(layer.node, layer.weight, list(layer.W.shape), layer.W) for layer in layers]
    matrices += [(layer.node, layer.weight, list(layer.W.shape), conv_factors.channel_matrix(layer.W))
                 for layer in convs]
    out = []
    for node, weight, shape, M in matrices:
        k, n = M.shape
        s = linalg.svd(M)[1]
        kept = linalg.energy_kept(s)
        m = s.size
        out.append({
            "node": node.name, "op": node.op, "weight": weight.name,
            "shape": shape, "params": k * n, "macs_per_row": k * n,
            "macs": macs.get(node.name or node.outputs[0].name),
            "factorizable": True, "reason": "",
            "break_even_rank": round(linalg.break_even_rank(k, n), 1),
            "energy_at_rank": {int(max(1, round(f * m))): round(float(kept[max(1, round(f * m)) - 1]), 4)
                               for f in INSPECT_RANK_FRACTIONS},
            "rank_for_energy": {e: linalg.rank_for_energy(s, e) for e in (0.9, 0.99)},
        })
    for change in [*skipped, *conv_skipped]:
        out.append({"node": change.node, "op": change.op, "factorizable": False, "reason": change.reason})
    return out


def write(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
          external_data: bool | None = None) -> Path:
    """Write ``model`` atomically after checking it; refuses to overwrite ``source`` or its external
    data files (:func:`check_output_path`)."""
    if source is not None:
        check_output_path(path, source)
    return io.save_model(model, path, external_data=external_data)


def check_output_path(path: str | os.PathLike, source: str | os.PathLike) -> None:
    """OnnxlrError when writing ``path`` (or its ``<name>.data``) would overwrite the model ``source``
    or an external data file it reads: same path, symlink, hard link or ``..`` spelling."""
    for target in (Path(path), Path(f"{path}.data")):
        for used in io.files_of(source):
            if target.resolve() == used.resolve() or target.exists() and used.exists() and os.path.samefile(target, used):
                if used == Path(source):
                    raise OnnxlrError(f"output path {path} is the input model; choose another path")
                raise OnnxlrError(f"writing {path} would overwrite the input's external data {used.name}; "
                                  "choose another path")
