"""QuantizeConvInt8: static int8 for convolutional networks, written as QuantizeLinear/DequantizeLinear
pairs in the forms ONNX Runtime's CPU provider fuses into integer kernels.

Math in :mod:`onnxlr.quantization` (weights, bias) and :mod:`onnxlr.activation_ranges` (activation
ranges); which nodes run integer in :mod:`onnxlr.integer_regions`. For each integer node the pass writes:

- activations: uint8 per tensor, ``x → QuantizeLinear → DequantizeLinear → readers`` with the range the
  calibration data and the range rule give (``zero`` at 0 for a folded Relu/Clip: the clamp is the
  quantizer's saturation); tensors of one scale group (pass-through ops, a Concat of like ranges)
  share one scale, so ORT copies instead of requantizing;
- Conv: ``DequantizeLinear(int8 weight, per-channel scale, axis 0)`` (symmetric: ORT's fast path) and
  ``DequantizeLinear(int32 bias, x_scale · w_scale, axis 0)``; ORT fuses ``DQ → Conv → Q`` into
  ``QLinearConv``. With ``bias_correction`` the bias absorbs the mean shift of the weight rounding,
  ``(W − Ŵ) · E[x]`` (E[x] from the statistics);
- a constant operand of an integer Add/Mul: uint8 per tensor behind a DequantizeLinear (QLinearAdd/Mul
  read only quantized inputs).

A float Conv/MatMul/Gemm reading a quantized tensor (kept float by choice or by a range-mixing detector)
gets a 16-bit ``com.microsoft`` Q/DQ pair on that input: ONNX Runtime would otherwise quantize its float
weight itself, per tensor (``DQ → Conv(float W) → Q`` is fused anyway).

Statistics: :class:`onnxlr.statistics.Activation` of every tensor an integer op could read or write
(:meth:`QuantizeConvInt8.needs`); without them nothing is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import activation_ranges, integer_regions, quantization
from onnxlr.graph import CONTRIB_DOMAIN, import_contrib_domain, unique_name
from onnxlr.integer_regions import FUSED_BINARY, FUSED_UNARY, PASS_THROUGH, IntegerPlan
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict
from onnxlr.matching import find_convs
from onnxlr.passes.factorize_conv import patches_of
from onnxlr.statistics import Activation, ActivationStats

CANDIDATE_OPS = ("Conv", "Concat", "Relu", "Clip", *FUSED_BINARY, *FUSED_UNARY, *PASS_THROUGH)


@dataclass
class QuantizeConvInt8Config:
    """rule : activation range rule (:data:`onnxlr.activation_ranges.RULES`) for every tensor;
        ``rules`` overrides it per tensor name.
    bias_correction : add ``(W − Ŵ)·E[x]`` to each int8 conv's bias.
    rounding : "nearest", or "gptq": each ungrouped conv's weights rounded by GPTQ on the Gram of its
        im2col patches (the patch output error minimised; patches longer than :data:`GPTQ_MAX_PATCH`
        are rounded to nearest: their Gram costs more than it brings at detector resolutions).
    float_nodes : node names kept float (chosen by the planner: a head, a region slower in int8), with
        the reason recorded for each.
    mixing_ratio : a Concat whose inputs' (a Split whose outputs') ranges differ more than this factor is
        kept float with everything after it (0: no detection).
    share_ratio : a Concat's inputs share its scale when their ranges are within this factor.
    """

    rule: str = "mse"
    rules: Mapping[str, str] = field(default_factory=dict)
    bias_correction: bool = True
    rounding: str = "nearest"
    float_nodes: Mapping[str, str] = field(default_factory=dict)
    mixing_ratio: float = 16.0
    share_ratio: float = 4.0

    def __post_init__(self):
        for rule in (self.rule, *self.rules.values()):
            if rule not in activation_ranges.RULES:
                raise ValueError(f"range rule must be one of {activation_ranges.RULES}, got {rule!r}")
        if self.rounding not in ("nearest", "gptq"):
            raise ValueError(f"rounding must be 'nearest' or 'gptq', got {self.rounding!r}")


GPTQ_MAX_PATCH = 1152  # longest im2col patch (C_in·K) rounded by GPTQ: a 128-channel 3×3 conv


def gptq_convs(graph: gs.Graph) -> list:
    """The convs GPTQ rounds: ungrouped, 2-D, constant float weights, patches up to GPTQ_MAX_PATCH."""
    layers, _ = find_convs(graph)  # ungrouped Convs with constant float weights (ConvLayer)
    return [layer for layer in layers if layer.node.op == "Conv" and len(layer.kernel) == 2
            and int(np.prod(layer.W.shape[1:])) <= GPTQ_MAX_PATCH]


def candidate_tensors(graph: gs.Graph) -> list[str]:
    """Names of the non-constant tensors an integer op could read or write."""
    names: dict[str, None] = {}
    for node in graph.nodes:
        if node.op in CANDIDATE_OPS:
            reads = node.inputs[:1] if node.op in (*PASS_THROUGH, "Conv", "Relu", "Clip") else node.inputs
            for t in [*reads, *node.outputs]:
                if not isinstance(t, gs.Constant) and t.name:
                    names[t.name] = None
    return list(names)


class QuantizeConvInt8(Pass):
    """Static int8 QDQ for Conv networks (module docstring). ``stats``: Activation of each tensor of
    :func:`candidate_tensors`."""

    name = "quantize_conv_int8"
    config_class = QuantizeConvInt8Config

    def min_opset(self) -> int:
        return 13  # per-axis DequantizeLinear

    def needs(self, graph: gs.Graph) -> list:
        patches = [patches_of(layer) for layer in gptq_convs(graph)] if self.config.rounding == "gptq" else []
        return [*(Activation(name) for name in candidate_tensors(graph)), *patches]

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        ranges = self._ranges()
        mixing = integer_regions.range_mixing(graph, ranges, self.config.mixing_ratio) if self.config.mixing_ratio else {}
        keep_float = {**mixing, **self.config.float_nodes}
        record.config["range_mixing"] = {k: v for k, v in mixing.items() if not v.startswith("after ")}
        plan = integer_regions.plan_integer(graph, ranges, keep_float, self.config.share_ratio)
        params = _scales(plan, _fold(plan, ranges))
        writer = _Writer(graph)
        convs = [n for n in graph.nodes if n.name in plan.integer and n.op == "Conv"]
        record.layers += [self._quantize_conv(writer, n, params[n.inputs[0].name][0]) for n in convs]
        for node in [n for n in graph.nodes if n.name in plan.integer and n.op in FUSED_BINARY]:
            writer.quantize_constant_operands(node)
        tensors = graph.tensors()
        quantized = {name: writer.qdq(tensors[name], *params[name]) for name in plan.quantized}
        guarded = writer.guard_float_readers(quantized, params)
        record.layers += _float_records(graph, plan, keep_float, quantized, guarded)
        if guarded:
            import_contrib_domain(graph)
        record.config["integer_nodes"] = len(plan.integer)
        record.config["folded_activations"] = len(plan.folded)
        return record

    def _ranges(self) -> dict[str, tuple[float, float]]:
        """Each float tensor's range by its rule (tensors with integer values or no data left out)."""
        out = {}
        for name, st in self.stats.items():  # Activation statistics (GPTQ's patch Grams are keyed by conv)
            if isinstance(st, ActivationStats) and st.count and st.floating:
                out[name] = activation_ranges.activation_range(st, self.config.rules.get(name, self.config.rule))
        return out

    def _quantize_conv(self, writer: "_Writer", node: gs.Node, x_scale: float) -> LayerChange:
        W, group = np.asarray(node.inputs[1].values), node.attrs.get("group", 1)
        patches = self.stats.get(node.name) if self.config.rounding == "gptq" else None
        q, w_scale = quantization.gptq_conv_weight(W, patches.gram) if patches is not None and patches.count \
            else quantization.quantize_conv_weight(W)
        bias_in = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        b = np.zeros(W.shape[0]) if bias_in is None else np.asarray(bias_in.values, np.float64)
        st = self.stats.get(node.inputs[0].name)
        shift = None
        if self.config.bias_correction and st is not None and len(st.mean) == W.shape[1] * group:
            shift = quantization.conv_bias_shift(W, quantization.dequantize_conv_weight(q, w_scale), st.mean, group)
            b = b + shift
        b_codes, b_scale = quantization.quantize_conv_bias(b, x_scale, w_scale)
        zeros = np.zeros(W.shape[0])
        node.inputs[1] = writer.dequantized(f"{node.name}/weight", q, w_scale, zeros.astype(np.int8), axis=0)
        bias = writer.dequantized(f"{node.name}/bias", b_codes, b_scale, zeros.astype(np.int32), axis=0)
        if bias_in is None:
            node.inputs.append(bias)
        else:
            node.inputs[2] = bias
        return LayerChange(node.name, node.op, "rewritten", details={
            "shape": list(W.shape), "group": int(group), "bytes": int(W.nbytes),
            "bytes_after": int(q.nbytes + 12 * W.shape[0]), "format": "int8 (QLinearConv)",
            "rule": self.config.rules.get(node.inputs[0].name, self.config.rule), "bias_corrected": shift is not None,
            "rounding": "gptq" if patches is not None and patches.count else "nearest",
            "max_bias_shift": float(np.abs(shift).max()) if shift is not None and shift.size else 0.0})


def _fold(plan: IntegerPlan, ranges: dict) -> dict[str, tuple[float, float]]:
    """Ranges after folding: a folded activation's output range clamped to its bounds; the folded
    activation node is detached (its producer writes its output)."""
    effective = dict(ranges)
    for producer in plan.folded.values():
        act = producer.outputs[0].outputs[0]
        lo, hi = integer_regions.clip_bounds(act)
        r = ranges.get(act.outputs[0].name, ranges[act.inputs[0].name])
        effective[act.outputs[0].name] = (max(r[0], lo), min(r[1], hi))
        producer.outputs = [act.outputs[0]]
        act.outputs = []  # cleanup() removes it
    return effective


def _scales(plan: IntegerPlan, ranges: dict) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each quantized tensor: its group's range (the union of its members')."""
    group_range: dict[str, tuple[float, float]] = {}
    for name in plan.quantized:
        lo, hi = group_range.get(plan.shared[name], (0.0, 0.0))
        group_range[plan.shared[name]] = (min(lo, ranges[name][0]), max(hi, ranges[name][1]))
    return {name: activation_ranges.quantization_params(*group_range[plan.shared[name]]) for name in plan.quantized}


class _Writer:
    """Adds Q/DQ nodes and constants to ``graph`` under names unique in it (tracked here: asking the graph
    for every new name would walk it thousands of times)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def name(self, base: str) -> str:
        name = unique_name(self.graph, base, self.taken) if base in self.taken else base
        self.taken.add(name)
        return name

    def const(self, base: str, value) -> gs.Constant:
        return gs.Constant(self.name(base), np.array(value, order="C"))  # ascontiguousarray would make 0-d scales 1-d

    def node(self, op: str, base: str, inputs: list, dtype, domain: str = "", attrs=None) -> gs.Variable:
        out = gs.Variable(self.name(f"{base}/{op}_out"), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, name=self.name(f"{base}/{op}"), inputs=inputs, outputs=[out],
                                        attrs=attrs or {}, domain=domain))
        return out

    def dequantized(self, base: str, codes, scale, zero, axis: int | None = None) -> gs.Variable:
        """``DequantizeLinear`` of constant codes (a weight, a bias, a constant operand)."""
        inputs = [self.const(f"{base}/quantized", codes), self.const(f"{base}/scale", np.asarray(scale, np.float32)),
                  self.const(f"{base}/zero_point", zero)]
        return self.node("DequantizeLinear", base, inputs, np.float32, attrs={} if axis is None else {"axis": axis})

    def qdq(self, tensor: gs.Variable, scale: float, zero: int, dtype=np.uint8, domain: str = "",
            readers: list | None = None) -> gs.Variable:
        """``tensor → Q → DQ`` with ``readers`` (default: all) moved to the DQ output; a graph output keeps
        its name, now on the DQ output. Returns the DQ output."""
        readers = list(tensor.outputs) if readers is None else readers
        base = tensor.name if readers is None or domain == "" else f"{readers[0].name}/input16"
        s = self.const(f"{base}/scale", np.array(scale, np.float32))
        z = self.const(f"{base}/zero_point", np.array(zero, dtype))
        codes = self.node("QuantizeLinear", base, [tensor, s, z], dtype, domain)
        out = self.node("DequantizeLinear", base, [codes, s, z], np.float32, domain)
        for reader in readers:
            reader.inputs = [out if t is tensor else t for t in reader.inputs]
        if domain == "" and tensor in self.graph.outputs:
            index = self.graph.outputs.index(tensor)
            name = tensor.name
            tensor.name = self.name(f"{name}/float")
            out.name, out.shape = name, tensor.shape  # a graph output keeps its declared shape
            self.graph.outputs[index] = out
        return out

    def quantize_constant_operands(self, node: gs.Node) -> None:
        """uint8 per tensor for the constant operand of an integer Add/Mul (QLinearAdd/Mul read codes)."""
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant):
                value = np.asarray(t.values, np.float64)
                scale, zero = activation_ranges.quantization_params(value.min(), value.max())
                codes = np.clip(np.rint(value / scale) + zero, 0, 255).astype(np.uint8)
                node.inputs[i] = self.dequantized(f"{node.name}/operand{i}", codes, scale, np.array(zero, np.uint8))

    def guard_float_readers(self, quantized: dict[str, gs.Variable], params) -> set[str]:
        """A 16-bit Q/DQ (com.microsoft) between a quantized tensor and each float weight layer reading it;
        returns the guarded nodes' names."""
        guarded = set()
        for name, dq_out in quantized.items():
            for reader in [r for r in dq_out.outputs if r.op in integer_regions.WEIGHT_OPS and not _integer_conv(r)]:
                scale, zero = params[name]
                low, high = -zero * scale, (255 - zero) * scale
                s16 = (high - low) / 65535.0
                self.qdq(dq_out, s16, int(np.clip(np.rint(-low / s16), 0, 65535)), np.uint16, CONTRIB_DOMAIN, [reader])
                guarded.add(reader.name)
        return guarded


def _integer_conv(node: gs.Node) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return node.op == "Conv" and w is not None and bool(w.inputs) and w.inputs[0].op == "DequantizeLinear"


def _float_records(graph: gs.Graph, plan: IntegerPlan, keep_float: dict, quantized: dict,
                   guarded: set[str]) -> list[LayerChange]:
    """Why each weight layer, and each float island next to integer code, stays float."""
    dq_outputs = {id(v) for v in quantized.values()}
    changes = []
    for node in graph.nodes:
        if node.name in plan.integer or node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        reads_integer = any(id(t) in dq_outputs for t in node.inputs)
        reason = keep_float.get(node.name)
        if reason is None and node.op in integer_regions.FLOAT_REASONS and (reads_integer or node.op in integer_regions.WEIGHT_OPS):
            reason = integer_regions.FLOAT_REASONS[node.op]
        if reason is None and node.op in integer_regions.WEIGHT_OPS:
            reason = "no calibrated range for its input, or its weight is not a constant 4-D Conv weight"
        if reason is None and reads_integer and node.op not in ("Relu", "Clip", *integer_regions.NOT_COMPUTING):
            reason = f"{node.op} has no integer kernel in ONNX Runtime's CPU provider: a float island"
        if reason is not None:
            details = {"input_guard": "16-bit Q/DQ"} if node.name in guarded else {}
            changes.append(LayerChange(node.name, node.op, "skipped", reason, details))
    return changes
