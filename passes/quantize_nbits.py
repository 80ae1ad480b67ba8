"""QuantizeMatMulNBits: store MatMul/Gemm weights as block-wise 4- or 8-bit integers.

Rewrite: ``MatMul(X, W)`` with ``W`` a 2-D float constant of shape (K, N) (a dense weight or a
low-rank factor left by ``factorize_matmul``) becomes ONNX Runtime's contrib op
``com.microsoft.MatMulNBits(X, B, scales, zero_points)`` — same node name, same output — with ``B``
the packed levels, blocks of ``block_size`` values along K per output column (math and layout:
:mod:`onnxlr.blockwise`). ``Gemm(X, B, C)`` is rewritten too when it is a plain ``X @ W + C``
(``alpha = beta = 1``, ``transA = 0``; ``W = Bᵀ`` under ``transB``) with ``C`` absent or a constant
vector of N values, which becomes MatMulNBits' ``bias`` input. The model gains the ``com.microsoft``
opset import, so it runs in ONNX Runtime (CPU, CUDA, WebGPU, …) but not in runtimes without the op.

Rounding: ``nearest`` reproduces ONNX Runtime's own quantizer bit for bit; ``gptq`` (needs the Gram
of each layer's input, :meth:`QuantizeMatMulNBits.needs` names them) spreads each rounding error over the
weights not yet quantized to minimise the layer's output error on the calibration data. A layer
without statistics falls back to ``nearest`` (its record says so).

Skipped, with the reason: a weight that is not a constant or is the first operand, not 2-D, not
float32/float16, also read by a node this pass leaves (the float copy would stay), smaller than
``min_size``, with K so small that packing would not shrink it, a Gemm other than ``X @ W + c``, and
nodes excluded by ``only``/``exclude``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr import blockwise, linalg, quantization
from onnxlr.errors import OnnxlrError
from onnxlr.graph import CONTRIB_DOMAIN, add_low_rank_branch, import_contrib_domain, unique_name
from onnxlr.matching import Layer, find_layers, optional_input
from onnxlr.pipeline import LayerChange, Pass, PassRecord, config_dict
from onnxlr.statistics import Rows, TensorStats

ROUNDINGS = ("nearest", "gptq")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class QuantizeMatMulNBitsConfig:
    """bits : 4 or 8 bits per weight.
    block_size : values per scale along K, a power of two >= 16 (MatMulNBits' constraint); smaller
        blocks are more accurate and cost more scales.
    symmetric : no stored zero points (MatMulNBits then uses 2^(bits-1)); saves their bytes, loses the
        asymmetric range's accuracy on one-sided blocks.
    rounding : ``nearest`` or ``gptq`` (needs calibration statistics).
    accuracy_level : MatMulNBits' ``accuracy_level``: the least precision the kernel may compute the
        input A in (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8). 0, ONNX Runtime's quantizer default
        (it then omits the attribute), keeps A in full precision, so the result is the float
        product with the dequantized weight; 4 lets CPUs use int8 dot products, faster but it
        quantizes the activations too (a small extra error, docs/benchmarks.md).
    only : quantize only these node names (None: every eligible node).
    exclude : never quantize these node names.
    min_size : skip weights with fewer elements (K·N); on tiny layers the bytes saved do not pay for
        a contrib op.
    damp : GPTQ's ridge on the Gram, as a share of its mean diagonal.
    compensation_rank : add a float rank-r branch fitted to each layer's quantization error in the
        activation eigenspace (EoRA, :func:`onnxlr.quantization.low_rank_compensation`; needs statistics).
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    rounding: str = "nearest"
    accuracy_level: int = 0
    only: list[str] | None = None
    exclude: list[str] | None = None
    min_size: int = 1024
    damp: float = 0.01
    compensation_rank: int = 0

    def __post_init__(self):
        if self.bits not in blockwise.SUPPORTED_BITS:
            raise OnnxlrError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise OnnxlrError(f"block size must be a power of two of at least 16, got {self.block_size}")
        if self.rounding not in ROUNDINGS:
            raise OnnxlrError(f"unknown rounding {self.rounding!r} (choose from {', '.join(ROUNDINGS)})")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise OnnxlrError(f"accuracy level must be one of 0-4, got {self.accuracy_level}")
        if self.min_size < 0:
            raise OnnxlrError(f"minimum weight size must be non-negative, got {self.min_size}")
        if self.compensation_rank < 0:
            raise OnnxlrError(f"compensation rank must be non-negative, got {self.compensation_rank}")
        if not 0.0 < self.damp < 1.0:
            raise OnnxlrError(f"GPTQ damping must be in (0, 1), got {self.damp}")


def nbits_form(layer: Layer) -> str | np.ndarray | None:
    """Why MatMulNBits cannot compute ``layer`` (a str), else its bias: Gemm's C as an (N,) vector, or None."""
    if layer.W.dtype not in FLOAT_TYPES:
        return f"weight dtype {layer.W.dtype} is not float32 or float16"
    node = layer.node
    if node.op == "MatMul":
        return None
    attrs = node.attrs
    if float(attrs.get("alpha", 1.0)) != 1.0 or int(attrs.get("transA", 0)):
        return "Gemm with alpha != 1 or transA: MatMulNBits computes X @ W (+ bias) only"
    C = optional_input(node, 2)
    if C is None:
        return None
    N = layer.W.shape[1]
    if not isinstance(C, gs.Constant) or np.asarray(C.values).shape not in ((N,), (1, N)):
        return "Gemm bias C is not a constant vector of N values (MatMulNBits' bias is (N,))"
    if float(attrs.get("beta", 1.0)) != 1.0:
        return "Gemm with beta != 1: MatMulNBits adds its bias unscaled"
    return np.asarray(C.values).reshape(-1).astype(layer.W.dtype)


def find_nbits_layers(graph: gs.Graph, config: QuantizeMatMulNBitsConfig) -> tuple[list[Layer], list[LayerChange]]:
    """The MatMul/Gemm layers to quantize, and the skipped ones with reasons."""
    names = {node.name for node in graph.nodes}
    for given in (config.only or []) + (config.exclude or []):
        if given not in names:
            raise OnnxlrError(f"no node named {given!r} to quantize or exclude")
    layers, skipped = find_layers(graph)
    candidates = []
    for layer in layers:
        node = layer.node
        if config.only is not None and node.name not in config.only:
            reason = "not among the nodes selected to quantize"
        elif node.name in (config.exclude or []):
            reason = "excluded by the config"
        else:
            form = nbits_form(layer)
            reason = form if isinstance(form, str) else _size_problem(layer, config)
        if reason:
            skipped.append(LayerChange(node.name, node.op, "skipped", reason))
        else:
            candidates.append(layer)
    # A weight also read by a node left in float stays in the model: quantizing would add bytes.
    kept_nodes = {id(layer.node) for layer in candidates}
    left = {layer.weight.name: layer.node for layer in layers if id(layer.node) not in kept_nodes}
    kept = []
    for layer in candidates:
        other = left.get(layer.weight.name)
        if other is None:
            kept.append(layer)
            continue
        reason = f"weight {layer.weight.name!r} is also read by {other.op} node {other.name!r}, which keeps it in float"
        skipped.append(LayerChange(layer.node.name, layer.node.op, "skipped", reason))
    return kept, skipped


def _size_problem(layer: Layer, config: QuantizeMatMulNBitsConfig) -> str:
    K, N = layer.W.shape
    if K * N < config.min_size:
        return f"weight has {K * N} values, fewer than the minimum {config.min_size}"
    if packed_bytes(K, N, config, layer.W.dtype) >= layer.W.nbytes:
        return f"K={K} is too small: the packed blocks and their scales would not be smaller than the weight"
    return ""


def packed_bytes(K: int, N: int, config: QuantizeMatMulNBitsConfig, dtype: np.dtype) -> int:
    """Bytes of B, scales and zero points for a (K, N) weight (the weight dtype sets the scales')."""
    return blockwise.matmulnbits_bytes(K, N, config.bits, config.block_size, config.symmetric, np.dtype(dtype).itemsize)


class QuantizeMatMulNBits(Pass):
    """Block-wise n-bit quantization of MatMul/Gemm weights into ``com.microsoft.MatMulNBits``.

    stats : calibration statistics keyed by the layers' input tensor names (:class:`onnxlr.statistics.Rows`);
        required by ``rounding="gptq"``, and with them every record gets the calibrated error.
    """

    name = "quantize_matmul_nbits"
    config_class = QuantizeMatMulNBitsConfig

    def __init__(self, config: QuantizeMatMulNBitsConfig | None = None,
                 stats: Mapping[str, TensorStats] | None = None):
        super().__init__(config, stats)
        if self.config.rounding == "gptq" and stats is None:
            raise OnnxlrError("rounding 'gptq' needs calibration data (--calib)")

    def needs(self, graph: gs.Graph) -> list:
        """The inputs X of the layers it quantizes, when rounding is ``gptq`` or compensation is asked for."""
        if self.config.rounding != "gptq" and not self.config.compensation_rank:
            return []
        return [Rows(name) for name in sorted({layer.input.name for layer in find_nbits_layers(graph, self.config)[0]})]

    def run(self, graph: gs.Graph) -> PassRecord:
        record = PassRecord(self.name, config_dict(self.config))
        layers, skipped = find_nbits_layers(graph, self.config)
        record.layers.extend(skipped)
        grams = self._weight_grams(layers)
        packed: dict[tuple[str, bool], tuple] = {}
        for layer in layers:
            if layer.key not in packed:
                packed[layer.key] = self._quantize(graph, layer, grams.get(layer.key))
            constants, details, compensation = packed[layer.key]
            record.layers.append(LayerChange(layer.node.name, layer.node.op, "rewritten", "", dict(details)))
            X, Y = layer.node.inputs[0], layer.node.outputs[0]
            self._rewrite(graph, layer, constants)
            if compensation is not None:
                add_low_rank_branch(graph, Y, X, *compensation, layer.label)
        if layers:
            import_contrib_domain(graph)
        return record

    def _weight_grams(self, layers: list[Layer]) -> dict[tuple[str, bool], np.ndarray]:
        """The input Gram per weight; a weight read by several layers is fitted to all their inputs."""
        grams: dict[tuple[str, bool], np.ndarray] = {}
        for layer in layers:
            found = self.stats.get(layer.node.inputs[0].name)
            if found is None:
                continue
            grams[layer.key] = found.gram if layer.key not in grams else grams[layer.key] + found.gram
        return grams

    def _quantize(self, graph: gs.Graph, layer: Layer, gram: np.ndarray | None):
        """The packed constants of ``layer``'s weight and the figures for its record."""
        c = self.config
        K, N = layer.W.shape
        rounding = "gptq" if c.rounding == "gptq" and gram is not None else "nearest"
        if rounding == "gptq":
            q, scales, zero_points = blockwise.gptq_blockwise(layer.W, gram, c.bits, c.block_size, c.symmetric, c.damp)
        else:
            q, scales, zero_points = blockwise.quantize_blockwise(layer.W, c.bits, c.block_size, c.symmetric)
        B, packed_zero_points = blockwise.pack_matmulnbits(q, zero_points, c.bits)
        base = layer.weight.name
        constants = [gs.Constant(unique_name(graph, f"{base}/Q{c.bits}"), B),
                     gs.Constant(unique_name(graph, f"{base}/scales"), scales)]
        if packed_zero_points is not None:
            constants.append(gs.Constant(unique_name(graph, f"{base}/zero_points"), packed_zero_points))

        W_hat = blockwise.dequantize_blockwise(q, scales, zero_points, K, c.bits)
        W = layer.W.astype(np.float64)
        details = {
            "weight": base, "K": K, "N": N, "bits": c.bits, "block_size": c.block_size, "rounding": rounding,
            "bytes": int(layer.W.nbytes), "bytes_after": int(sum(np.asarray(t.values).nbytes for t in constants)),
            "weight_error": float(np.linalg.norm(W - W_hat) / max(np.linalg.norm(W), 1e-300)),
        }
        compensation = None
        if gram is not None:
            details["calib_error"] = linalg.output_error(W, W_hat, gram)
            rank = min(c.compensation_rank, K, N)
            if rank:
                compensation = quantization.low_rank_compensation(W, W_hat, gram, rank)
                details["compensation_rank"] = rank
                details["calib_error_compensated"] = linalg.output_error(W, W_hat + compensation[0] @ compensation[1], gram)
                details["bytes_after"] += 4 * rank * (K + N)
        return constants, details, compensation

    def _rewrite(self, graph: gs.Graph, layer: Layer, constants: list[gs.Constant]) -> None:
        """Turn the node itself into MatMulNBits, so its name and output stay."""
        node, c = layer.node, self.config
        K, N = layer.W.shape
        inputs = [node.inputs[0], *constants]
        bias = nbits_form(layer)
        if bias is not None:
            # inputs are positional: zero points (absent when symmetric), g_idx (deprecated), bias
            inputs += [gs.Variable.empty()] * (4 - len(constants))
            inputs.append(gs.Constant(unique_name(graph, f"{layer.label}/bias"), bias))
        attrs = {"K": K, "N": N, "bits": c.bits, "block_size": c.block_size}
        if c.accuracy_level:  # like ORT's quantizer: 0 is the op's default, left unwritten
            attrs["accuracy_level"] = c.accuracy_level
        node.op, node.domain, node.attrs = "MatMulNBits", CONTRIB_DOMAIN, attrs
        node.inputs.clear()
        node.inputs.extend(inputs)
