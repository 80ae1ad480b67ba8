"""The pass manager: an ordered list of graph rewrites applied to one model.

A pass is a small object with a ``name``, a ``config`` dataclass and ``run(graph) -> PassRecord``.
It edits the onnx-graphsurgeon graph in place and returns what it changed and what it skipped, each
skip with the reason, so the report can tell the user why a layer was left alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

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


class Pass(Protocol):
    name: str
    config: Any

    def run(self, graph: gs.Graph) -> PassRecord: ...


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
