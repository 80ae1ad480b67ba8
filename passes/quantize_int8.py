"""QuantizeInt8: int8 weights for MatMul/Gemm (and Conv, Gather tables), with integer kernels at run time.

Math in :mod:`onnxlr.quantization`; this module only rewrites the graph.

Rewrites, for a layer ``Y = X @ W`` with a constant (k, n) weight (low-rank factors included):

- ``activations="dynamic"`` (the fast path on CPUs)::

      Xs = Mul(X, 1/s)                                   # only with smoothing (SmoothQuant)
      Xq, x_scale, x_zero = DynamicQuantizeLinear(Xs)    # uint8, per tensor, at run time; shared by
                                                         # every layer reading X
      Y = Mul(Cast(MatMulInteger(Xq, Wq, x_zero, 0)), x_scale * w_scale)

  ONNX Runtime fuses that chain into one ``DynamicQuantizeMatMul`` (integer GEMM), as it does for its
  own ``quantize_dynamic``. ``Wq`` is int8 per output channel, rounded by GPTQ when statistics of X are
  given (the output error, not the weight error, is minimised).
- ``activations="none"``: weight-only ``DequantizeLinear(Wq, w_scale, axis=1) -> MatMul`` — a 4× smaller
  file, float compute (ORT folds the DequantizeLinear at load time, so no speed-up).

Conv weights get the weight-only form (per output channel, axis 0): on this class of CPU ORT's
integer convolution is not faster (docs/benchmarks.md). Embedding tables (``Gather`` of a constant
[V, d] table) are stored int8 per row; the gathered rows are scaled back by their gathered scales.

``compensation_rank`` adds EoRA's low-rank branch ``Y += (X @ A) @ B`` in float, fitted to the
quantization error in the activation eigenspace (needs statistics).

Statistics (``stats``: tensor name -> :class:`onnxlr.statistics.TensorStats` of each layer input,
see :meth:`QuantizeInt8.needs`) drive GPTQ, SmoothQuant and compensation; without them the pass rounds to
nearest, does not smooth and does not compensate, and says so in its record.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import linalg, quantization
from onnxlr.graph import CONTRIB_DOMAIN, add_low_rank_branch, import_contrib_domain, unique_name
from onnxlr.matching import Layer, find_layers
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict
from onnxlr.statistics import Rows, TensorStats

ACTIVATIONS = ("dynamic", "static", "none")
ROUNDINGS = ("nearest", "gptq")


@dataclass
class QuantizeInt8Config:
    """activations : ``dynamic`` (uint8 activations quantized at run time, integer MatMul) or ``none``
        (weight-only: smaller file, float compute).
    rounding : ``gptq`` (data-aware, needs statistics) or ``nearest``.
    smooth_alpha : SmoothQuant migration strength in [0, 1] for integer activations; ``auto`` picks it per
        input from a grid by the predicted calibrated error (weight rounding + activation rounding
        noise, :func:`onnxlr.quantization.choose_smoothing`); None: no smoothing.
    static_format : how ``static`` layers are written: ``qdq`` (QuantizeLinear/DequantizeLinear pairs,
        portable: ORT and the mobile providers fuse them into integer kernels) or ``ort`` (ONNX Runtime's
        ``MatMulIntegerToFloat`` contrib op with the bias folded in: fewer nodes, ORT only).
    compensation_rank : rank of the float low-rank correction of each layer's quantization error (0: none).
    min_params : leave weights smaller than this dense (their bytes do not matter, their error can).
    matmuls, convs, tables : quantize MatMul/Gemm layers; store Conv weights / Gather tables as int8
        (weight-only).
    only, exclude : node names to restrict to / to leave alone.
    """

    activations: str = "dynamic"
    rounding: str = "gptq"
    smooth_alpha: float | str | None = "auto"
    compensation_rank: int = 0
    static_format: str = "qdq"
    min_params: int = 1024
    matmuls: bool = True
    convs: bool = True
    tables: bool = True
    only: Collection[str] | None = None
    exclude: Collection[str] = field(default_factory=tuple)

    def __post_init__(self):
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.static_format not in ("qdq", "ort"):
            raise ValueError(f"static_format must be 'qdq' or 'ort', got {self.static_format!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.smooth_alpha not in (None, "auto") and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be 'auto' or in [0, 1], got {self.smooth_alpha}")
        if self.compensation_rank < 0:
            raise ValueError(f"compensation_rank must be >= 0, got {self.compensation_rank}")


def _selected(config: QuantizeInt8Config, node: gs.Node) -> bool:
    return (config.only is None or node.name in config.only) and node.name not in config.exclude


def quantizable_layers(graph: gs.Graph, config: QuantizeInt8Config) -> tuple[list[Layer], list[LayerChange]]:
    """MatMul/Gemm layers the pass rewrites, and the skips with reasons."""
    if not config.matmuls:
        return [], []
    layers, skipped = find_layers(graph)
    kept = []
    for layer in layers:
        node = layer.node
        if not _selected(config, node):
            continue
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0):
            skipped.append(LayerChange(node.name, node.op, "skipped", "Gemm with transA or alpha != 1"))
        elif layer.W.size < config.min_params:
            skipped.append(LayerChange(node.name, node.op, "skipped",
                                       f"{layer.W.size} weights < min_params {config.min_params}"))
        else:
            kept.append(layer)
    return kept, [s for s in skipped if config.only is None or s.node in config.only]


@dataclass
class _Group:
    """The layers reading one input X: they share its smoothing and its activation quantizer."""

    layers: list[Layer]


class QuantizeInt8(Pass):
    """int8 weights (and activations) of MatMul/Gemm layers, int8 Conv weights and embedding tables (see
    the module docstring). ``stats``: TensorStats of each layer input by tensor name."""

    name = "quantize_int8"
    config_class = QuantizeInt8Config

    def min_opset(self) -> int:
        """13 for per-channel DequantizeLinear (weight-only and QDQ forms, conv weights), 11 for
        DynamicQuantizeLinear, 10 for QuantizeLinear."""
        c = self.config
        if c.convs or (c.matmuls and (c.activations == "none" or (c.activations == "static" and c.static_format == "qdq"))):
            return 13
        return 11 if c.matmuls and c.activations == "dynamic" else 10

    def needs(self, graph: gs.Graph) -> list:
        inputs = {layer.input.name for layer in quantizable_layers(graph, self.config)[0]}
        return [Rows(name) for name in sorted(inputs)]

    def match(self, graph: gs.Graph):
        """Skips, then groups of layers reading one input, then Conv and table nodes, in graph order."""
        layers, skipped = quantizable_layers(graph, self.config)
        yield from skipped
        by_input: dict[str, list[Layer]] = defaultdict(list)
        for layer in layers:
            by_input[layer.input.name].append(layer)
        yield from (_Group(group) for group in by_input.values())
        for node in list(graph.nodes):
            if not _selected(self.config, node):
                continue
            if self.config.convs and node.op == "Conv":
                yield _conv_weight(node, self.config)
            elif self.config.tables and node.op == "Gather" and _is_table(node, self.config):
                yield node

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        for found in self.match(graph):
            if isinstance(found, _Group):
                record.layers.extend(self._quantize_group(graph, found.layers))
            elif isinstance(found, gs.Node):
                record.layers.append(_quantize_table(graph, found))
            elif isinstance(found, LayerChange):
                record.layers.append(found)
            else:
                record.layers.append(_quantize_conv(graph, *found))
        return record

    def _quantize_group(self, graph: gs.Graph, group: list[Layer]) -> list[LayerChange]:
        """Quantize every layer reading the same X; they share smoothing and the activation quantizer."""
        X = group[0].node.inputs[0]
        cfg = self.config
        if cfg.activations != "none" and any(node.op == "DequantizeLinear" for node in getattr(X, "inputs", [])):
            # The input already carries a QuantizeLinear/DequantizeLinear pair: quantizing it again would
            # add a second rounding; the weights alone are quantized, and ORT fuses the pair with them.
            cfg = dataclasses.replace(cfg, activations="none")
        st = self.stats.get(X.name)
        if st is not None and not st.count:
            st = None
        alpha, s = _smoothing(cfg, group, st)
        G = None if st is None else st.gram / s[:, None] / s[None, :]  # Gram of X / s
        source, matmul_input, quantized_input = _activation_path(graph, cfg, X, st, s, alpha)
        changes = []
        for layer in group:
            W = layer.W * s[:, None]
            if cfg.rounding == "gptq" and G is not None:
                q, scale = quantization.gptq_per_channel(W, G)
            else:
                q, scale = quantization.quantize_per_channel(W)
            W_hat = quantization.dequantize(q, scale)
            details = {"shape": list(W.shape), "bytes": int(layer.W.nbytes), "bytes_after": int(q.nbytes + scale.nbytes),
                       "rounding": cfg.rounding if G is not None else "nearest", "smooth_alpha": alpha}
            A = B = None
            if G is not None:
                details["calib_error"] = linalg.output_error(W, W_hat, G)
                rank = min(cfg.compensation_rank, *W.shape)
                if rank:
                    A, B = quantization.low_rank_compensation(W, W_hat, G, rank)
                    details["calib_error_compensated"] = linalg.output_error(W, W_hat + A @ B, G)
                    details["compensation_rank"] = rank
                    details["bytes_after"] += int(4 * (A.size + B.size))
            _rewrite_layer(graph, layer, source, matmul_input, quantized_input, q, scale, A, B)
            changes.append(LayerChange(layer.node.name, layer.node.op, "rewritten", details=details))
        return changes


def _smoothing(cfg: QuantizeInt8Config, group: list[Layer], st: TensorStats | None) -> tuple[float | None, np.ndarray]:
    """SmoothQuant strength and factors s (k,) for the layers reading one input (s = 1: none). s is
    what the stored — possibly float16 — 1/s undoes exactly."""
    k = group[0].W.shape[0]
    if cfg.activations == "none" or cfg.smooth_alpha is None or st is None:
        return None, np.ones(k)
    if cfg.smooth_alpha == "auto":
        alpha, s, _ = quantization.choose_smoothing([layer.W for layer in group], st.gram, st.count, st.low, st.high)
    else:
        w_absmax = np.max([np.abs(layer.W).max(axis=1) for layer in group], axis=0)
        alpha, s = cfg.smooth_alpha, quantization.smoothing_scales(st.abs_max, w_absmax, cfg.smooth_alpha)
    return alpha, 1.0 / quantization.compact(1.0 / s)


def _activation_path(graph: gs.Graph, cfg: QuantizeInt8Config, X: gs.Tensor, st: TensorStats | None,
                     s: np.ndarray, alpha: float | None):
    """The tensors the rewritten layers read: ``(source, matmul_input, quantized_input)`` — X after
    smoothing (float, for compensation branches), what a float MatMul reads (weight-only and QDQ
    forms), and the (codes, scale, zero point) an integer MatMul reads (None in float forms)."""
    source = X
    if alpha is not None:
        # One Mul: folding 1/s into a per-channel QuantizeLinear instead is exact but ORT's CPU
        # kernel for per-axis QuantizeLinear made the model slower than fp32 (docs/benchmarks.md).
        source = _node_output(graph, "Mul", [X, _scale(graph, f"{X.name}/smooth_inv", quantization.as_stored(1.0 / s))],
                              f"{X.name}/smoothed", X.dtype)
    if cfg.activations == "none":
        return source, source, None
    if cfg.activations == "static" and st is not None:
        Xq, x_scale, x_zero = _static_quantize(graph, source, st.low / s, st.high / s)
        if cfg.static_format == "ort":
            return source, source, (Xq, x_scale, x_zero)
        return source, _node_output(graph, "DequantizeLinear", [Xq, x_scale, x_zero], f"{X.name}/dequantized",
                                    np.float32), None
    quantized = source
    if st is not None:
        # The run-time range is the batch's, capped at the calibrated one: a padding row or a stray
        # token can no longer coarsen the step for the whole batch.
        lo, hi = min(float(np.min(st.low / s)), 0.0), max(float(np.max(st.high / s)), 0.0)
        quantized = _node_output(graph, "Clip", [source, _const(graph, f"{X.name}/low", np.array(lo, np.float32)),
                                                 _const(graph, f"{X.name}/high", np.array(hi, np.float32))],
                                 f"{X.name}/clipped", X.dtype)
    return source, source, _dynamic_quantize(graph, quantized)


def _const(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(unique_name(graph, base), np.ascontiguousarray(values))


def _scale(graph: gs.Graph, base: str, scale: np.ndarray) -> gs.Tensor:
    """A float32 scale tensor; one stored as float16 gets a Cast (ONNX Runtime folds it at load time)."""
    if scale.dtype == np.float32:
        return _const(graph, base, scale)
    return _node_output(graph, "Cast", [_const(graph, base + "_fp16", scale)], base, np.float32, {"to": 1})


def _node_output(graph: gs.Graph, op: str, inputs: list, base: str, dtype, attrs=None) -> gs.Variable:
    out = gs.Variable(unique_name(graph, base), dtype=dtype)
    graph.nodes.append(gs.Node(op, name=unique_name(graph, base + "/" + op), inputs=inputs, outputs=[out],
                               attrs=attrs or {}))
    return out


def _dynamic_quantize(graph: gs.Graph, X: gs.Tensor) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
    outs = [gs.Variable(unique_name(graph, f"{X.name}/{suffix}"), dtype=dtype)
            for suffix, dtype in (("quantized", np.uint8), ("scale", np.float32), ("zero_point", np.uint8))]
    graph.nodes.append(gs.Node("DynamicQuantizeLinear", name=unique_name(graph, f"{X.name}/DynamicQuantizeLinear"),
                               inputs=[X], outputs=outs))
    return tuple(outs)


def _static_quantize(graph: gs.Graph, X: gs.Tensor, low: np.ndarray, high: np.ndarray):
    """``QuantizeLinear(X)`` to uint8 with the fixed range ``[low, high]`` the calibration data showed
    (real tokens only: padding rows, which the model masks anyway, may fall outside and are clipped).
    Returns the codes, scale and zero point."""
    lo, hi = min(float(np.min(low)), 0.0), max(float(np.max(high)), 0.0)
    scale = np.array((hi - lo) / 255.0 if hi > lo else 1.0, np.float32)
    zero = np.array(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
    x_scale, x_zero = _const(graph, f"{X.name}/scale", scale), _const(graph, f"{X.name}/zero_point", zero)
    return _node_output(graph, "QuantizeLinear", [X, x_scale, x_zero], f"{X.name}/quantized", np.uint8), x_scale, x_zero


def _rewrite_layer(graph, layer: Layer, X, matmul_input, quantized_input, q, scale, A, B) -> None:
    """Replace ``layer.node`` by its int8 form; the node's output tensor keeps its name."""
    node = layer.node
    name = node.name or node.outputs[0].name
    Y = node.outputs[0]
    bias, beta = (node.inputs[2], node.attrs.get("beta", 1.0)) if node.op == "Gemm" and len(node.inputs) > 2 else (None, 1.0)
    node.outputs = []  # detached: cleanup() removes it
    f32 = np.float32
    if quantized_input is not None and isinstance(quantized_input[1], gs.Constant):
        # Static range, ORT form: one fused integer MatMul with the bias (com.microsoft contrib op).
        Xq, x_scale, x_zero = quantized_input
        inputs = [Xq, _const(graph, f"{name}/W_int8", q), x_scale, _scale(graph, f"{name}/W_scale", scale), x_zero,
                  gs.Variable.empty()]  # no weight zero point: symmetric
        if bias is None and node.op == "MatMul":
            bias, Y = _absorb_bias_add(graph, Y, q.shape[1])
        if isinstance(bias, gs.Constant) and np.asarray(bias.values).size == q.shape[1]:
            inputs.append(_const(graph, f"{name}/bias", (np.asarray(bias.values).reshape(-1) * beta).astype(f32)))
            bias = None
        terms = [_node_output(graph, "MatMulIntegerToFloat", inputs, f"{name}/int8_out", f32)]
        graph.nodes[-1].domain = CONTRIB_DOMAIN
        import_contrib_domain(graph)
    elif quantized_input is not None:
        Xq, x_scale, x_zero = quantized_input
        acc = _node_output(graph, "MatMulInteger", [Xq, _const(graph, f"{name}/W_int8", q), x_zero],
                           f"{name}/int32", np.int32)  # no weight zero point: symmetric
        acc = _node_output(graph, "Cast", [acc], f"{name}/int32_float", f32, {"to": 1})
        scales = _node_output(graph, "Mul", [x_scale, _scale(graph, f"{name}/W_scale", scale)], f"{name}/scales", f32)
        terms = [_node_output(graph, "Mul", [acc, scales], f"{name}/int8_out", f32)]
    else:
        W = _node_output(graph, "DequantizeLinear",
                         [_const(graph, f"{name}/W_int8", q), _scale(graph, f"{name}/W_scale", scale)],
                         f"{name}/W_dequantized", f32, {"axis": 1})
        terms = [_node_output(graph, "MatMul", [matmul_input, W], f"{name}/int8_out", f32)]
    if isinstance(bias, gs.Constant):
        terms.append(_const(graph, f"{name}/bias", (np.asarray(bias.values) * beta).astype(f32)))
    elif bias is not None:
        terms.append(bias if beta == 1.0 else _node_output(
            graph, "Mul", [bias, _const(graph, f"{name}/beta", np.array(beta, f32))], f"{name}/bias", f32))
    total = terms[0]
    for term in terms[1:]:
        total = _node_output(graph, "Add", [total, term], f"{name}/sum", f32)
    graph.nodes[-1].outputs = [Y]  # the last node computed the layer's output: it takes over its name
    if A is not None:  # EoRA branch, in float
        add_low_rank_branch(graph, Y, X, A, B, name)


def _absorb_bias_add(graph: gs.Graph, Y: gs.Variable, n: int) -> tuple[gs.Constant | None, gs.Variable]:
    """If the only reader of a MatMul output ``Y`` is ``Add(Y, b)`` with a constant (n,) bias, detach that
    Add and return ``(b, its output)``; otherwise ``(None, Y)``."""
    readers = [node for node in graph.nodes if Y in node.inputs]
    if len(readers) != 1 or readers[0].op != "Add" or Y in graph.outputs:
        return None, Y
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] is Y else add.inputs[0]
    if not isinstance(other, gs.Constant) or np.asarray(other.values).shape not in ((n,), (1, n)):
        return None, Y
    out = add.outputs[0]
    add.outputs = []  # detached: cleanup() removes it
    return other, out


def _conv_weight(node: gs.Node, config: QuantizeInt8Config) -> tuple[gs.Node, np.ndarray] | LayerChange:
    """A Conv whose weight is stored int8, or the reason it is not."""
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or not np.issubdtype(np.asarray(weight.values).dtype, np.floating):
        return LayerChange(node.name, node.op, "skipped", "weight is not a float constant")
    W = np.asarray(weight.values)
    if W.size < config.min_params:
        return LayerChange(node.name, node.op, "skipped", f"{W.size} weights < min_params {config.min_params}")
    return node, W


def _quantize_conv(graph: gs.Graph, node: gs.Node, W: np.ndarray) -> LayerChange:
    """Weight-only int8 Conv weight (per output channel): a 4× smaller file, float compute."""
    q, scale = quantization.quantize_per_channel(W.reshape(W.shape[0], -1).T)
    name = node.name or node.outputs[0].name
    node.inputs[1] = _node_output(graph, "DequantizeLinear",
                                  [_const(graph, f"{name}/W_int8", q.T.reshape(W.shape)),
                                   _scale(graph, f"{name}/W_scale", scale)],
                                  f"{name}/W_dequantized", np.float32, {"axis": 0})
    return LayerChange(node.name, node.op, "rewritten", details={
        "shape": list(W.shape), "bytes": int(W.nbytes), "bytes_after": int(q.nbytes + scale.nbytes),
        "rounding": "nearest", "weight_only": True})


def _is_table(node: gs.Node, config: QuantizeInt8Config) -> bool:
    """A Gather on a constant float [V, d] table along axis 0, large enough to be worth it."""
    table = node.inputs[0]
    if node.attrs.get("axis", 0) != 0 or not isinstance(table, gs.Constant):
        return False
    T = np.asarray(table.values)
    return T.ndim == 2 and np.issubdtype(T.dtype, np.floating) and T.size >= config.min_params


def _quantize_table(graph: gs.Graph, node: gs.Node) -> LayerChange:
    """An embedding table stored int8 per row."""
    T = np.asarray(node.inputs[0].values)
    q, scale = quantization.quantize_per_channel(T.T)  # a row of the table is a "channel"
    name = node.name or node.outputs[0].name
    # Gather the int8 rows and their scales, then dequantize only what was gathered: a
    # DequantizeLinear of the whole table would run on every inference (ORT keeps DequantizeLinear
    # on initializers unfolded for its QDQ fusions).
    indices, Y = node.inputs[1], node.outputs[0]
    node.inputs[0] = _const(graph, f"{name}/table_int8", q.T)
    node.outputs = [gs.Variable(unique_name(graph, f"{name}/rows_int8"), dtype=np.int8)]
    rows = _node_output(graph, "Cast", [node.outputs[0]], f"{name}/rows", np.float32, {"to": 1})
    row_scales = _node_output(graph, "Gather", [_const(graph, f"{name}/table_scale", scale[:, None]), indices],
                              f"{name}/row_scales", scale.dtype, {"axis": 0})
    if scale.dtype != np.float32:
        row_scales = _node_output(graph, "Cast", [row_scales], f"{name}/row_scales_float", np.float32, {"to": 1})
    graph.nodes.append(gs.Node("Mul", name=unique_name(graph, f"{name}/dequantize"), inputs=[rows, row_scales],
                               outputs=[Y]))
    return LayerChange(node.name, node.op, "rewritten", details={
        "shape": list(T.shape), "bytes": int(T.nbytes), "bytes_after": int(q.nbytes + scale.nbytes),
        "rounding": "nearest", "weight_only": True})
