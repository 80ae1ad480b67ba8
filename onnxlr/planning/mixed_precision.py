"""One byte budget over rank and bits: the ``mixed`` recipe's planner.

Every MatMul/Gemm weight may stay float, become int8 per channel (``QuantizeInt8``, static
activations), 4-bit blocks of 32, 64 or 128 (``QuantizeMatMulNBits``), or low-rank factors at a few
ranks (``FactorizeMatMul``, whitened SVD) kept float, int8 or 4-bit; every embedding table may stay
float, become int8 per row or 4-/2-bit blocks (``QuantizeTableBlocks``). Each option has its exact
bytes and its calibrated output error (:mod:`onnxlr.weight_formats`, from the Grams of the layer
inputs); with ``end_to_end`` each layer's errors are weighted by how much the model output notices
them — the divergence measured with only that layer at a probe format, over the probe's calibrated
error (one swapped ONNX Runtime run per layer, :class:`onnxlr.runtimes.swap.SwapRunner`). The
multiple-choice knapsack (:func:`onnxlr.weight_formats.allocate`) then picks one option per layer
within ``--target bytes=SIZE``.

The build applies the picks in order — factorization, int8, 4-bit MatMulNBits per block size, tables
— each pass on fresh statistics of the model it gets. The serialized result is checked against the
target (with :data:`~onnxlr.planning.targets.PROVENANCE_BYTES` for the metadata onnxlr adds); when the
graph's own overhead (new nodes, names) pushed it over, the budget is tightened by the excess and the
allocation built again.

:class:`MixedPlanner` has the interface of :class:`onnxlr.planning.factorize.Factorizer` (``build``),
so the optimizer runs it in the factorizer's place for a recipe with ``mixed_bits``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.numpy_helper

from onnxlr import allocation, blockwise, linalg, progress, weight_formats
from onnxlr.errors import OnnxlrError
from onnxlr.factorization import Decomposer, FitSettings
from onnxlr.graph import import_graph
from onnxlr.matching import find_layers, find_tables
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from onnxlr.passes.quantize_nbits import QuantizeMatMulNBits, QuantizeMatMulNBitsConfig
from onnxlr.passes.quantize_table_blocks import QuantizeTableBlocks, QuantizeTableBlocksConfig
from onnxlr.pipeline import LayerChange, PassManager, PassRecord
from onnxlr.planning.rank_search import SEARCH_BATCH_SIZE
from onnxlr.planning.targets import PROVENANCE_BYTES, Target
from onnxlr.runtimes.providers import default_threads, make_session
from onnxlr.runtimes.swap import SwapRunner
from onnxlr.statistics import Rows, TokenCounts
from onnxlr.weight_formats import WeightFormat

BLOCK_SIZES = (32, 64, 128)
RANK_LEVELS = 6  # low ranks offered per weight, on an even grid below the break-even rank
TABLE_FORMATS = (WeightFormat("float"), WeightFormat("int8"), *(WeightFormat("int4", 0, b) for b in BLOCK_SIZES),
                 WeightFormat("int2", 0, 32))
PROBE = WeightFormat("int4", 0, 32)  # the format each layer's end-to-end sensitivity is measured at
# New nodes and tensor names a rewritten layer adds to the file (measured on MiniLM: 200-500 bytes).
GRAPH_BYTES = 512
SIZE_RETRIES = 3


def linear_formats(k: int, n: int) -> list[WeightFormat]:
    """The options of a (k, n) MatMul/Gemm weight."""
    formats = [WeightFormat("float"), WeightFormat("int8"), *(WeightFormat("int4", 0, b) for b in BLOCK_SIZES)]
    for r in allocation.rank_levels(k, n, RANK_LEVELS)[:-1]:
        formats += [WeightFormat("float", int(r)), WeightFormat("int8", int(r)), WeightFormat("int4", int(r), 32)]
    return formats


@dataclass
class MixedSpace:
    """The options of every searched weight and table (``options``, linears first), the nodes reading
    each (``nodes``), and the bytes of everything else in the model (``fixed_bytes``)."""

    options: list[weight_formats.LayerOptions]
    nodes: list[list[str]]
    kinds: list[str]  # "linear" or "table"
    fixed_bytes: int
    probes: dict = field(default_factory=dict)  # seconds and runs of the sensitivity probes


class MixedPlanner:
    """Builds ``model`` (folded, not modified) with one storage format per layer under a bytes target.

    rank : the run's :class:`~onnxlr.planning.options.RankRule` (its target, method, refit, bias
    correction and SVD solver); conv is not used (convs stay as they are); service : the calibration
    service (required); setting : :class:`~onnxlr.planning.factorize.RunSetting`.
    """

    def __init__(self, model: onnx.ModelProto, rank, conv, service, setting, *, keep: bool = True,
                 end_to_end: bool = True):
        if service is None:
            raise OnnxlrError("the mixed recipe measures each format's error on calibration data: give --calib")
        self.model, self.rank, self.service, self.setting = model, rank, service, setting
        method = rank.method_for(True) if rank is not None else "whitened"
        method = "whitened" if method in ("fisher", "svd") else method  # the errors are whitened objectives
        self.settings = FitSettings(method, *(
            (rank.refit, rank.bias_correction, rank.svd_solver) if rank is not None else ()))
        self.end_to_end = end_to_end
        self.cache: dict = {}
        self._space: MixedSpace | None = None

    # ----------------------------------------------------------------------------------- the options

    def space(self) -> MixedSpace:
        """Every layer's options, computed once per planner."""
        if self._space is None:
            self._space = self._options()
        return self._space

    def _options(self) -> MixedSpace:
        graph = import_graph(self.model)
        layers = [l for l in find_layers(graph)[0] if not (l.node.op == "Gemm" and l.node.attrs.get("transA", 0))]
        tables = find_tables(graph)[0]
        stats = self.service.collect(self.model, [Rows(l.input.name) for l in layers]
                                     + [TokenCounts(t.indices.name, t.table.values.shape[0]) for t in tables])
        decomposer = Decomposer(self.settings, self.cache)
        per_weight = decomposer.weight_stats(layers, stats)
        layers = [l for l in layers if l.key in per_weight]
        self._grams = {key: st.gram for key, st in per_weight.items()}
        decompositions = decomposer.decompositions(layers, stats)
        options, nodes, kinds, seen = [], [], [], {}
        progress.phase(f"bytes and calibrated errors of every format of {len(layers)} MatMul/Gemm weights")
        for layer in layers:
            if layer.key in seen:
                nodes[seen[layer.key]].append(layer.node.name)
                continue
            st, W = per_weight[layer.key], layer.W
            def factors(r, W=W, key=layer.key):
                return decomposer.factors(W, r, decompositions[key])[:2]
            centered = st.centered_gram if self.settings.bias_correction else None
            seen[layer.key] = len(options)
            options.append(weight_formats.layer_options(layer.weight.name, W, st.gram, linear_formats(*W.shape),
                                                        factors=factors, centered_gram=centered))
            nodes.append([layer.node.name])
            kinds.append("linear")
        for t in tables:
            counts = stats.get(t.indices.name)
            if counts is None:
                continue
            d = t.table.values.shape[1]
            formats = [f for f in TABLE_FORMATS if not f.block_size or d % f.block_size == 0]
            options.append(weight_formats.table_options(t.table.name, t.table.values, counts, formats))
            nodes.append([t.node.name])
            kinds.append("table")
        for layer_options in options:  # every rewritten layer adds nodes and names to the file
            layer_options.bytes = [b + (GRAPH_BYTES if f != WeightFormat("float") else 0)
                                   for f, b in zip(layer_options.formats, layer_options.bytes)]
        searched = {l.weight.name: l.W.nbytes for l in layers} | {t.table.name: t.table.values.nbytes for t in tables
                                                                   if any(o.name == t.table.name for o in options)}
        space = MixedSpace(options, nodes, kinds, self.model.ByteSize() - sum(searched.values()))
        if self.end_to_end:
            self._weigh(space, layers, tables)
        return space

    def _weigh(self, space: MixedSpace, layers, tables) -> None:
        """Each layer's error weight: the model-output divergence with only that layer at :data:`PROBE`
        (tables: 4-bit blocks of 32) over the probe's calibrated error, on a quarter of the batches."""
        progress.phase(f"end-to-end sensitivity of {len(space.options)} layers")
        batches = self.service.batches(SEARCH_BATCH_SIZE)
        runner = SwapRunner(self.model, layers, batches, divergence=self.setting.divergence,
                            threads=self.setting.threads or default_threads())
        ids = list(range(max(1, len(batches) // 4)))
        by_weight = {l.weight.name: l for l in layers}
        by_table = {t.table.name: t for t in tables}
        for options, kind in zip(space.options, space.kinds):
            if kind == "linear":
                layer = by_weight[options.name]
                W_hat = blockwise.dequantize_blockwise(*blockwise.quantize_blockwise(layer.W, 4, PROBE.block_size),
                                                       layer.W.shape[0])
                error = linalg.output_error(layer.W, W_hat, self._grams[layer.key]) ** 2
                stored = W_hat.T if layer.transposed else W_hat
                divergence = runner.divergence({layer.key: (stored.astype(layer.W.dtype), None)}, ids)
            else:
                T = np.asarray(by_table[options.name].table.values)
                T_hat = blockwise.dequantize_table(*blockwise.quantize_table(T, 4, 32)).astype(T.dtype)
                divergence = _table_divergence(self.model, runner, options.name, T_hat, ids)
                error = options.errors[options.index(WeightFormat("int4", 0, 32))]
            if np.isfinite(divergence):
                options.weight = float(divergence / error) if error > 0 else 0.0
        space.probes = {"batch_runs": runner.evaluations, "batches": len(ids)}

    # ------------------------------------------------------------------------------------- building

    def build(self, target: Target | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """The model with the allocation's formats under ``target`` (``bytes``), and the records."""
        target = target if target is not None else (self.rank.target if self.rank is not None else None)
        if target is None or target.kind != "bytes":
            raise OnnxlrError("the mixed recipe spreads a file size over the layers: give --target bytes=SIZE")
        space = self.space()
        budget = target.value - PROVENANCE_BYTES - space.fixed_bytes
        tried = []
        for _ in range(SIZE_RETRIES):
            picks = weight_formats.allocate(space.options, budget)
            model, records = self.apply(picks)
            size = model.ByteSize() + PROVENANCE_BYTES
            tried.append({"budget": round(budget), "bytes": size})
            if size <= target.value:
                break
            budget -= size - target.value + GRAPH_BYTES
        record = self.record(picks, target, tried)
        return model, [record, *records]

    def apply(self, picks) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """Factorize, then quantize each layer as ``picks`` say (one pass per format group)."""
        space = self.space()
        chosen = [(o.formats[j], names, kind) for o, j, names, kind in zip(space.options, picks, space.nodes, space.kinds)]
        ranks = {o.name: f.rank for o, (f, _, kind) in zip(space.options, chosen) if kind == "linear"}
        model, records = self.model, []
        if any(ranks.values()):
            config = FactorizeMatMulConfig(method=self.settings.method, ranks=ranks, refit=self.settings.refit,
                                           bias_correction=self.settings.bias_correction,
                                           svd_solver=self.settings.svd_solver)
            model, record = self._run(model, FactorizeMatMul(config, {}, cache=self.cache))
            records.append(record)
        first_factors = _first_factors(model, [names for f, names, kind in chosen if f.rank and kind == "linear"])
        groups: dict[tuple, list[str]] = defaultdict(list)
        for fmt, names, kind in chosen:
            if fmt.precision != "float":
                extra = [first_factors[n] for n in names if n in first_factors] if fmt.rank else []
                groups[(kind, fmt.precision, fmt.bits, fmt.block_size)] += names + extra
        for (kind, precision, bits, block), names in sorted(groups.items()):
            model, record = self._run(model, _pass_for(kind, precision, bits, block, names))
            records.append(record)
        return model, records

    def _run(self, model: onnx.ModelProto, rewrite) -> tuple[onnx.ModelProto, PassRecord]:
        progress.phase(f"pass {rewrite.name}")
        rewrite.stats = self.service.collect_for(model, rewrite)
        model, [record] = PassManager([rewrite]).run(model)
        return model, record

    def record(self, picks, target: Target, tried: list[dict]) -> PassRecord:
        """The allocation: per layer the format, its bytes and predicted error, and the budget."""
        space = self.space()
        size, predicted = weight_formats.summed(space.options, picks)
        config = {"target": str(target), "fixed_bytes": space.fixed_bytes, "layer_bytes": size,
                  "predicted_divergence" if self.end_to_end else "predicted_error": predicted,
                  "builds": tried, "end_to_end": self.end_to_end, **space.probes}
        record = PassRecord("mixed_precision", config)
        for options, j, names in zip(space.options, picks, space.nodes):
            fmt = options.formats[j]
            text = (f"{fmt.label}: {options.bytes[j]:,} bytes, predicted output error "
                    f"{np.sqrt(options.errors[j]):.3g}")
            details = {"weight": options.name, "format": fmt.label, "precision": fmt.precision, "rank": fmt.rank,
                       "block_size": fmt.block_size, "format_bytes": options.bytes[j],
                       "predicted_error": float(np.sqrt(options.errors[j])), "sensitivity": options.weight}
            record.layers.append(LayerChange(names[0], "layer", "rewritten", text, details))
        return record


def _table_divergence(model: onnx.ModelProto, runner: SwapRunner, table: str, T_hat: np.ndarray, ids) -> float:
    """The divergence of ``model``'s outputs from the original's (``runner``'s reference) on batches
    ``ids`` with the table ``table`` replaced by ``T_hat``: one session of a copy of the model."""
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    found = [tensor for tensor in swapped.graph.initializer if tensor.name == table]
    if not found:  # not an initializer (a Constant node): unweighted
        return float("nan")
    found[0].CopyFrom(onnx.numpy_helper.from_array(T_hat, table))
    session = make_session(swapped.SerializeToString(), "CPUExecutionProvider", runner._threads)
    total = 0.0
    for i in ids:
        got = session.run(None, runner.batches[i])
        total += sum(runner.metric(np.asarray(r, np.float64), np.asarray(g, np.float64))
                     for r, g in zip(runner.reference[i], got) if np.issubdtype(np.asarray(r).dtype, np.floating))
    return total / max(len(ids), 1)


def _first_factors(model: onnx.ModelProto, groups: list[list[str]]) -> dict[str, str]:
    """For each factorized node (its second factor keeps the name), the node computing its first factor."""
    by_name = {node.name: node for node in import_graph(model).nodes}
    found = {}
    for names in groups:
        for name in names:
            producer = by_name[name].inputs[0].inputs
            if producer:
                found[name] = producer[0].name
    return found


def _pass_for(kind: str, precision: str, bits: int, block: int, names: list[str]):
    """The pass writing ``names`` in one format."""
    if precision == "int8" and kind == "linear":
        return QuantizeInt8(QuantizeInt8Config(activations="static", static_format="ort", convs=False, tables=False,
                                               min_params=0, only=names))
    if precision == "int8":
        return QuantizeInt8(QuantizeInt8Config(matmuls=False, convs=False, min_params=0, only=names))
    if kind == "linear":
        return QuantizeMatMulNBits(QuantizeMatMulNBitsConfig(bits=bits, block_size=block, rounding="gptq", only=names,
                                                             min_size=0), {})
    return QuantizeTableBlocks(QuantizeTableBlocksConfig(bits=bits, block_size=block, only=names, min_params=0))
