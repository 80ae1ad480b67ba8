"""FactorizeEmbedding: a Gather on a constant [vocab x d] table becomes Gather on a thin table, then MatMul.

Math
----
``Y = Gather(T, ids)`` picks rows of the table ``T`` of shape ``(V, d)``. With ``T ≈ A @ B``, ``A`` of
shape ``(V, r)`` and ``B`` of shape ``(r, d)``, ``Y ≈ Gather(A, ids) @ B``: the table shrinks from
``V*d`` to ``r*(V+d)`` parameters, worth it when ``r < V*d/(V+d)``.

Rows are not equally important: a token that is never looked up costs nothing when reconstructed
badly. With token counts ``c_v`` from calibration data, the factors minimise the frequency-weighted
error ``sum_v (c_v + 1) ||T_v - A_v B||^2`` (a row-weighted SVD, ``linalg.fisher_svd``); the +1
(Laplace smoothing) keeps tokens unseen in a small calibration set from being discarded outright.
Without counts it is the plain truncated SVD.

Pattern: ``Gather(T, ids)`` with ``axis=0`` and ``T`` a 2-D float constant read by no other node.
Rewrite: ``Gather(A, ids) -> <name>/lr_hidden``, then ``MatMul(hidden, B)`` writes the original output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import linalg
from onnxlr.errors import OnnxlrError
from onnxlr.graph import consumer_counts, make_constant, unique_name
from onnxlr.pipeline import LayerChange, PassRecord, config_dict


@dataclass
class FactorizeEmbeddingConfig:
    """Rank rule for embedding tables (as for MatMul: ratio, energy, or per-table ranks)."""

    rank_ratio: float | None = None
    energy: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    force: bool = False


@dataclass
class Table:
    node: gs.Node
    table: gs.Constant

    @property
    def indices(self) -> gs.Tensor:
        return self.node.inputs[1]


def find_tables(graph: gs.Graph) -> tuple[list[Table], list[LayerChange]]:
    """Gather nodes on constant 2-D float tables, and skips with reasons."""
    readers = consumer_counts(graph)
    tables, skipped = [], []
    for node in graph.nodes:
        if node.op != "Gather" or not isinstance(node.inputs[0], gs.Constant):
            continue
        values = np.asarray(node.inputs[0].values)
        reason = ""
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
            continue  # shape tables and index constants: not embeddings, not worth a line in the report
        if int(node.attrs.get("axis", 0)) != 0:
            reason = "gathers along axis 1 (columns), not rows"
        elif readers[node.inputs[0].name] > 1:
            reason = f"table {node.inputs[0].name!r} is also read by another node (tied weights)"
        if reason:
            skipped.append(LayerChange(node.name, node.op, "skipped", reason))
        else:
            tables.append(Table(node, node.inputs[0]))
    return tables, skipped


class FactorizeEmbedding:
    """Low-rank factorization of embedding tables, weighted by token frequency when counts are given.

    counts : per indices-tensor name, how often each row was looked up in calibration data (V,).
    """

    name = "factorize_embedding"

    def __init__(self, config: FactorizeEmbeddingConfig | None = None,
                 counts: Mapping[str, np.ndarray] | None = None):
        self.config = config or FactorizeEmbeddingConfig()
        self.counts = counts or {}

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        tables, skipped = find_tables(graph)
        record.layers.extend(skipped)
        for t in tables:
            T = np.asarray(t.table.values)
            V, d = T.shape
            counts = self.counts.get(t.indices.name)
            weights = np.sqrt(counts.astype(np.float64) + 1.0) if counts is not None else None
            scaled = T if weights is None else T * weights[:, None]
            s = linalg.svd(scaled)[1]
            rank = self._rank(t, V, d, s)
            details = {"weight": t.table.name, "shape": [V, d], "params": V * d,
                       "break_even_rank": round(linalg.break_even_rank(V, d), 1),
                       "method": "frequency-weighted svd" if weights is not None else "svd"}
            if rank is None:
                record.layers.append(LayerChange(t.node.name, t.node.op, "skipped", "no rank rule for this table", details))
                continue
            details.update(rank=rank, energy_kept=float(linalg.energy_kept(s)[rank - 1]))
            if not linalg.saves_parameters(V, d, rank) and not self.config.force:
                record.layers.append(LayerChange(t.node.name, t.node.op, "skipped",
                                                 f"rank {rank} >= break-even rank {V * d / (V + d):.1f}: "
                                                 "would not save parameters", details))
                continue
            A, B = linalg.fisher_svd(T, rank, row_weights=weights)
            M = T - A @ B
            details.update(params_after=rank * (V + d),
                           weight_error=float(np.linalg.norm(M) / max(np.linalg.norm(T), 1e-300)))
            if weights is not None:
                details["calib_error"] = float(np.linalg.norm(M * weights[:, None]) / np.linalg.norm(scaled))
            self._rewrite(graph, t, A.astype(T.dtype), B.astype(T.dtype))
            record.layers.append(LayerChange(t.node.name, t.node.op, "rewritten", "", details))
        return record

    def _rank(self, t: Table, V: int, d: int, s: np.ndarray) -> int | None:
        for key in (t.node.name, t.table.name):
            if key in self.config.ranks:
                rank = int(self.config.ranks[key])
                if rank > min(V, d):
                    raise OnnxlrError(f"rank {rank} for table {key!r} exceeds min(V, d) = {min(V, d)}")
                return rank
        return linalg.rank_from_rule(V, d, s, rank_ratio=self.config.rank_ratio, energy=self.config.energy)

    @staticmethod
    def _rewrite(graph: gs.Graph, t: Table, A: np.ndarray, B: np.ndarray) -> None:
        node, base = t.node, t.table.name
        label = node.name or base
        A_c = make_constant(graph, f"{base}/lr_A", A)
        B_c = make_constant(graph, f"{base}/lr_B", B)
        hidden = gs.Variable(unique_name(graph, f"{label}/lr_hidden"), dtype=A.dtype)
        out = node.outputs[0]
        node.inputs[0] = A_c
        node.outputs[0] = hidden
        graph.nodes.append(gs.Node("MatMul", name=unique_name(graph, f"{label}/lr_B"),
                                   inputs=[hidden, B_c], outputs=[out]))
