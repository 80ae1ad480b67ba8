"""FactorizeConv: replace a Conv by a chain of thinner convs (channel SVD, spatial SVD or Tucker-2).

Math in :mod:`onnxlr.conv_factors` (unfoldings) and :mod:`onnxlr.linalg` (the matrix methods). This
module matches convs, picks a decomposition and rank per layer, and rewrites the graph:

- ``channel``: Conv(Cin→r, original kernel, strides, pads / auto_pad, dilations) → Conv 1×1 (r→Cout, bias);
- ``spatial`` (2-D): Conv(Cin→r, kh×1, vertical stride/pads/dilation) → Conv(r→Cout, 1×kw, horizontal ones, bias);
- ``tucker2``: Conv 1×1 (Cin→r1) → Conv(r1→r2, original kernel and geometry) → Conv 1×1 (r2→Cout, bias).

Each is exact at full rank, whatever the strides, pads, ``auto_pad`` and dilations: the geometry goes
to the conv that keeps the kernel (split per axis for ``spatial``), the 1×1 convs have none (a 1×1
conv without bias maps the zero padding to zeros, so it commutes with padding).

Budget: every conv keeps at most ``param_ratio`` of its parameters; each decomposition gets the
largest rank that fits (rounded down to a multiple of ``rank_multiple`` when that leaves at least one
multiple). ``decomposition="auto"`` then keeps the candidate with the lowest error: the calibrated
output error ``||X_patches (W - W')|| / ||X_patches W||`` when calibration statistics of the im2col
patches are given (``runtimes.stats.collect_patch_stats``), else the relative weight error. With
statistics every decomposition is data-aware: channel SVD whitens by the patch Gram (exact for its
objective), spatial SVD by the Gram of vertical patches, Tucker-2 by the input channel Gram — both
derived from the patch Gram.

Not rewritten (skipped with the reason): grouped and depthwise convs, non-constant, non-float or bfloat16
weights, 3-D and higher kernels, ConvTranspose, convs inside If/Loop/Scan subgraphs and weights also
read there; a candidate whose rank would not save parameters (unless
``force``); with the latency guard, a candidate that is not faster than the original conv when
measured in ONNX Runtime at the layer's real input shape (``runtimes.latency_guard``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import conv_factors as cf
from onnxlr import linalg
from onnxlr.errors import OnnxlrError
from onnxlr.graph import (in_subgraph_reason, make_constant, read_in_subgraph_reason, subgraph_nodes, subgraph_readers,
                          unique_name)
from onnxlr.pipeline import LayerChange, PassRecord, config_dict
from onnxlr.runtimes.stats import TensorStats

DECOMPOSITIONS = ("channel", "spatial", "tucker2")


@dataclass
class FactorizeConvConfig:
    """decomposition : ``auto`` (per layer, the candidate with the lowest error) or one of DECOMPOSITIONS.
    param_ratio : share of each conv's parameters the replacement may keep.
    ranks : per-layer rank (node or weight name) overriding the budget: the rank of channel/spatial
        SVD, or both ranks of Tucker-2 (capped at Cin and Cout).
    rank_multiple : round ranks down to a multiple of this (8 or 16 suit SIMD kernels) when that keeps at
        least 90% of the rank; 1 = no rounding.
    max_layer_error : leave a conv dense when every candidate's error (calibrated output error with
        statistics, relative weight error without) is above this bound; None = no bound.
    force : rewrite even when a rank would not save parameters (used to test exactness).
    """

    decomposition: str = "auto"
    param_ratio: float = 0.5
    ranks: dict[str, int] = field(default_factory=dict)
    rank_multiple: int = 8
    max_layer_error: float | None = None
    force: bool = False

    def __post_init__(self):
        if self.decomposition not in ("auto", *DECOMPOSITIONS):
            raise OnnxlrError(f"unknown conv decomposition {self.decomposition!r} "
                              f"(choose from auto, {', '.join(DECOMPOSITIONS)})")
        if not 0.0 < self.param_ratio <= 1.0:
            raise OnnxlrError(f"conv parameter ratio must be in (0, 1], got {self.param_ratio}")
        if self.rank_multiple < 1:
            raise OnnxlrError(f"rank multiple must be at least 1, got {self.rank_multiple}")


@dataclass
class ConvLayer:
    """A Conv node with a constant float weight (Cout, Cin, *kernel) and group 1."""

    node: gs.Node
    weight: gs.Constant
    W: np.ndarray

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.W.shape[2:])

    def geometry(self) -> dict:
        """strides, dilations, pads (explicit, ONNX order) and auto_pad of the conv."""
        d = len(self.kernel)
        attrs = self.node.attrs
        return {
            "strides": list(attrs.get("strides", [1] * d)),
            "dilations": list(attrs.get("dilations", [1] * d)),
            "pads": list(attrs.get("pads", [0] * (2 * d))),
            "auto_pad": attrs.get("auto_pad", "NOTSET"),
        }


def match_conv(node: gs.Node) -> ConvLayer | str:
    """The factorizable conv behind ``node``, or the reason it is not."""
    if node.op == "ConvTranspose":
        return "ConvTranspose is not factorized"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight is not a constant"
    W = np.asarray(node.inputs[1].values)
    if W.dtype.name == "bfloat16":
        return "weight dtype bfloat16 is not factorized (no NumPy bfloat16 to store the factors in)"
    if not np.issubdtype(W.dtype, np.floating):
        return f"weight dtype {W.dtype} is not floating point"
    if W.ndim not in (3, 4):
        return f"{W.ndim - 2}-D convolution; only 1-D and 2-D are factorized"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        if W.shape[1] == 1:
            return "depthwise conv: already as thin as it gets, never factorized"
        return f"grouped conv (group={group}) is not factorized"
    if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant) and node.inputs[2].name:
        return "bias is not a constant"
    return ConvLayer(node, node.inputs[1], W)


def find_convs(graph: gs.Graph) -> tuple[list[ConvLayer], list[LayerChange]]:
    """Conv/ConvTranspose nodes split into factorizable layers and skips with reasons. A weight read by
    anything but this one conv is skipped too (factorizing would keep the dense copy)."""
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            readers[t.name] = readers.get(t.name, 0) + 1
    inner = subgraph_readers(graph)
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx", None):
            continue
        found = match_conv(node)
        if isinstance(found, ConvLayer) and readers[found.weight.name] > 1:
            found = f"weight {found.weight.name!r} is shared with another node"
        elif isinstance(found, ConvLayer) and found.weight.name in inner:
            found = read_in_subgraph_reason(found.weight.name, inner[found.weight.name])
        if isinstance(found, ConvLayer):
            layers.append(found)
        else:
            skipped.append(LayerChange(node.name, node.op, "skipped", found))
    for node, owner in subgraph_nodes(graph):
        if node.op in ("Conv", "ConvTranspose"):
            skipped.append(LayerChange(node.name, node.op, "skipped", in_subgraph_reason(node, owner)))
    return layers, skipped


# ------------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One way to replace a conv: the new weights (in conv order), their ranks, params and error."""

    decomposition: str
    ranks: tuple[int, ...]
    weights: tuple[np.ndarray, ...]
    params: int
    error: float = math.nan


def _round(r: float, multiple: int, cap: int) -> int:
    """Rank ``r`` rounded down to a multiple of ``multiple`` — unless that gives up more than 10% of
    it (small layers: rank 15 would become 8), then ``r`` itself."""
    r = max(1, int(min(math.floor(r), cap)))
    aligned = r - r % multiple
    return aligned if aligned >= 0.9 * r else r


def candidates(W: np.ndarray, decompositions, budget: float | None, override: int | None, multiple: int,
               patch_gram: np.ndarray | None) -> list[Candidate]:
    """Every requested decomposition at the largest rank within ``budget`` parameters (or ``override``)."""
    cout, cin = W.shape[:2]
    K = cf.kernel_size(W)
    out = []
    for kind in decompositions:
        if kind == "spatial" and W.ndim != 4:
            continue
        if kind == "channel":
            r = override or _round(budget / (cin * K + cout), multiple, min(cin * K, cout))
            r = min(r, cin * K, cout)
            M = cf.channel_matrix(W)
            A, B = _factor(M, r, patch_gram)
            out.append(Candidate(kind, (r,), cf.channel_weights(A, B, W.shape[2:]), cf.channel_params(cin, cout, K, r)))
        elif kind == "spatial":
            kh, kw = W.shape[2:]
            r = override or _round(budget / (cin * kh + cout * kw), multiple, min(cin * kh, cout * kw))
            r = min(r, cin * kh, cout * kw)
            gram = None if patch_gram is None else cf.vertical_gram(patch_gram, cin, kh, kw)
            A, B = _factor(cf.spatial_matrix(W), r, gram)
            if patch_gram is not None:  # the vertical Gram is an approximation: refit B exactly
                B = cf.spatial_refit(W, A, patch_gram)
            out.append(Candidate(kind, (r,), cf.spatial_weights(A, B, cin, cout, kh, kw),
                                 cf.spatial_params(cin, cout, kh, kw, r)))
        else:
            if override:
                r_in, r_out = override, override
            else:
                # ranks in proportion to the channel counts: cin*a*cin + a*a*cin*cout*K + a*cout*cout = budget
                a_q, b_q = cin * cout * K, cin * cin + cout * cout
                a = (-b_q + math.sqrt(b_q * b_q + 4 * a_q * budget)) / (2 * a_q)
                r_in, r_out = _round(a * cin, multiple, cin), _round(a * cout, multiple, cout)
            # a mode's rank cannot exceed the other side's size (the unfolding's smaller dimension)
            r_in = min(r_in, cin, cout * K)
            r_out = min(r_out, cout, r_in * K)
            weights = cf.tucker2(W, r_in, r_out, patch_gram)
            out.append(Candidate(kind, (r_in, r_out), weights, cf.tucker2_params(cin, cout, K, r_in, r_out)))
    for c in out:
        c.error = _error(W, compose(c), patch_gram)
    return out


def _factor(M: np.ndarray, r: int, gram: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if gram is None:
        return linalg.truncated_svd(M, r)
    return linalg.whitened_svd(M, gram, r)


def compose(c: Candidate) -> np.ndarray:
    """The dense (Cout, Cin, *kernel) weight the candidate computes (for its error)."""
    if c.decomposition == "channel":
        first, second = c.weights  # (r, Cin, *k), (Cout, r, 1…)
        return np.tensordot(second.reshape(second.shape[:2]), first, axes=([1], [0]))
    if c.decomposition == "spatial":
        first, second = c.weights  # (r, Cin, kh, 1), (Cout, r, 1, kw)
        return np.einsum("rci,orj->ocij", first[..., 0], second[:, :, 0, :], optimize=True)
    first, core, last = c.weights  # (r_in, Cin, 1…), (r_out, r_in, *k), (Cout, r_out, 1…)
    inner = np.tensordot(core, first.reshape(first.shape[:2]), axes=([1], [0]))  # (r_out, *k, Cin)
    inner = np.moveaxis(inner, -1, 1)  # (r_out, Cin, *k)
    return np.tensordot(last.reshape(last.shape[:2]), inner, axes=([1], [0]))


def _error(W: np.ndarray, W_new: np.ndarray, patch_gram: np.ndarray | None) -> float:
    """Relative output error on the calibration patches, or relative weight error without them."""
    M, M_new = cf.channel_matrix(W).astype(np.float64), cf.channel_matrix(W_new).astype(np.float64)
    E = M - M_new
    if patch_gram is None:
        return float(np.linalg.norm(E) / max(np.linalg.norm(M), 1e-300))
    num = max(float(np.sum(E * (patch_gram @ E))), 0.0)
    den = float(np.sum(M * (patch_gram @ M)))
    return math.sqrt(num / den) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------ pass


class FactorizeConv:
    """Factorize the Conv layers of a graph (see module docstring).

    stats : im2col patch statistics keyed by conv node name (``runtimes.stats.collect_patch_stats``).
    accept : optional latency guard ``(layer, candidate) -> (accepted, verdict)``: candidates are tried
        from the lowest error up and the first accepted one is used; a layer none passes is left dense
        with every verdict in the report.
    """

    name = "factorize_conv"

    def __init__(self, config: FactorizeConvConfig | None = None, stats: Mapping[str, TensorStats] | None = None,
                 accept: Callable[[ConvLayer, Candidate], tuple[bool, str]] | None = None):
        self.config = config or FactorizeConvConfig()
        self.stats = stats or {}
        self.accept = accept

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        layers, skipped = find_convs(graph)
        record.layers.extend(skipped)
        known = {layer.node.name for layer in layers} | {layer.weight.name for layer in layers}
        unknown = sorted(set(self.config.ranks) - known)
        if unknown:
            raise OnnxlrError(f"no factorizable Conv layer or weight named {unknown[0]!r}")
        kinds = DECOMPOSITIONS if self.config.decomposition == "auto" else (self.config.decomposition,)
        for layer in layers:
            cout, cin = layer.W.shape[:2]
            params = layer.W.size
            st = self.stats.get(layer.node.name)
            gram = None if st is None else st.centered_gram
            override = next((int(self.config.ranks[k]) for k in (layer.node.name, layer.weight.name)
                             if k in self.config.ranks), None)
            if override == 0:
                record.layers.append(LayerChange(layer.node.name, layer.node.op, "skipped",
                                                 "kept dense by the rank allocation (rank 0)"))
                continue
            found = candidates(layer.W.astype(np.float64), kinds, self.config.param_ratio * params, override,
                               self.config.rank_multiple, gram)
            details = {"weight": layer.weight.name, "shape": list(layer.W.shape), "params": params,
                       "data_aware": gram is not None,
                       "candidates": {c.decomposition: {"ranks": list(c.ranks), "params": c.params,
                                                        "error": round(c.error, 6)} for c in found}}
            useful = [c for c in found if c.params < params or self.config.force]
            if not useful:
                record.layers.append(LayerChange(layer.node.name, layer.node.op, "skipped",
                                                 "no decomposition within the budget saves parameters", details))
                continue
            bound = self.config.max_layer_error
            if bound is not None and min(c.error for c in useful) > bound:
                record.layers.append(LayerChange(
                    layer.node.name, layer.node.op, "skipped",
                    f"every decomposition within the budget errs above {bound:g} on this layer", details))
                continue
            if bound is not None:
                useful = [c for c in useful if c.error <= bound]
            useful.sort(key=lambda c: c.error)
            best = useful[0]
            if self.accept is not None:  # the most accurate candidate that is also faster
                verdicts = {}
                for cand in useful:
                    ok, verdicts[cand.decomposition] = self.accept(layer, cand)
                    if ok:
                        best = cand
                        break
                else:
                    best = None
                details["latency"] = verdicts
                if best is None:
                    reason = "; ".join(f"{kind} {verdict}" for kind, verdict in verdicts.items())
                    record.layers.append(LayerChange(layer.node.name, layer.node.op, "skipped", reason, details))
                    continue
            details.update(decomposition=best.decomposition, ranks=list(best.ranks), params_after=best.params,
                           calib_error=best.error if gram is not None else None,
                           weight_error=_error(layer.W, compose(best), None))
            delta = None
            if st is not None:  # fold the mean output error into the bias (as for MatMul)
                M = cf.channel_matrix(layer.W).astype(np.float64)
                delta = st.mean @ (M - cf.channel_matrix(compose(best)))
            rewrite(graph, layer, best, delta)
            record.layers.append(LayerChange(layer.node.name, layer.node.op, "rewritten", "", details))
        return record


def rewrite(graph: gs.Graph, layer: ConvLayer, cand: Candidate, delta: np.ndarray | None = None) -> None:
    """Replace ``layer`` by the chain of convs of ``cand``; the last conv keeps the node, its name,
    output and bias (plus ``delta``)."""
    node = layer.node
    dtype = layer.W.dtype
    label = node.name or layer.weight.name
    geo = layer.geometry()
    d = len(layer.kernel)
    ones = [1] * d
    plain = {"kernel_shape": ones, "strides": ones, "dilations": ones, "pads": [0] * (2 * d)}

    def keep_geometry(kernel):
        attrs = {"kernel_shape": list(kernel), "strides": geo["strides"], "dilations": geo["dilations"]}
        if geo["auto_pad"] not in ("NOTSET", b"NOTSET"):
            attrs["auto_pad"] = geo["auto_pad"]
        else:
            attrs["pads"] = geo["pads"]
        return attrs

    if cand.decomposition == "channel":
        stages = [keep_geometry(layer.kernel), plain]
    elif cand.decomposition == "spatial":
        (sh, sw), (dh, dw) = geo["strides"], geo["dilations"]
        kh, kw = layer.kernel
        first = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
        second = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
        if geo["auto_pad"] not in ("NOTSET", b"NOTSET"):
            # SAME_* pads each axis from its own kernel and stride: per axis, the split keeps them.
            first["auto_pad"] = second["auto_pad"] = geo["auto_pad"]
        else:
            top, left, bottom, right = geo["pads"]
            first["pads"], second["pads"] = [top, 0, bottom, 0], [0, left, 0, right]
        stages = [first, second]
    else:
        stages = [plain, keep_geometry(layer.kernel), plain]

    current = node.inputs[0]
    for i, (weights, attrs) in enumerate(zip(cand.weights[:-1], stages[:-1])):
        w = make_constant(graph, f"{layer.weight.name}/lr_{cand.decomposition}_{i}", weights.astype(dtype))
        out = gs.Variable(unique_name(graph, f"{label}/lr_hidden_{i}"), dtype=dtype)
        graph.nodes.append(gs.Node("Conv", name=unique_name(graph, f"{label}/lr_{i}"), attrs=attrs,
                                   inputs=[current, w], outputs=[out]))
        current = out
    last = make_constant(graph, f"{layer.weight.name}/lr_{cand.decomposition}_{len(stages) - 1}",
                         cand.weights[-1].astype(dtype))
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if delta is not None:
        base = np.zeros(layer.W.shape[0], dtype) if bias is None else np.asarray(bias.values)
        bias = gs.Constant(unique_name(graph, f"{label}/lr_bias"), (base + delta).astype(dtype))
    node.attrs = dict(stages[-1])
    node.inputs.clear()
    node.inputs.extend([current, last] + ([bias] if bias is not None else []))
