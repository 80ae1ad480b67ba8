"""QuantizeTableBlocks: embedding tables stored as 2-, 4- or 8-bit blocks read by ``GatherBlockQuantized``.

Rewrite: ``Y = Gather(T, ids)`` on a constant float table ``T`` (V, d) (axis 0, read by no other node)
becomes ONNX Runtime's contrib op ``com.microsoft.GatherBlockQuantized(data, ids, scales, zero_points)``
with blocks of ``block_size`` values along the hidden axis d (``quantize_axis=1``), asymmetric, one
scale and zero point per block (math and layout: :mod:`onnxlr.blockwise`). The op returns rows in the
scales' dtype: with float16 scales (half the bytes) a ``Cast`` back to the table's float32 follows.
ONNX Runtime's output equals :func:`onnxlr.blockwise.dequantize_table` of the gathered rows bit for bit
(tests/test_table_blocks.py).

Bytes per value: ``bits / 8`` plus a scale and half a zero point per block — for a 30,522 x 384 table
at 4 bits and blocks of 64, 6.24 MB instead of 46.9 MB (float32) or 11.8 MB (int8 per row).

Statistics: with token counts (:class:`onnxlr.statistics.TokenCounts`) the record gets the calibrated
error, the frequency-weighted relative error of the rows ``sum_v c_v ||T_v - T̂_v||² / sum_v c_v ||T_v||²``
(its square root) — the output error of the Gather on the calibration tokens.

Skipped, with the reason: rows that do not split into whole blocks, tables smaller than ``min_params``,
nodes excluded by ``only``/``exclude``; tied tables (also read by another node) are not matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import blockwise
from onnxlr.errors import OnnxlrError
from onnxlr.graph import CONTRIB_DOMAIN, import_contrib_domain, make_constant, unique_name
from onnxlr.matching import Table, find_tables, selected
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import TokenCounts

SCALE_TYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class QuantizeTableBlocksConfig:
    """bits : 2, 4 or 8 bits per value.
    block_size : values per scale along the hidden axis, a power of two >= 16 dividing the row length.
    scale_type : ``float16`` (half the scale bytes; the rows come out float16 and are cast back) or
        ``float32``. A table whose scales do not fit float16's range falls back to float32 (recorded).
    only, exclude : Gather node (or table) names to restrict to / to leave alone.
    min_params : leave tables with fewer values alone.
    """

    bits: int = 4
    block_size: int = 64
    scale_type: str = "float16"
    only: Collection[str] | None = None
    exclude: Collection[str] = ()
    min_params: int = 1024

    def __post_init__(self):
        if self.bits not in blockwise.TABLE_BITS:
            raise OnnxlrError(f"table bits must be one of {blockwise.TABLE_BITS}, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise OnnxlrError(f"block size must be a power of two of at least 16, got {self.block_size}")
        if self.scale_type not in SCALE_TYPES:
            raise OnnxlrError(f"scale type must be one of {', '.join(SCALE_TYPES)}, got {self.scale_type!r}")


def scales_fit_float16(T: np.ndarray, bits: int, block_size: int) -> bool:
    """Whether every block scale of ``T`` (V, d) is finite in float16 (the range is the only limit: a
    scale that rounds to a subnormal or 0 still dequantizes what its levels encode)."""
    V, d = T.shape
    blocks = np.asarray(T, np.float32).reshape(V, d // block_size, block_size)
    span = np.maximum(blocks.max(axis=2), 0) - np.minimum(blocks.min(axis=2), 0)
    return bool(np.all(span / (2 ** bits - 1) <= np.finfo(np.float16).max))


class QuantizeTableBlocks(Pass):
    """Block-wise n-bit embedding tables through ``com.microsoft.GatherBlockQuantized``.

    counts : optional token counts per indices-tensor name (V,), for the calibrated error in the record.
    """

    name = "quantize_table_blocks"
    config_class = QuantizeTableBlocksConfig

    def __init__(self, config: QuantizeTableBlocksConfig | None = None, counts: Mapping[str, np.ndarray] | None = None):
        super().__init__(config, counts)

    def needs(self, graph: gs.Graph) -> list:
        return [TokenCounts(t.indices.name, np.asarray(t.table.values).shape[0]) for t in self._tables(graph)]

    def _tables(self, graph: gs.Graph) -> list[Table]:
        c = self.config
        return [t for t in find_tables(graph)[0] if selected((t.node.name, t.table.name), c.only, c.exclude)]

    def match(self, graph: gs.Graph):
        yield from (s for s in find_tables(graph)[1]
                    if selected((s.node,), self.config.only, self.config.exclude))
        yield from self._tables(graph)

    def check(self, graph: gs.Graph, t: Table) -> str:
        V, d = np.asarray(t.table.values).shape
        if V * d < self.config.min_params:
            return f"table has {V * d} values, fewer than the minimum {self.config.min_params}"
        if d % self.config.block_size:
            return f"rows of {d} values do not split into blocks of {self.config.block_size}"
        return ""

    def rewrite(self, graph: gs.Graph, t: Table) -> LayerChange:
        c = self.config
        T = np.asarray(t.table.values)
        V, d = T.shape
        scale_type = c.scale_type
        if scale_type == "float16" and not scales_fit_float16(T, c.bits, c.block_size):
            scale_type = "float32"
        levels, scales, zero_points = blockwise.quantize_table(T, c.bits, c.block_size, SCALE_TYPES[scale_type])
        data, packed_zero_points = blockwise.pack_table(levels, zero_points, c.bits)
        T_hat = blockwise.dequantize_table(levels, scales, zero_points)
        error = T.astype(np.float64) - T_hat
        details = {"weight": t.table.name, "shape": [V, d], "bits": c.bits, "block_size": c.block_size,
                   "scale_type": scale_type, "bytes": int(T.nbytes),
                   "bytes_after": int(data.nbytes + scales.nbytes + packed_zero_points.nbytes),
                   "weight_error": float(np.linalg.norm(error) / max(np.linalg.norm(T), 1e-300))}
        counts = self.stats.get(t.indices.name)
        if counts is not None and np.sum(counts) > 0:
            w = np.asarray(counts, np.float64)[:V]
            energy = float(w @ np.sum(T.astype(np.float64) ** 2, axis=1))
            details["calib_error"] = float(np.sqrt(w @ np.sum(error ** 2, axis=1) / energy)) if energy > 0 else 0.0
        self._rewrite(graph, t, data, scales, packed_zero_points, T.dtype)
        return LayerChange(t.node.name, t.node.op, "rewritten", "", details)

    def _rewrite(self, graph: gs.Graph, t: Table, data, scales, zero_points, dtype) -> None:
        """The Gather node itself becomes GatherBlockQuantized (name kept); a Cast restores the dtype."""
        node, base, c = t.node, t.table.name, self.config
        out = node.outputs[0]
        node.op, node.domain = "GatherBlockQuantized", CONTRIB_DOMAIN
        node.attrs = {"bits": c.bits, "block_size": c.block_size, "gather_axis": 0, "quantize_axis": 1}
        inputs = [make_constant(graph, f"{base}/Q{c.bits}", data), node.inputs[1],
                  make_constant(graph, f"{base}/scales", scales), make_constant(graph, f"{base}/zero_points", zero_points)]
        node.inputs.clear()
        node.inputs.extend(inputs)
        if scales.dtype != dtype:
            rows = gs.Variable(unique_name(graph, f"{node.name or base}/rows_{scales.dtype}"), dtype=scales.dtype)
            node.outputs[0] = rows
            graph.nodes.append(gs.Node("Cast", name=unique_name(graph, f"{node.name or base}/Cast"),
                                       attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))},
                                       inputs=[rows], outputs=[out]))
        import_contrib_domain(graph)
