"""``onnxlr inspect``: per factorizable layer, what factorizing it could save and what it would cost."""

from __future__ import annotations

from typing import Any, Mapping

from onnxlr import conv_factors, io, linalg
from onnxlr.graph import import_graph
from onnxlr.macs import count_macs, node_key
from onnxlr.matching import find_convs, find_layers
from onnxlr.passes.flush_denormals import subnormal_mask
from onnxlr.passes.fold_constants import FoldConstants
from onnxlr.passes.name_nodes import NameNodes
from onnxlr.pipeline import PassManager

RANK_FRACTIONS = (0.1, 0.25, 0.5)
ENERGIES = (0.9, 0.99)


def inspect(model, *, dims: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Per MatMul/Gemm and Conv layer: weight shape, params, MACs, whether factorizable, break-even
    rank, the spectrum energy kept at a few ranks and the ranks reaching 90% / 99% of it (for a conv,
    of its channel unfolding), and how many of its weights are subnormal floats (slow on CPUs; every
    ``optimize`` recipe sets them to 0).

    MACs are per output row / pixel (``macs_per_row``) and, when shape inference can tell the layer's
    output shape (symbolic input dimensions set through ``dims``, a leading batch dimension taken as
    1), for one full run (``macs``).
    """
    proto, _ = io.open_model(model)
    # named and folded as optimizer.prepare does, but not flushed: the subnormal weights are reported
    proto = PassManager([NameNodes(), FoldConstants()]).run(proto)[0]
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
        ranks = {max(1, round(f * s.size)) for f in RANK_FRACTIONS}
        out.append({
            "node": node.name, "op": node.op, "weight": weight.name,
            "shape": shape, "params": k * n, "macs_per_row": k * n,
            "macs": macs.get(node_key(node)),
            "factorizable": True, "reason": "",
            "break_even_rank": round(linalg.break_even_rank(k, n), 1),
            "energy_at_rank": {int(r): round(float(kept[r - 1]), 4) for r in sorted(ranks)},
            "rank_for_energy": {e: linalg.rank_for_energy(s, e) for e in ENERGIES},
            "subnormal_weights": int(subnormal_mask(M).sum()),
        })
    for change in [*skipped, *conv_skipped]:
        out.append({"node": change.node, "op": change.op, "factorizable": False, "reason": change.reason})
    return out
