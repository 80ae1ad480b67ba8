"""Storage formats of a layer's weight — float, int8, 4-bit blocks, low-rank factors in any of them —
with their exact bytes and calibrated output errors, and one budget over all of them (plain numpy).

Convention: a layer computes ``Y = X @ W``, ``W`` (k, n); ``G = XᵀX`` (k, k) is the Gram of the
calibration rows of X. The error of a format with dequantized weight ``Ŵ`` is the whitened objective

    e = ||X (W - Ŵ)||² / ||X W||² = tr((W - Ŵ)ᵀ G (W - Ŵ)) / tr(Wᵀ G W)

(squared and relative, so errors of different layers add up like their output energies do). Low-rank
formats are written with their bias correction (the mean output error folded into the bias,
:func:`onnxlr.linalg.bias_correction`), so their error is measured on the centered Gram. An embedding
table is a layer whose input rows are one-hot: its Gram is the diagonal of the token counts.

Formats (:class:`WeightFormat`):

- ``float``: the weight as it is (dtype bytes per value);
- ``int8``: symmetric int8 per output channel (``QuantizeInt8``; GPTQ-rounded for the error). Its
  activation quantizer and SmoothQuant vector, shared by every layer reading the same input, are
  charged in full to each int8 layer (``4 k + 5`` bytes: an upper bound);
- ``int4`` (``int2`` for tables): asymmetric blocks of ``block_size`` values along K (``MatMulNBits``;
  GPTQ-rounded) or along a table row (``GatherBlockQuantized``, float16 scales);
- ``rank > 0``: factors ``A (k, r)``, ``B (r, n)`` from the whitened SVD, each stored in the format's
  precision (round to nearest for the error), plus the bias correction (n values).

:func:`allocate` picks one format per layer minimising the summed (optionally sensitivity-weighted)
error within a byte budget: the multiple-choice knapsack of :mod:`onnxlr.allocation` on each layer's
Pareto front.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from onnxlr import allocation, blockwise, quantization

PRECISIONS = ("float", "int8", "int4", "int2")
PRECISIONS_BITS = {"int4": 4, "int2": 2}  # the block formats (int2: tables only)
TABLE_SCALE_BYTES = 2  # GatherBlockQuantized tables keep float16 scales


@dataclass(frozen=True)
class WeightFormat:
    """precision : one of :data:`PRECISIONS`. rank : 0 for the full weight, r for low-rank factors.
    block_size : values per scale of ``int4``/``int2`` blocks."""

    precision: str = "float"
    rank: int = 0
    block_size: int = 0

    @property
    def label(self) -> str:
        bits = f"{self.precision} b{self.block_size}" if self.block_size else self.precision
        return f"rank {self.rank} {bits}" if self.rank else bits

    @property
    def bits(self) -> int:
        return {"float": 32, "int8": 8, "int4": 4, "int2": 2}[self.precision]


INT8_INPUT_BYTES = 5  # uint8 activation scale (float32) and zero point


def int8_bytes(k: int, n: int, scale_itemsize: int = 4) -> int:
    """int8 codes, per-channel scales and the input's quantizer and smoothing vector (upper bound)."""
    return k * n + n * scale_itemsize + 4 * k + INT8_INPUT_BYTES


def full_bytes(k: int, n: int, precision: str, block_size: int = 0, itemsize: int = 4,
               int8_scale_itemsize: int = 4) -> int:
    """Bytes of a full (k, n) weight in ``precision`` (``int4``: MatMulNBits blocks of ``block_size``)."""
    if precision == "float":
        return k * n * itemsize
    if precision == "int8":
        return int8_bytes(k, n, int8_scale_itemsize)
    return blockwise.matmulnbits_bytes(k, n, PRECISIONS_BITS[precision], block_size, False, itemsize)



def format_bytes(k: int, n: int, fmt: WeightFormat, itemsize: int = 4, int8_scale_itemsize: int = 4) -> int:
    """Exact bytes of a (k, n) weight in ``fmt`` (int8's shared input quantizer as an upper bound)."""
    if not fmt.rank:
        return full_bytes(k, n, fmt.precision, fmt.block_size, itemsize, int8_scale_itemsize)
    r = fmt.rank
    return (full_bytes(k, r, fmt.precision, fmt.block_size, itemsize, int8_scale_itemsize)
            + full_bytes(r, n, fmt.precision, fmt.block_size, itemsize, int8_scale_itemsize) + n * itemsize)


def table_format_bytes(V: int, d: int, fmt: WeightFormat, itemsize: int = 4, row_scale_itemsize: int = 4) -> int:
    """Bytes of a (V, d) embedding table: float, int8 per row (a scale per row) or n-bit blocks."""
    if fmt.precision == "float":
        return V * d * itemsize
    if fmt.precision == "int8":
        return V * d + V * row_scale_itemsize
    return blockwise.table_bytes(V, d, fmt.bits, fmt.block_size, TABLE_SCALE_BYTES)


class WhitenedNorm:
    """``||X E||²_F`` of any (k, m) ``E`` from the Gram alone: with ``G = Q Λ Qᵀ`` (negative round-off
    eigenvalues clamped), ``||Λ^½ Qᵀ E||²``. Factored errors ``W - A B`` cost k·r·(k + n), not k²·n."""

    def __init__(self, G: np.ndarray):
        G = 0.5 * (np.asarray(G, np.float64) + np.asarray(G, np.float64).T)
        lam, Q = np.linalg.eigh(G)
        self.root = np.sqrt(np.maximum(lam, 0.0))[:, None] * Q.T  # (k, k): rootᵀ root = G

    def of(self, E: np.ndarray) -> float:
        return float(np.sum((self.root @ E) ** 2))

    def of_residual(self, rootW: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
        """``||X (W - A B)||²`` given ``rootW = root @ W`` (computed once per weight)."""
        return float(np.sum((rootW - (self.root @ A) @ B) ** 2))


@dataclass
class LayerOptions:
    """One layer's formats with their bytes and calibrated errors (relative, squared); ``weight``
    multiplies the errors when the allocation is judged (an end-to-end sensitivity, default 1)."""

    name: str
    formats: list[WeightFormat] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    weight: float = 1.0

    def add(self, fmt: WeightFormat, size: int, error: float) -> None:
        self.formats.append(fmt)
        self.bytes.append(int(size))
        self.errors.append(max(float(error), 0.0))

    def index(self, fmt: WeightFormat) -> int:
        return self.formats.index(fmt)


def _dequantized(M: np.ndarray, precision: str, block_size: int) -> np.ndarray:
    """``M`` (k, n) rounded to nearest in ``precision`` and back to float64 (low-rank factors)."""
    if precision == "float":
        return np.asarray(M, np.float64)
    if precision == "int8":
        return quantization.dequantize(*quantization.quantize_per_channel(M))
    q, scales, zero_points = blockwise.quantize_blockwise(np.asarray(M, np.float32), PRECISIONS_BITS[precision],
                                                          block_size)
    return blockwise.dequantize_blockwise(q, scales, zero_points, M.shape[0]).astype(np.float64)


def _scale_itemsize(M: np.ndarray) -> int:
    return quantization.as_stored(quantization.channel_scales(M)).itemsize


def layer_options(name: str, W: np.ndarray, G: np.ndarray, formats: Sequence[WeightFormat], *,
                  factors: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
                  centered_gram: np.ndarray | None = None, damp: float = 0.01) -> LayerOptions:
    """Bytes and calibrated errors of ``W`` (k, n) in each of ``formats``. ``G`` (k, k): the input's
    Gram; ``factors(r) -> (A, B)``: the low-rank fit at rank r (needed by formats with a rank), whose
    error is measured on ``centered_gram`` (the bias correction removes the mean; default ``G``).
    Full int8 and int4 weights are GPTQ-rounded (as the passes do), factors rounded to nearest."""
    W = np.asarray(W)
    k, n = W.shape
    itemsize = W.dtype.itemsize
    norm = WhitenedNorm(G)
    energy = norm.of(W)
    out = LayerOptions(name)
    if energy <= 0:  # the layer's output is zero on the calibration data: every format is exact there
        energy = float("inf")
    centered = norm if centered_gram is None else WhitenedNorm(centered_gram)
    root_W = centered.root @ W.astype(np.float64) if any(f.rank for f in formats) else None
    fitted: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one fit per rank, whatever its precisions
    for fmt in formats:
        if fmt.rank:
            if fmt.rank not in fitted:
                fitted[fmt.rank] = factors(fmt.rank)
            A, B = fitted[fmt.rank]
            A_hat, B_hat = (_dequantized(M, fmt.precision, fmt.block_size) for M in (A, B))
            size = (full_bytes(k, fmt.rank, fmt.precision, fmt.block_size, itemsize, _scale_itemsize(A))
                    + full_bytes(fmt.rank, n, fmt.precision, fmt.block_size, itemsize, _scale_itemsize(B))
                    + n * itemsize)
            out.add(fmt, size, centered.of_residual(root_W, A_hat, B_hat) / energy)
        elif fmt.precision == "float":
            out.add(fmt, W.nbytes, 0.0)
        elif fmt.precision == "int8":
            W_hat = quantization.dequantize(*quantization.gptq_per_channel(W, G, damp=damp))
            out.add(fmt, int8_bytes(k, n, _scale_itemsize(W)), norm.of(W - W_hat) / energy)
        else:
            bits = PRECISIONS_BITS[fmt.precision]
            q, scales, zero_points = blockwise.gptq_blockwise(W, G, bits, fmt.block_size, damp=damp)
            W_hat = blockwise.dequantize_blockwise(q, scales, zero_points, k, bits)
            out.add(fmt, format_bytes(k, n, fmt, itemsize), norm.of(W - W_hat) / energy)
    return out


def table_options(name: str, T: np.ndarray, counts: np.ndarray, formats: Sequence[WeightFormat]) -> LayerOptions:
    """Bytes and calibrated errors of an embedding table ``T`` (V, d) in each of ``formats``: the Gather's
    output error on the calibration tokens, ``sum_v c_v ||T_v - T̂_v||² / sum_v c_v ||T_v||²`` with
    ``counts`` c (V,) (its Gram is diag(c)). ``int8``: per row (``QuantizeInt8``); ``int4``/``int2``:
    GatherBlockQuantized blocks with float16 scales."""
    T = np.asarray(T)
    V, d = T.shape
    c = np.asarray(counts, np.float64)[:V]
    energy = float(c @ np.sum(T.astype(np.float64) ** 2, axis=1)) or float("inf")
    out = LayerOptions(name)
    for fmt in formats:
        row_scale = 4
        if fmt.precision == "float":
            T_hat = T
        elif fmt.precision == "int8":
            q, scale = quantization.quantize_per_channel(T.T)  # a row of the table is a channel
            T_hat, row_scale = quantization.dequantize(q, scale).T, scale.itemsize
        else:
            T_hat = blockwise.dequantize_table(*blockwise.quantize_table(T, fmt.bits, fmt.block_size))
        error = float(c @ np.sum((T.astype(np.float64) - T_hat) ** 2, axis=1))
        out.add(fmt, table_format_bytes(V, d, fmt, T.dtype.itemsize, row_scale), error / energy)
    return out


def allocate(layers: Sequence[LayerOptions], budget: float, *, allowed: Callable[[WeightFormat], bool] | None = None,
             resolution: int = 16384) -> list[int]:
    """One format per layer (an index into its ``formats``) minimising ``sum weight · error`` with the
    summed bytes within ``budget``: the knapsack (:func:`onnxlr.allocation.knapsack`) on each layer's
    Pareto front of the ``allowed`` formats (all by default; a layer none of whose formats is allowed
    keeps its first). When nothing fits, each layer's smallest allowed format."""
    fronts = []
    for layer in layers:
        usable = [j for j, f in enumerate(layer.formats) if allowed is None or allowed(f)] or [0]
        costs = np.array([layer.bytes[j] for j in usable], np.float64)
        errors = np.array([layer.errors[j] * layer.weight for j in usable])
        keep = allocation.pareto_front(costs, errors)
        fronts.append((np.array(usable)[keep], costs[keep], errors[keep]))
    picks = allocation.knapsack([c for _, c, _ in fronts], [e for _, _, e in fronts], budget, resolution=resolution)
    return [int(index[j]) for (index, _, _), j in zip(fronts, picks)]


def summed(layers: Sequence[LayerOptions], picks: Sequence[int], *, weighted: bool = True) -> tuple[int, float]:
    """``(bytes, error)`` of an allocation: summed bytes and summed (weighted) errors."""
    size = sum(layer.bytes[j] for layer, j in zip(layers, picks))
    error = sum(layer.errors[j] * (layer.weight if weighted else 1.0) for layer, j in zip(layers, picks))
    return int(size), float(error)
