"""Block-wise n-bit weight quantization in ONNX Runtime's ``MatMulNBits`` layout (plain numpy).

Convention: a layer computes ``Y = X @ W`` with ``W`` of shape (K, N), K the reduction dimension;
``G = XᵀX`` (K, K) is the Gram of the calibration rows of X.

Layout (the ``com.microsoft.MatMulNBits`` contrib op): every output column n is cut along K into
``n_blocks = ceil(K / block_size)`` blocks, each with its own scale and zero point. A K that is not a
multiple of ``block_size`` is padded with zero rows; the padding never changes a block's scale or
zero point (both ranges below always include 0), its levels encode exactly 0, and the op reads only
the first K values, so it costs storage only. Dequantized: ``w = (q - zero_point) * scale``.

Scale and zero point follow ONNX Runtime's own quantizer (MLAS ``BlockwiseQuantizer``, used by
``onnxruntime.quantization.matmul_nbits_quantizer``) bit for bit, in float32:

- asymmetric: ``lo = min(block min, 0)``, ``hi = max(block max, 0)``, ``scale = (hi - lo) / (2^bits - 1)``,
  ``zero_point = round(-lo / scale)`` clamped to the level range (0 when the block is all zero);
- symmetric: ``scale = -m / 2^(bits-1)`` where ``m`` is the block's value of largest magnitude (sign
  kept, so the scale may be negative): ``m`` lands exactly on level 0, the most negative level
  ``-2^(bits-1)`` (the signed range has one more negative level than positive ones). No zero
  point is stored; MatMulNBits then uses ``2^(bits-1)``;
- level ``q = clip(round(v * (1 / scale) + zero_point), 0, 2^bits - 1)``, rounding halves away from
  zero (C ``roundf``), with the reciprocal of the scale as stored (in the weight's dtype).
"""

from __future__ import annotations

import numpy as np
from onnxlr import quantization

SUPPORTED_BITS = (4, 8)


def check_format(bits: int, block_size: int) -> None:
    """MatMulNBits' constraints on ``bits`` and ``block_size`` (ValueError otherwise)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def n_blocks(K: int, block_size: int) -> int:
    return -(-K // block_size)


def default_zero_point(bits: int) -> int:
    """The zero point MatMulNBits assumes when none is given: the middle level 2^(bits-1)."""
    return 1 << (bits - 1)


def _scale_dtype(W: np.ndarray) -> np.dtype:
    # MatMulNBits wants the scales in the type of its input A, i.e. of the weight it replaces.
    return np.dtype(np.float16) if W.dtype == np.float16 else np.dtype(np.float32)


def block_parameters(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool,
                     dtype: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scales (in ``dtype``) and zero points (uint8) of blocks with minima ``lo`` and maxima ``hi``
    (any matching shape), ONNX Runtime's rule (module docstring). Symmetric blocks get the implicit
    zero point 2^(bits-1)."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    top = np.float32(2 ** bits - 1)
    if symmetric:
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (-extreme / np.float32(default_zero_point(bits))).astype(dtype)
        return scales, np.full(scales.shape, default_zero_point(bits), np.uint8)
    lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    scales32 = ((hi - lo) / top).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_fp = np.where(scales32 != 0, -lo / scales32, np.float32(0))
    zero_points = np.clip(_round_half_away(zero_fp), 0, top).astype(np.uint8)
    return scales32.astype(dtype), zero_points


def quantize_values(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels (uint8) of ``values`` under broadcastable ``scales`` and ``zero_points``."""
    scales32 = np.asarray(scales).astype(np.float32)
    with np.errstate(divide="ignore"):
        reciprocal = np.where(scales32 != 0, np.float32(1) / scales32, np.float32(0)).astype(np.float32)
    # float32 product and sum exactly as ORT evaluates them, so ties fall the same way
    scaled = np.asarray(values, np.float32) * reciprocal + np.asarray(zero_points).astype(np.float32)
    return np.clip(_round_half_away(scaled), 0, 2 ** bits - 1).astype(np.uint8)


def dequantize_values(levels: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """``(levels - zero_points) * scales`` in float32 (broadcasting), as MatMulNBits computes it."""
    return (levels.astype(np.float32) - np.asarray(zero_points).astype(np.float32)) * \
        np.asarray(scales).astype(np.float32)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    # C roundf; numpy's round goes half to even. Done in float64, where x ± 0.5 is exact.
    x = np.asarray(x, np.float64)
    return np.trunc(x + np.copysign(0.5, x))


def _blocks(W: np.ndarray, block_size: int) -> np.ndarray:
    """W (K, N) zero-padded along K and cut into (N, n_blocks, block_size) float32 blocks."""
    K, N = W.shape
    padded = np.zeros((n_blocks(K, block_size) * block_size, N), np.float32)
    padded[:K] = W
    return padded.T.reshape(N, -1, block_size)


def quantize_blockwise(W: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False):
    """Round-to-nearest block-wise quantization of W (K, N).

    Returns ``(q, scales, zero_points)``: q uint8 (N, n_blocks, block_size) levels in
    [0, 2^bits - 1], blocks running along K for each output column (padding rows hold the level of
    0); scales (N, n_blocks) float32 (float16 for a float16 W); zero_points (N, n_blocks) uint8, or
    None when ``symmetric`` (implicitly 2^(bits-1)).
    """
    check_format(bits, block_size)
    W = np.asarray(W)
    blocks = _blocks(W, block_size)
    scales, zero_points = block_parameters(blocks.min(axis=2), blocks.max(axis=2), bits, symmetric,
                                           _scale_dtype(W))
    q = quantize_values(blocks, scales[..., None], zero_points[..., None], bits)
    return q, scales, None if symmetric else zero_points


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int,
                         bits: int = 4) -> np.ndarray:
    """The float32 (K, N) weight MatMulNBits computes with; ``bits`` only sets the implicit zero
    point 2^(bits-1) used when ``zero_points`` is None."""
    if zero_points is None:
        zero_points = np.full(scales.shape, default_zero_point(bits), np.uint8)
    W = dequantize_values(q, scales[..., None], zero_points[..., None])
    return np.ascontiguousarray(W.reshape(q.shape[0], -1)[:, :K].T)


def gptq_blockwise(W: np.ndarray, G: np.ndarray, bits: int = 4, block_size: int = 32,
                   symmetric: bool = False, damp: float = 0.01):
    """Block-wise quantization of W (K, N) with GPTQ rounding (Frantar et al. 2022) for the
    calibration Gram G (K, K); same outputs as :func:`quantize_blockwise`.

    The loop is :func:`onnxlr.quantization.gptq` with one lazy batch per quantization block: a
    block's scales and zero points are set from its rows as updated when the block starts.
    """
    check_format(bits, block_size)
    W = np.asarray(W)
    K, N = W.shape
    if np.shape(G) != (K, K):
        raise ValueError(f"Gram must be ({K}, {K}) for a weight with K={K}, got {np.shape(G)}")
    nb = n_blocks(K, block_size)
    dtype = _scale_dtype(W)
    q = np.empty((N, nb, block_size), np.uint8)
    scales = np.empty((N, nb), dtype)
    zero_points = np.empty((N, nb), np.uint8)

    def start_block(start, stop, rows):
        b = start // block_size
        scales[:, b], zero_points[:, b] = block_parameters(rows.min(axis=0), rows.max(axis=0), bits, symmetric, dtype)
        q[:, b, :] = zero_points[:, b, None]  # padding rows: the level of 0

    def round_row(k, row):
        b, i = divmod(k, block_size)
        q[:, b, i] = quantize_values(row, scales[:, b], zero_points[:, b], bits)
        return dequantize_values(q[:, b, i], scales[:, b], zero_points[:, b])

    quantization.gptq(W, G, round_row, damp=damp, block=block_size, start_block=start_block)
    return q, scales, None if symmetric else zero_points


def pack_matmulnbits(q: np.ndarray, zero_points: np.ndarray | None, bits: int):
    """MatMulNBits' byte layout: ``(B, packed_zero_points)``.

    B: uint8 (N, n_blocks, block_size * bits / 8), consecutive K values of a block sharing a byte
    lowest bits first (for 4 bits: even k in the low nibble, odd k in the high one). Zero points:
    uint8 (N, ceil(n_blocks * bits / 8)) packed the same way along the blocks, a missing last value
    filled with 2^(bits-1) as ONNX Runtime's quantizer does; None when ``zero_points`` is None.
    """
    per_byte = 8 // bits
    N, nb, block_size = q.shape
    B = _pack_last_axis(q.reshape(N, nb, block_size // per_byte, per_byte), bits)
    if zero_points is None:
        return B, None
    if np.shape(zero_points) != (N, nb):
        raise ValueError(f"zero points must have shape {(N, nb)} for levels {q.shape}, got {np.shape(zero_points)}")
    filled = np.full((N, n_blocks(nb, per_byte) * per_byte), default_zero_point(bits), np.uint8)
    filled[:, :nb] = zero_points
    return B, _pack_last_axis(filled.reshape(N, -1, per_byte), bits)


def _pack_last_axis(values: np.ndarray, bits: int) -> np.ndarray:
    packed = np.zeros(values.shape[:-1], np.uint8)
    for j in range(values.shape[-1]):
        packed |= (values[..., j].astype(np.uint8) << np.uint8(bits * j)).astype(np.uint8)
    return packed


def matmulnbits_bytes(K: int, N: int, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                      scale_itemsize: int = 4) -> int:
    """Bytes MatMulNBits stores for a (K, N) weight: the packed levels B, the scales (``scale_itemsize``
    bytes each: the weight's dtype) and, unless ``symmetric``, the packed zero points."""
    blocks = n_blocks(K, block_size)
    data = N * blocks * block_size * bits // 8
    scales = N * blocks * scale_itemsize
    zero_points = 0 if symmetric else N * -(-blocks * bits // 8)
    return data + scales + zero_points


# ----------------------------------------------------------------------------------------------------
# Embedding tables in ``com.microsoft.GatherBlockQuantized``'s layout. A table T (V, d) is cut along d
# (the hidden axis, ``quantize_axis=1``) into blocks of ``block_size`` values per row, each with its own
# scale and zero point (the asymmetric rule above); the uint8 ``data`` (V, d * bits / 8) holds
# consecutive values of a row lowest bits first, the zero points (V, ceil(n_blocks * bits / 8)) are
# packed the same way along the blocks. The op returns ``(level - zero_point) * scale`` in the scales'
# dtype (float16 scales: a float16 output).

TABLE_BITS = (2, 4, 8)


def check_table_format(d: int, bits: int, block_size: int) -> None:
    """GatherBlockQuantized's constraints for a table with rows of ``d`` values (ValueError otherwise);
    rows must hold whole blocks."""
    if bits not in TABLE_BITS:
        raise ValueError(f"table bits must be one of {TABLE_BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if d % block_size:
        raise ValueError(f"rows of {d} values do not split into blocks of {block_size}")


def quantize_table(T: np.ndarray, bits: int = 4, block_size: int = 64, scale_dtype=np.float16):
    """Round-to-nearest asymmetric block quantization of the rows of a table T (V, d).

    Returns ``(levels, scales, zero_points)``: uint8 levels (V, d); scales (V, d / block_size) in
    ``scale_dtype``; uint8 zero points (V, d / block_size). Levels are computed against the scales as
    stored (a float16 scale rounds first), so :func:`dequantize_table` is what the op computes.
    """
    T = np.asarray(T, np.float32)
    V, d = T.shape
    check_table_format(d, bits, block_size)
    blocks = T.reshape(V, d // block_size, block_size)
    scales, zero_points = block_parameters(blocks.min(axis=2), blocks.max(axis=2), bits, False, np.dtype(scale_dtype))
    levels = quantize_values(blocks, scales[..., None], zero_points[..., None], bits)
    return levels.reshape(V, d), scales, zero_points


def dequantize_table(levels: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """The float32 table (V, d) of ``(level - zero_point) * scale`` per block (the scale as stored)."""
    V, d = levels.shape
    nb = scales.shape[1]
    blocks = dequantize_values(levels.reshape(V, nb, d // nb), scales[..., None], zero_points[..., None])
    return blocks.reshape(V, d)


def pack_table(levels: np.ndarray, zero_points: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """GatherBlockQuantized's uint8 inputs ``(data (V, d*bits/8), zero_points (V, ceil(nb*bits/8)))``;
    a missing last zero point in a byte is filled with 2^(bits-1)."""
    per_byte = 8 // bits
    V, d = levels.shape
    data = _pack_last_axis(levels.reshape(V, d // per_byte, per_byte), bits)
    nb = zero_points.shape[1]
    filled = np.full((V, n_blocks(nb, per_byte) * per_byte), default_zero_point(bits), np.uint8)
    filled[:, :nb] = zero_points
    return data, _pack_last_axis(filled.reshape(V, -1, per_byte), bits)


def table_bytes(V: int, d: int, bits: int = 4, block_size: int = 64, scale_itemsize: int = 2) -> int:
    """Bytes of a (V, d) table in GatherBlockQuantized's layout: data, scales and zero points."""
    blocks = d // block_size
    return V * d * bits // 8 + V * blocks * scale_itemsize + V * -(-blocks * bits // 8)
