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
patches are given (:class:`onnxlr.statistics.Patches`), else the relative weight error. With
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

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import conv_factors as cf
from onnxlr.errors import OnnxlrError
from onnxlr.graph import make_constant, unique_name
from onnxlr.matching import ConvLayer, find_convs
from onnxlr.pipeline import LayerChange, Pass
from onnxlr.statistics import Patches, TensorStats

DECOMPOSITIONS = ("channel", "spatial", "tucker2")


@dataclass
class FactorizeConvConfig:
    """decomposition : ``auto`` (per layer, the candidate with the lowest error) or one of DECOMPOSITIONS.
    param_ratio : share of each conv's parameters the replacement may keep.
    rank_ratio : instead, keep this share of each decomposition's full rank (channel min(Cin·K, Cout),
        spatial min(Cin·kh, Cout·kw), Tucker-2 (Cin, Cout)): the rank rule of MatMul layers; 1 is exact.
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
    rank_ratio: float | None = None
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


# ------------------------------------------------------------------------------------------ pass


@dataclass
class _Choice:
    """A conv and the decomposition chosen for it (``best``; None with the ``reason`` it stays dense)."""

    layer: ConvLayer
    best: cf.Candidate | None
    details: dict
    reason: str = ""
    delta: np.ndarray | None = None

    @property
    def node(self) -> gs.Node:
        return self.layer.node


class FactorizeConv(Pass):
    """Factorize the Conv layers of a graph (see module docstring).

    stats : im2col patch statistics keyed by conv node name (:class:`onnxlr.statistics.Patches`).
    accept : optional latency guard ``(layer, candidate) -> (accepted, verdict)``: candidates are tried
        from the lowest error up and the first accepted one is used; a layer none passes is left dense
        with every verdict in the report.
    """

    name = "factorize_conv"
    config_class = FactorizeConvConfig

    def __init__(self, config: FactorizeConvConfig | None = None, stats: Mapping[str, TensorStats] | None = None,
                 accept: Callable[[ConvLayer, cf.Candidate], tuple[bool, str]] | None = None):
        super().__init__(config, stats)
        self.accept = accept

    def needs(self, graph: gs.Graph) -> list:
        return [patches_of(layer) for layer in find_convs(graph, nested=True)[0]]

    def match(self, graph: gs.Graph):
        layers, skipped = find_convs(graph, nested=True)
        yield from skipped
        known = {layer.node.name for layer in layers} | {layer.weight.name for layer in layers}
        unknown = sorted(set(self.config.ranks) - known)
        if unknown:
            raise OnnxlrError(f"no factorizable Conv layer or weight named {unknown[0]!r}")
        for layer in layers:
            yield self._choose(layer)

    def check(self, graph: gs.Graph, choice: _Choice) -> str:
        return choice.reason

    def skip(self, choice: _Choice, reason: str) -> LayerChange:
        return LayerChange(choice.node.name, choice.node.op, "skipped", reason, choice.details)

    def rewrite(self, graph: gs.Graph, choice: _Choice) -> LayerChange:
        rewrite(graph, choice.layer, choice.best, choice.delta)
        return LayerChange(choice.node.name, choice.node.op, "rewritten", "", choice.details)

    def _choose(self, layer: ConvLayer) -> _Choice:
        """The most accurate candidate within the budget (and the error bound, and the latency guard)."""
        override = next((int(self.config.ranks[k]) for k in (layer.node.name, layer.weight.name)
                         if k in self.config.ranks), None)
        if override == 0:
            return _Choice(layer, None, {}, "kept dense by the rank allocation (rank 0)")
        params = layer.W.size
        st = self.stats.get(layer.node.name)
        gram = None if st is None else st.centered_gram
        kinds = DECOMPOSITIONS if self.config.decomposition == "auto" else (self.config.decomposition,)
        found = cf.candidates(layer.W.astype(np.float64), kinds, self.config.param_ratio * params, override,
                              self.config.rank_multiple, gram, self.config.rank_ratio)
        details = {"weight": layer.weight.name, "shape": list(layer.W.shape), "params": params,
                   "data_aware": gram is not None,
                   "candidates": {c.decomposition: {"ranks": list(c.ranks), "params": c.params,
                                                    "error": round(c.error, 6)} for c in found}}
        useful = sorted((c for c in found if c.params < params or self.config.force), key=lambda c: c.error)
        bound = self.config.max_layer_error
        if not useful:
            return _Choice(layer, None, details, "no decomposition within the budget saves parameters")
        if bound is not None and useful[0].error > bound:
            return _Choice(layer, None, details, f"every decomposition within the budget errs above {bound:g} "
                                                 "on this layer")
        useful = [c for c in useful if bound is None or c.error <= bound]
        best = useful[0]
        if self.accept is not None:  # the most accurate candidate that is also faster
            verdicts = {}
            best = next((c for c in useful if _accepted(self.accept(layer, c), verdicts, c)), None)
            details["latency"] = verdicts
            if best is None:
                return _Choice(layer, None, details, "; ".join(f"{kind} {verdict}" for kind, verdict in verdicts.items()))
        details.update(decomposition=best.decomposition, ranks=list(best.ranks), params_after=best.params,
                       calib_error=best.error if gram is not None else None,
                       weight_error=cf.conv_error(layer.W, cf.compose(best), None))
        delta = None
        if st is not None:  # fold the mean output error into the bias (as for MatMul)
            M = cf.channel_matrix(layer.W).astype(np.float64)
            delta = st.mean @ (M - cf.channel_matrix(cf.compose(best)))
        return _Choice(layer, best, details, delta=delta)


def _accepted(verdict: tuple[bool, str], verdicts: dict, candidate: cf.Candidate) -> bool:
    ok, verdicts[candidate.decomposition] = verdict
    return ok


def patches_of(layer: ConvLayer) -> Patches:
    """The statistics request of the patches ``layer`` multiplies."""
    geo = layer.geometry()
    auto_pad = geo["auto_pad"].decode() if isinstance(geo["auto_pad"], bytes) else geo["auto_pad"]
    return Patches(layer.node.name, layer.node.inputs[0].name, layer.kernel, tuple(geo["strides"]),
                   tuple(geo["pads"]), tuple(geo["dilations"]), auto_pad)


def rewrite(graph: gs.Graph, layer: ConvLayer, cand: cf.Candidate, delta: np.ndarray | None = None) -> None:
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
    owner = layer.graph or graph  # the (sub)graph holding the conv
    for i, (weights, attrs) in enumerate(zip(cand.weights[:-1], stages[:-1])):
        w = make_constant(graph, f"{layer.weight.name}/lr_{cand.decomposition}_{i}", weights.astype(dtype))
        out = gs.Variable(unique_name(graph, f"{label}/lr_hidden_{i}"), dtype=dtype)
        owner.nodes.append(gs.Node("Conv", name=unique_name(graph, f"{label}/lr_{i}"), attrs=attrs,
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
