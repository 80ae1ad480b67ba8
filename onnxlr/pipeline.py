"""Passes and the pass manager: an ordered list of graph rewrites applied to one model.

A pass (:class:`Pass`) is a small object with a ``name``, a ``config`` dataclass and
``run(graph) -> PassRecord``. It edits the onnx-graphsurgeon graph in place and returns what it changed
and what it skipped, each skip with the reason, so the report can tell the user why a layer was left
alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from onnxlr.graph import export_model, import_graph


@dataclass
class LayerChange:
    """What a pass did (or declined to do) to one node."""

    node: str
    op: str
    action: str  # "rewritten" or "skipped"
    reason: str = ""  # why skipped; empty when rewritten
    details: dict[str, Any] = field(default_factory=dict)  # pass-specific figures (shape, rank, error…)


@dataclass
class PassRecord:
    """The outcome of one pass over the model."""

    name: str
    config: dict[str, Any]
    layers: list[LayerChange] = field(default_factory=list)

    @property
    def rewritten(self) -> list[LayerChange]:
        return [c for c in self.layers if c.action == "rewritten"]

    @property
    def skipped(self) -> list[LayerChange]:
        return [c for c in self.layers if c.action == "skipped"]


class Pass:
    """A graph rewrite, run as a rule: :meth:`match` lists what it could rewrite (and what it sees but
    cannot, as skipped ``LayerChange``s), :meth:`check` says why a candidate is left alone ("" to go
    ahead), :meth:`rewrite` edits the graph in place and returns the candidate's record.

    A pass never runs ONNX Runtime: what it needs of the calibration data arrives as statistics in
    ``stats`` (keyed as its :meth:`needs` asked). Passes with statistics name what they need with
    ``needs(graph)``; the planner collects it (:mod:`onnxlr.runtimes.calibration`) and hands it over.
    """

    name = ""
    config_class: type | None = None

    def __init__(self, config: Any = None, stats: Mapping[str, Any] | None = None):
        self.config = config if config is not None else (self.config_class() if self.config_class else None)
        self.stats = dict(stats or {})

    def min_opset(self) -> int:
        """The default-domain opset the ops this pass writes need (a model below it is converted first)."""
        return 1

    def needs(self, graph: gs.Graph) -> list:
        """The statistics (:mod:`onnxlr.statistics` requests) the pass uses on ``graph``; none by default."""
        return []

    def match(self, graph: gs.Graph) -> Iterable[Any]:
        raise NotImplementedError

    def check(self, graph: gs.Graph, candidate: Any) -> str:
        """Why ``candidate`` is left alone, or "" to rewrite it."""
        return ""

    def rewrite(self, graph: gs.Graph, candidate: Any) -> LayerChange:
        raise NotImplementedError

    def skip(self, candidate: Any, reason: str) -> LayerChange:
        """The record of a candidate ``check`` turned down."""
        node = candidate.node
        return LayerChange(node.name, node.op, "skipped", reason)

    def run(self, graph: gs.Graph) -> PassRecord:
        """Match, check and rewrite each candidate in turn (a rewrite may change what the next match sees)."""
        record = PassRecord(self.name, config_dict(self.config))
        for found in self.match(graph):
            if isinstance(found, LayerChange):
                record.layers.append(found)
                continue
            reason = self.check(graph, found)
            record.layers.append(self.skip(found, reason) if reason else self.rewrite(graph, found))
        return record


def config_dict(config: Any) -> dict[str, Any]:
    """A pass config as a JSON-friendly dict."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})


class PassManager:
    """Runs passes in order on a model and collects their records.

    Example
    -------
    >>> manager = PassManager([FactorizeMatMul(FactorizeMatMulConfig(rank_ratio=0.5))])
    >>> optimized, records = manager.run(model)
    """

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """Apply every pass; ``model`` itself is not modified."""
        graph = import_graph(model)
        records = []
        for p in self.passes:
            records.append(p.run(graph))
            graph.cleanup().toposort()
        return export_model(graph, template=model), records
