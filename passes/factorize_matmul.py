"""FactorizeMatMul: replace a MatMul or Gemm by two thinner ones through a truncated SVD.

Math
----
A layer ``Y = X @ W`` with a constant weight ``W`` of shape ``(k, n)`` is rewritten as
``Y = (X @ A) @ B`` with ``A = U_r sqrt(S_r)`` of shape ``(k, r)`` and ``B = sqrt(S_r) V_r^T`` of shape
``(r, n)``, the best rank-r approximation of ``W`` (Eckart–Young). Parameters and multiply-adds per row
go from ``k*n`` to ``r*(k+n)``, so a rank at or above ``k*n/(k+n)`` saves nothing and is skipped unless
forced.

For ``Gemm(A_in, B, C; alpha, beta, transA, transB) = alpha * op(A_in) @ op(B) + beta * C`` the weight is
``W = op(B)`` (``B^T`` when ``transB=1``) and the rewrite is::

    H = Gemm(A_in, A; alpha, transA)          # alpha * op(A_in) @ A
    Y = Gemm(H, B, C; beta)                   # H @ B + beta * C

which equals the original exactly at full rank.

Pattern: ``MatMul(X, W)`` with ``W`` a 2-D float constant; ``Gemm`` with a 2-D float constant ``B``.
Check (reasons when not): the weight is not constant, is the first operand, is not 2-D or not float,
is also read by an op this pass does not rewrite, or the chosen rank would not save parameters.
Rewrite: the original node becomes the second factor (it keeps its name and output); a new node
``<node>/lr_A`` computes the first. Factors are named ``<weight>/lr_A`` and ``<weight>/lr_B``; a weight
shared by several nodes is factorized once and its factors are shared too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxlr import linalg
from onnxlr.errors import OnnxlrError
from onnxlr.graph import unique_name
from onnxlr.pipeline import LayerChange, PassRecord, config_dict

FACTORIZABLE_OPS = ("MatMul", "Gemm")


@dataclass
class FactorizeMatMulConfig:
    """How ranks are chosen; exactly one rule applies to each layer.

    rank_ratio : keep ``ceil(rank_ratio * min(k, n))`` singular values of a ``(k, n)`` weight.
    energy : keep the smallest rank whose share of the squared spectrum is at least ``energy``.
    ranks : per-layer ranks keyed by node name or weight name; they take precedence.
    force : rewrite even when the rank would not save parameters (used to test exactness).
    """

    rank_ratio: float | None = None
    energy: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    force: bool = False

    def __post_init__(self):
        if self.rank_ratio is not None and self.energy is not None:
            raise OnnxlrError("give either a rank ratio or an energy share, not both")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise OnnxlrError(f"rank ratio must be in (0, 1], got {self.rank_ratio}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OnnxlrError(f"energy must be in (0, 1], got {self.energy}")
        for name, rank in self.ranks.items():
            if int(rank) != rank or rank < 1:
                raise OnnxlrError(f"rank for layer {name!r} must be a positive integer, got {rank}")


@dataclass
class Layer:
    """A MatMul/Gemm node whose weight can be factorized; ``W`` is the logical (k, n) weight."""

    node: gs.Node
    weight: gs.Constant
    W: np.ndarray

    @property
    def transposed(self) -> bool:
        return self.node.op == "Gemm" and bool(self.node.attrs.get("transB", 0))


def match_layer(node: gs.Node) -> Layer | str:
    """The factorizable layer behind ``node``, or the reason it is not factorizable."""
    if not isinstance(node.inputs[1], gs.Constant):
        if isinstance(node.inputs[0], gs.Constant):
            return "the constant weight is the first operand (W @ X); only X @ W is factorized"
        return "weight is not a constant (a graph input or computed tensor)"
    weight = node.inputs[1]
    values = np.asarray(weight.values)
    if values.ndim != 2:
        return f"weight is {values.ndim}-D with shape {list(values.shape)}; only 2-D weights are factorized"
    if not np.issubdtype(values.dtype, np.floating):
        return f"weight dtype {values.dtype} is not floating point"
    layer = Layer(node=node, weight=weight, W=values)
    if layer.transposed:
        layer.W = values.T
    return layer


def find_layers(graph: gs.Graph) -> tuple[list[Layer], list[LayerChange]]:
    """All MatMul/Gemm nodes, split into factorizable layers and skips with reasons."""
    readers: dict[str, list[gs.Node]] = defaultdict(list)
    for node in graph.nodes:
        for tensor in node.inputs:
            readers[tensor.name].append(node)
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op not in FACTORIZABLE_OPS or node.domain not in ("", "ai.onnx", None):
            continue
        found = match_layer(node)
        if isinstance(found, Layer):
            others = [r for r in readers[found.weight.name] if not _reads_as_weight(r, found.weight)]
            if others:
                found = (
                    f"weight {found.weight.name!r} is also read by {others[0].op} node "
                    f"{others[0].name!r}; factorizing would keep the dense copy"
                )
        if isinstance(found, Layer):
            layers.append(found)
        else:
            skipped.append(LayerChange(node.name, node.op, "skipped", found))
    return layers, skipped


def _reads_as_weight(node: gs.Node, weight: gs.Constant) -> bool:
    return (
        node.op in FACTORIZABLE_OPS
        and len(node.inputs) > 1
        and node.inputs[1] is weight
        and node.inputs[0] is not weight
    )


class FactorizeMatMul:
    """Low-rank factorization of MatMul/Gemm layers with constant weights (truncated SVD)."""

    name = "factorize_matmul"

    def __init__(self, config: FactorizeMatMulConfig | None = None):
        self.config = config or FactorizeMatMulConfig()

    def choose_rank(self, layer: Layer, s: np.ndarray) -> int | None:
        """The rank for ``layer`` under the config, or None if no rule applies."""
        k, n = layer.W.shape
        for key in (layer.node.name, layer.weight.name):
            if key in self.config.ranks:
                return int(self.config.ranks[key])
        if self.config.energy is not None:
            return linalg.rank_for_energy(s, self.config.energy)
        if self.config.rank_ratio is not None:
            return linalg.rank_for_ratio(k, n, self.config.rank_ratio)
        return None

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        layers, skipped = find_layers(graph)
        record.layers.extend(skipped)
        known = {layer.node.name for layer in layers} | {layer.weight.name for layer in layers}
        unknown = sorted(set(self.config.ranks) - known)
        if unknown:
            raise OnnxlrError(f"no factorizable MatMul/Gemm layer or weight named {unknown[0]!r}")

        svds: dict[tuple[str, bool], tuple] = {}
        factors: dict[tuple[str, bool, int], tuple[gs.Constant, gs.Constant]] = {}
        # disable=None: a progress bar on a terminal only, silent in logs and tests
        for layer in tqdm(layers, desc="factorize", unit="layer", disable=None, leave=False):
            key = (layer.weight.name, layer.transposed)
            if key not in svds:
                svds[key] = linalg.svd(layer.W)
            U, s, Vt = svds[key]
            k, n = layer.W.shape
            rank = self.choose_rank(layer, s)
            details = {
                "weight": layer.weight.name,
                "shape": [k, n],
                "params": k * n,
                "break_even_rank": round(linalg.break_even_rank(k, n), 1),
            }
            if rank is None:
                record.layers.append(LayerChange(layer.node.name, layer.node.op, "skipped",
                                                 "no rank rule or override for this layer", details))
                continue
            if rank > s.size:
                raise OnnxlrError(
                    f"rank {rank} for layer {layer.node.name!r} exceeds min(k, n) = {s.size}"
                )
            details.update(rank=rank, energy_kept=float(linalg.energy_kept(s)[rank - 1]),
                           weight_error=linalg.relative_error_at_rank(s, rank))
            if not linalg.saves_parameters(k, n, rank) and not self.config.force:
                record.layers.append(LayerChange(
                    layer.node.name, layer.node.op, "skipped",
                    f"rank {rank} >= break-even rank {k * n / (k + n):.1f}: would not save parameters",
                    details))
                continue
            fkey = key + (rank,)
            if fkey not in factors:
                factors[fkey] = self._make_factors(graph, layer, U, s, Vt, rank)
            self._rewrite(graph, layer, *factors[fkey])
            details["params_after"] = rank * (k + n)
            record.layers.append(LayerChange(layer.node.name, layer.node.op, "rewritten", "", details))
        return record

    @staticmethod
    def _make_factors(graph, layer, U, s, Vt, rank):
        root = np.sqrt(s[:rank])
        dtype = layer.W.dtype
        A = np.ascontiguousarray((U[:, :rank] * root).astype(dtype))
        B = np.ascontiguousarray((root[:, None] * Vt[:rank]).astype(dtype))
        base = layer.weight.name
        return (gs.Constant(unique_name(graph, f"{base}/lr_A"), A),
                gs.Constant(unique_name(graph, f"{base}/lr_B"), B))

    @staticmethod
    def _rewrite(graph: gs.Graph, layer: Layer, A: gs.Constant, B: gs.Constant) -> None:
        node = layer.node
        label = node.name or layer.weight.name
        hidden = gs.Variable(unique_name(graph, f"{label}/lr_hidden"), dtype=layer.W.dtype)
        first = gs.Node(node.op, name=unique_name(graph, f"{label}/lr_A"),
                        inputs=[node.inputs[0], A], outputs=[hidden])
        if node.op == "Gemm":
            first.attrs = {"alpha": float(node.attrs.get("alpha", 1.0)),
                           "transA": int(node.attrs.get("transA", 0))}
            node.attrs = {"beta": float(node.attrs.get("beta", 1.0))}
        node.inputs[0] = hidden
        node.inputs[1] = B
        graph.nodes.append(first)
