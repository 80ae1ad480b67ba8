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
from onnxlr.graph import make_constant, unique_name
from onnxlr.matching import Table, find_tables
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import TokenCounts


@dataclass
class FactorizeEmbeddingConfig:
    """Rank rule for embedding tables (as for MatMul: ratio, energy, or per-table ranks)."""

    rank_ratio: float | None = None
    energy: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    force: bool = False


class FactorizeEmbedding(Pass):
    """Low-rank factorization of embedding tables, weighted by token frequency when counts are given.

    counts : per indices-tensor name, how often each row was looked up in calibration data (V,)
        (:class:`onnxlr.statistics.TokenCounts`).
    """

    name = "factorize_embedding"
    config_class = FactorizeEmbeddingConfig

    def __init__(self, config: FactorizeEmbeddingConfig | None = None,
                 counts: Mapping[str, np.ndarray] | None = None):
        super().__init__(config, counts)

    def needs(self, graph: gs.Graph) -> list:
        return [TokenCounts(t.indices.name, np.asarray(t.table.values).shape[0]) for t in find_tables(graph)[0]]

    def match(self, graph: gs.Graph):
        tables, skipped = find_tables(graph)
        yield from skipped
        yield from tables

    def rewrite(self, graph: gs.Graph, t: Table) -> LayerChange:
        T = np.asarray(t.table.values)
        V, d = T.shape
        counts = self.stats.get(t.indices.name)
        weights = np.sqrt(counts.astype(np.float64) + 1.0) if counts is not None else None
        scaled = T if weights is None else T * weights[:, None]
        s = linalg.svd(scaled)[1]
        rank = self._rank(t, V, d, s)
        details = {"weight": t.table.name, "shape": [V, d], "params": V * d,
                   "break_even_rank": round(linalg.break_even_rank(V, d), 1),
                   "method": "frequency-weighted svd" if weights is not None else "svd"}
        if rank is None:
            return LayerChange(t.node.name, t.node.op, "skipped", "no rank rule for this table", details)
        details.update(rank=rank, energy_kept=float(linalg.energy_kept(s)[rank - 1]))
        if not linalg.saves_parameters(V, d, rank) and not self.config.force:
            return LayerChange(t.node.name, t.node.op, "skipped",
                               f"rank {rank} >= break-even rank {V * d / (V + d):.1f}: would not save parameters",
                               details)
        A, B = linalg.fisher_svd(T, rank, row_weights=weights)
        M = T - A @ B
        details.update(params_after=rank * (V + d), weight_error=float(np.linalg.norm(M) / max(np.linalg.norm(T), 1e-300)))
        if weights is not None:
            details["calib_error"] = float(np.linalg.norm(M * weights[:, None]) / np.linalg.norm(scaled))
        self._rewrite(graph, t, A.astype(T.dtype), B.astype(T.dtype))
        return LayerChange(t.node.name, t.node.op, "rewritten", "", details)

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
