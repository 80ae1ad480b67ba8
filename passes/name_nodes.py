"""NameNodes: give every node a name of its own.

Node names are optional in ONNX and may repeat, but reports, per-layer options (``--rank NAME``) and
ONNX Runtime (which refuses a model with two nodes of one name) need them unique. An unnamed node is
named after its first output; a repeated name gets a suffix (``layer``, ``layer_1``…). Subgraph nodes
are named too: their names share the model's namespace. Renamed nodes are recorded; the others keep
their names.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxlr.graph import subgraph_nodes
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict


@dataclass
class NameNodesConfig:
    """No settings: every node of the model is named uniquely."""


class NameNodes(Pass):
    name = "name_nodes"
    config_class = NameNodesConfig

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        nodes = [*graph.nodes, *(inner for inner, _ in subgraph_nodes(graph))]
        taken = {node.name for node in nodes if node.name}
        seen: set[str] = set()
        for node in nodes:
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            base = node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op)
            name, i = base, 0
            while name in taken or name in seen:
                i += 1
                name = f"{base}_{i}"
            reason = "unnamed: named after its output" if not node.name else f"name {node.name!r} repeated"
            record.layers.append(LayerChange(name, node.op, "rewritten", reason, {"was": node.name}))
            node.name = name
            taken.add(name)
            seen.add(name)
        return record


def repeated_names(model) -> bool:
    """Whether two nodes of ``model`` (a ModelProto; subgraphs included) share a name — ONNX Runtime
    refuses to load such a model."""
    seen: set[str] = set()

    def walk(graph) -> bool:
        for node in graph.node:
            if node.name:
                if node.name in seen:
                    return True
                seen.add(node.name)
            for attr in node.attribute:
                if any(walk(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)):
                    return True
        return False

    return walk(model.graph)
