"""The low-rank part of a run: from the rank and conv rules, the statistics they need and — for a
whole-model target — the ranks an allocator chooses, the passes that factorize a model.

A :class:`Factorizer` is bound to one (folded) model and keeps what several builds of it share: the
statistics (through the calibration service), the decompositions of every weight and the search
spaces of each budget kind. The lossless search and the latency loop build many budgets of one model;
each pays for its ONNX Runtime runs and SVDs once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from onnxlr import progress
from onnxlr.errors import OnnxlrError
from onnxlr.factorization import DATA_AWARE, FitSettings
from onnxlr.graph import import_graph
from onnxlr.matching import find_convs, find_layers, find_tables
from onnxlr.passes.factorize_conv import FactorizeConv, FactorizeConvConfig, patches_of, rewrite
from onnxlr.passes.factorize_embedding import FactorizeEmbedding, FactorizeEmbeddingConfig
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager, PassRecord
from onnxlr.planning import latency_target, rank_search
from onnxlr.planning.options import DEFAULT_CONV_RATIO, ConvRule, RankRule
from onnxlr.planning.sequential import FactorizeInStages
from onnxlr.planning.targets import Target, layer_budget
from onnxlr.runtimes.calibration import SENSITIVITY_SAMPLES
from onnxlr.runtimes.latency_guard import LatencyGuard
from onnxlr.runtimes.providers import default_threads, parse_providers
from onnxlr.shapes import input_shapes
from onnxlr.statistics import Rows, TokenCounts


@dataclass
class RunSetting:
    """Where a factorized model will run, for latency budgets and guards: the first provider, the
    symbolic dimensions, ONNX Runtime's threads, and the executor fitting weights."""

    providers: Any = ("cpu",)
    dims: dict | None = None
    threads: int | None = None
    executor: Any = None
    divergence: str = "rel_l2"  # what end-to-end scores of candidate allocations measure

    @property
    def provider(self) -> str:
        return parse_providers(self.providers)[0]


class Factorizer:
    """Builds factorized versions of ``model`` (folded, not modified) under ``rank`` and ``conv``.

    service : the calibration service (None: data-free, plain SVD). ``keep``: keep decompositions and
    search spaces between builds (not for a streamed model: they would hold every weight).
    """

    def __init__(self, model: onnx.ModelProto, rank: RankRule, conv: ConvRule, service, setting: RunSetting, *,
                 keep: bool = True):
        self.model, self.rank, self.conv, self.service, self.setting = model, rank, conv, service, setting
        self.method = rank.method_for(service is not None)
        if self.method in DATA_AWARE and service is None:
            raise OnnxlrError(f"method {self.method!r} needs calibration data (--calib)")
        if rank.sequential and self.method not in DATA_AWARE:
            raise OnnxlrError(f"sequential factorization needs a data-aware method (--method whitened…), "
                              f"not {self.method!r}")
        graph = import_graph(model)
        self.layers = find_layers(graph)[0]
        self.tables = find_tables(graph)[0] if rank.embeddings else []
        with_convs = conv.decomposition != "none" and (rank.target is None or conv.ratio)
        self.convs, self.conv_skipped = find_convs(graph) if with_convs else ([], [])
        # layers inside If/Loop/Scan bodies are fitted by the passes themselves (data-free there)
        self.counts = (len(find_layers(graph, nested=True)[0]), len(find_convs(graph, nested=True)[0]) if with_convs else 0)
        self.cache: dict | None = {} if keep else None
        self.spaces: dict[str, rank_search.SearchSpace] = {}
        self._latency: latency_target.LatencyModel | None = None

    # ------------------------------------------------------------------------------------- statistics

    def _stats(self, budgeted: bool):
        """Statistics of the layer inputs (and token counts), unless sequential fitting collects its own."""
        if self.service is None or (self.rank.sequential and not self.tables and not budgeted):
            return {}
        requests = [Rows(layer.input.name) for layer in self.layers]
        requests += [TokenCounts(t.indices.name, t.table.values.shape[0]) for t in self.tables]
        return self.service.collect(self.model, requests)

    def _sensitivity(self):
        if self.method != "fisher":
            return None
        samples = min(self.service.calib.samples or SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES)
        return self.service.sensitivity(self.model, sorted({layer.node.outputs[0].name for layer in self.layers}),
                                        samples=samples)

    # -------------------------------------------------------------------------------------- building

    def build(self, target: Target | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """The factorized model under ``target`` (the rule's own when None) and the passes' records."""
        target = target if target is not None else self.rank.target
        progress.phase(f"factorizing {self.counts[0]} MatMul/Gemm and {self.counts[1]} Conv layers"
                       + (f" within {target}" if target is not None else ""))
        stats, sensitivity = self._stats(target is not None), self._sensitivity()
        names = self._split_ranks()
        settings = FitSettings(self.method, self.rank.refit, self.rank.bias_correction, self.rank.svd_solver)
        allocation = None
        config = FactorizeMatMulConfig(method=self.method, rank_ratio=self.rank.ratio, energy=self.rank.energy,
                                       ranks=names["matmul"], force=self.rank.force, refit=self.rank.refit,
                                       bias_correction=self.rank.bias_correction, svd_solver=self.rank.svd_solver)
        if target is not None:
            allocation = self._allocate(target, settings, stats, sensitivity, names["matmul"])
            config.ranks = {**allocation.ranks_by_name(), **config.ranks}
        if self.rank.sequential:
            passes = [FactorizeInStages(config, self.model, self.service, sensitivity)]
        else:
            passes = [FactorizeMatMul(config, stats if self.service else None, sensitivity,
                                      cache=self.cache if target is not None else None, executor=self.setting.executor)]
        passes += self._conv_passes(names["conv"]) + self._table_passes(names["table"], stats)
        optimized, records = PassManager(passes).run(self.model)
        if allocation is not None:
            records[0].config["allocation"] = allocation.record()
            records[0].config["unit_costs"] = self._unit_costs
        return optimized, records

    def _split_ranks(self) -> dict[str, dict[str, int]]:
        """The user's per-layer ranks by the pass they belong to (embedding tables, convs, MatMul/Gemm)."""
        tables = {n for t in self.tables for n in (t.node.name, t.table.name)}
        convs = {n for layer in self.convs for n in (layer.node.name, layer.weight.name)}
        out = {"table": {}, "conv": {}, "matmul": {}}
        for name, rank in self.rank.ranks.items():
            out["table" if name in tables else "conv" if name in convs else "matmul"][name] = rank
        return out

    def _allocate(self, target: Target, settings: FitSettings, stats, sensitivity, given: dict):
        """The allocation of the factorizable layers' ranks under ``target``."""
        unit_costs = cost_of = None
        if target.kind == "latency":
            if self._latency is None:  # timed once per model: a missed target is searched again at another share
                self._latency = latency_target.latency_model(
                    self.model, self.layers, provider=self.setting.provider,
                    threads=self.setting.threads or default_threads(), dims=self.setting.dims)
            budget, cost_of = self._latency.budget(target.value), self._latency.cost_of
        else:
            budget, unit_costs = layer_budget(self.model, target, dims=self.setting.dims)
        self._unit_costs = unit_costs  # what one parameter of each weight takes of the budget, for the record
        # One search space per budget kind: the lossless search tries many budgets of one kind.
        space = self.spaces.get(target.kind)
        if space is None:
            batches = self.service.batches(rank_search.SEARCH_BATCH_SIZE) if self.service else None
            space = rank_search.search_space(
                self.model, settings, stats, sensitivity, batches, ranks=given, unit_costs=unit_costs,
                cost_of=cost_of, divergence=self.setting.divergence, threads=self.setting.threads or default_threads(),
                cache=self.cache)
            if self.cache is not None:
                self.spaces[target.kind] = space
        return space.search(budget, self.rank.allocator, seed=self.rank.seed, executor=self.setting.executor)

    def _conv_passes(self, ranks: dict[str, int]) -> list:
        if not self.convs and not self.conv_skipped:
            return []
        stats = {}
        if self.convs and self.service is not None and self.method in DATA_AWARE:
            stats = self.service.collect(self.model, [patches_of(layer) for layer in self.convs])
        guard = None
        if self.conv.latency_guard:
            guard = LatencyGuard(input_shapes(self.model, self.setting.dims), rewrite, provider=self.setting.provider,
                                 threads=self.setting.threads or default_threads())
        # A rank ratio given (and no conv parameter share) means the same for convs as for MatMul layers.
        rank_ratio = self.rank.rank_ratio if self.conv.ratio is None else None
        config = FactorizeConvConfig(decomposition=self.conv.decomposition, param_ratio=self.conv.ratio or DEFAULT_CONV_RATIO,
                                     rank_ratio=rank_ratio, ranks=ranks, rank_multiple=self.conv.rank_multiple,
                                     max_layer_error=self.conv.max_error, force=self.rank.force)
        return [FactorizeConv(config, stats, guard)]  # it also reports the convs it cannot factorize, and why

    def _table_passes(self, ranks: dict[str, int], stats) -> list:
        if not self.rank.embeddings:
            return []
        counts = {t.indices.name: stats[t.indices.name] for t in self.tables if t.indices.name in stats}
        return [FactorizeEmbedding(FactorizeEmbeddingConfig(rank_ratio=self.rank.ratio, energy=self.rank.energy,
                                                            ranks=ranks, force=self.rank.force), counts)]
