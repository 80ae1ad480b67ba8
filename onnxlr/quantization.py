"""Integer weights and the data-aware choices around them — plain numpy, no ONNX.

Convention: a layer computes ``Y = X @ W`` with a weight ``W`` of shape ``(k, n)`` (k inputs, n outputs)
and calibration rows ``X`` of length k summarised by their Gram ``G = XᵀX`` (k, k) and the largest
``|x_j|`` per input channel. Weights are quantized symmetrically per output channel (column):
``W ≈ q * scale`` with integer ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and ``scale`` of shape (n,), the
layout ONNX ``DequantizeLinear(axis=1)`` and ``MatMulInteger`` with a per-column zero point consume.

- :func:`quantize_per_channel`: round to nearest.
- :func:`gptq_per_channel`: GPTQ (Frantar et al. 2022) — quantize the input rows one at a time and push
  each row's rounding error onto the rows not yet quantized, through the inverse Gram, so the *output*
  error ``||X (W - Ŵ)||`` is minimised rather than the weight error.
- :func:`smoothing_scales`: SmoothQuant (Xiao et al. 2023) — per input channel factors that move
  activation outliers into the weights, where per-channel scales absorb them.
- :func:`low_rank_compensation`: EoRA — the rank-r correction ``A @ B`` of the quantization (or pruning)
  error that minimises the calibrated output error, an activation-whitened SVD of ``W - Ŵ``.
"""

from __future__ import annotations

import numpy as np

from onnxlr import linalg


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 2 ** (bits - 1) - 1


FP16_NORMAL = (2.0 ** -14, 65504.0)


def compact(scale: np.ndarray) -> np.ndarray:
    """``scale`` rounded to float16 when every value is a normal float16 (half the bytes on disk, and
    codes computed against the rounded value lose nothing), else unchanged."""
    scale = np.asarray(scale, dtype=np.float64)
    if scale.size and FP16_NORMAL[0] <= scale.min() and scale.max() <= FP16_NORMAL[1]:
        return scale.astype(np.float16).astype(np.float64)
    return scale


def channel_scales(W: np.ndarray, bits: int = 8) -> np.ndarray:
    """(n,) symmetric scales ``max |W[:, j]| / qmax`` (float16-exact where possible, :func:`compact`);
    a zero column gets scale 1 (its codes are 0)."""
    peak = np.abs(np.asarray(W, dtype=np.float64)).max(axis=0)
    return compact(np.where(peak > 0, peak / _qmax(bits), 1.0))


def quantize_per_channel(W: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest symmetric per-column quantization of ``W`` (k, n).

    Returns ``(q, scale)``: int8 codes (k, n) and scales (n,) — float16 when :func:`compact` allows,
    else float32 — with ``W ≈ q * scale``.
    """
    W = np.asarray(W, dtype=np.float64)
    scale = channel_scales(W, bits)
    qmax = _qmax(bits)
    q = np.clip(np.rint(W / scale), -qmax, qmax).astype(np.int8)
    return q, as_stored(scale)


def as_stored(scale: np.ndarray) -> np.ndarray:
    """``scale`` in the type it is written in: float16 when that is exact, else float32."""
    half = scale.astype(np.float16)
    return half if np.array_equal(half.astype(np.float64), scale) else scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q * scale`` as float64 (k, n)."""
    return np.asarray(q, dtype=np.float64) * np.asarray(scale, dtype=np.float64)


def gptq(W: np.ndarray, G: np.ndarray, round_row, *, damp: float = 0.01, block: int = 128,
         start_block=None) -> None:
    """The GPTQ loop (Frantar et al. 2022), for any quantizer.

    The input rows of ``W`` (k, n) are rounded in order by ``round_row(i, row) -> rounded row``; the
    error of row i, divided by the i-th diagonal of the upper Cholesky factor U of
    ``(G + damp·mean(diag G)·I)⁻¹``, is subtracted from the later rows along U's i-th row — the
    closed-form optimal update of the weights not yet rounded (optimal brain surgeon), so the *output*
    error ``||X (W - Ŵ)||`` is what gets minimised. Rows go in blocks of ``block`` with one deferred
    update per block (the lazy-batch trick); ``start_block(start, stop, rows)`` sees each block's rows
    as updated so far, before any is rounded (block-wise scales are set there). An input that never
    fires (zero diagonal) gets a unit diagonal: its row is rounded to nearest, nothing pushed from it.
    """
    work = np.array(W, dtype=np.float64)
    k = work.shape[0]
    H = np.array(linalg._as_gram(G, k), dtype=np.float64)
    diag = np.diag(H).copy()
    dead = diag <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(k)] += damp * float(np.mean(np.where(dead, 1.0, diag)))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H⁻¹ = Uᵀ U
    for start in range(0, k, block):
        stop = min(start + block, k)
        if start_block is not None:
            start_block(start, stop, work[start:stop])
        errors = np.empty((stop - start, work.shape[1]))
        for i in range(start, stop):
            errors[i - start] = (work[i] - round_row(i, work[i])) / U[i, i]
            work[i + 1:stop] -= np.outer(U[i, i + 1:stop], errors[i - start])
        work[stop:] -= U[start:stop, stop:].T @ errors


def gptq_per_channel(W: np.ndarray, G: np.ndarray, bits: int = 8, *, damp: float = 0.01,
                     block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding (:func:`gptq`) of ``W`` (k, n) for inputs with Gram ``G`` (k, k); same outputs
    as :func:`quantize_per_channel` (the scales are the same, only the rounding differs)."""
    W = np.asarray(W, dtype=np.float64)
    scale = channel_scales(W, bits)
    qmax = _qmax(bits)
    q = np.zeros(W.shape, dtype=np.int8)

    def round_row(i, row):
        q[i] = np.clip(np.rint(row / scale), -qmax, qmax)
        return q[i] * scale

    gptq(W, G, round_row, damp=damp, block=block)
    return q, as_stored(scale)


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """SmoothQuant factors s (k,): the layer becomes ``(X / s) @ (diag(s) W)``.

    x_absmax : (k,) largest |x_j| over the calibration data.
    w_absmax : (k,) largest |W[j, :]| over every layer that reads X (they must share s).
    alpha : migration strength; ``s_j = x_j^alpha / w_j^(1 - alpha)``, normalised to geometric mean 1
        so the overall scale of X is unchanged. Channels that never fire (or weights that are zero)
        get s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x = np.asarray(x_absmax, dtype=np.float64)
    w = np.asarray(w_absmax, dtype=np.float64)
    live = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[live] = x[live] ** alpha / w[live] ** (1.0 - alpha)
    if live.any():
        s[live] /= np.exp(np.mean(np.log(s[live])))
    return s


def low_rank_compensation(W: np.ndarray, W_hat: np.ndarray, G: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """EoRA: ``(A, B)`` of shapes (k, r), (r, n) minimising ``||X (W - W_hat - A B)||_F`` — the
    activation-whitened truncated SVD of the compression error (:func:`onnxlr.linalg.whitened_svd`)."""
    return linalg.whitened_svd(np.asarray(W, np.float64) - np.asarray(W_hat, np.float64), G, rank)


SMOOTHING_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def activation_step(low: np.ndarray, high: np.ndarray, levels: int = 255) -> float:
    """Step of a uint8 quantizer covering the per-column range ``[low, high]`` (and 0) of a tensor."""
    lo, hi = min(float(np.min(low)), 0.0), max(float(np.max(high)), 0.0)
    return (hi - lo) / levels


def int8_layer_error(Ws: list[np.ndarray], G: np.ndarray, count: int, low: np.ndarray, high: np.ndarray,
                     s: np.ndarray) -> float:
    """Predicted relative output error of the layers ``Ws`` (each (k, n)) reading one input X when X is
    smoothed by ``s``, quantized to uint8 over its calibrated range and the weights ``diag(s) W`` to
    int8 per channel (round to nearest).

    The squared error is the weight part ``||X/s · (W_s - Ŵ_s)||²`` (from the Gram) plus the activation
    part, modelled as independent uniform rounding noise of variance ``step²/12`` per element of X/s:
    ``count · step²/12 · ||W_s||²_F``. G : (k, k) Gram of the ``count`` calibration rows of X.
    """
    Gs = G / s[:, None] / s[None, :]
    step = activation_step(low / s, high / s)
    num = den = 0.0
    for W in Ws:
        Ws_ = W * s[:, None]
        D = Ws_ - dequantize(*quantize_per_channel(Ws_))
        num += np.einsum("ij,ij->", D, Gs @ D) + count * step ** 2 / 12.0 * np.sum(Ws_ ** 2)
        den += np.einsum("ij,ij->", W, G @ W)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def choose_smoothing(Ws: list[np.ndarray], G: np.ndarray, count: int, low: np.ndarray, high: np.ndarray,
                     grid: tuple[float, ...] = SMOOTHING_GRID) -> tuple[float | None, np.ndarray, float]:
    """The SmoothQuant strength of ``grid`` — or no smoothing (``None``, s = 1) — with the least
    predicted error (:func:`int8_layer_error`) for the layers ``Ws`` sharing one input; returns
    ``(alpha, s, error)``."""
    x_absmax = np.maximum(np.abs(low), np.abs(high))
    w_absmax = np.max([np.abs(W).max(axis=1) for W in Ws], axis=0)
    best = (None, np.ones_like(x_absmax), int8_layer_error(Ws, G, count, low, high, np.ones_like(x_absmax)))
    for alpha in grid:
        s = smoothing_scales(x_absmax, w_absmax, alpha)
        err = int8_layer_error(Ws, G, count, low, high, s)
        if err < best[2]:
            best = (alpha, s, err)
    return best


# ------------------------------------------------------------------------------ static int8 convolutions
# A Conv weight W (C_out, C_in / group, *kernel) is quantized per output channel (axis 0), symmetric int8,
# the form ONNX Runtime's QLinearConv runs on its fast path (an asymmetric uint8 weight takes a path
# 2–50× slower on x86). Its bias becomes int32 at the scale x_scale · w_scale of the accumulator.


def quantize_conv_weight(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest symmetric int8 of a Conv weight (C_out, ...) per output channel: returns codes of
    W's shape and float32 scales (C_out,) with ``W ≈ q * scale[:, None, ...]``."""
    W = np.asarray(W, dtype=np.float64)
    q, scale = quantize_per_channel(W.reshape(W.shape[0], -1).T)
    return q.T.reshape(W.shape), scale.astype(np.float32)


def gptq_conv_weight(W: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding (:func:`gptq_per_channel`) of a Conv weight (C_out, C_in, *kernel), group 1, for input
    patches with Gram ``G`` (C_in·K, C_in·K) in im2col order (channel, taps); same scales and outputs as
    :func:`quantize_conv_weight`, only the rounding differs — the patch output error is minimised."""
    W = np.asarray(W, dtype=np.float64)
    q, scale = gptq_per_channel(W.reshape(W.shape[0], -1).T, G)
    return q.T.reshape(W.shape), np.asarray(scale, np.float32)


def dequantize_conv_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64 weight of codes (C_out, ...) and scales (C_out,)."""
    return q.astype(np.float64) * np.asarray(scale, np.float64).reshape((-1,) + (1,) * (q.ndim - 1))


def conv_bias_shift(W: np.ndarray, W_hat: np.ndarray, input_mean: np.ndarray, group: int = 1) -> np.ndarray:
    """(C_out,) the mean output shift the rounding ``W → Ŵ`` causes, ``(W − Ŵ) · E[x]``, per output
    channel (Nagel et al.'s bias correction, local to one conv: only its own rounding). ``input_mean``:
    (C_in,) mean of each input channel on the calibration data; padding is taken as the mean too.
    Adding it to the bias undoes the shift on average."""
    err = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    c_out, per_group = err.shape[0], err.shape[1]
    taps = err.reshape(c_out, per_group, -1).sum(axis=2)  # (C_out, C_in / group)
    groups_of = np.arange(c_out) // (c_out // group)  # output channel -> its group
    means = np.asarray(input_mean, np.float64).reshape(group, per_group)[groups_of]  # (C_out, C_in / group)
    return (taps * means).sum(axis=1)


def quantize_conv_bias(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes and float32 scales (C_out,) of a conv bias at the accumulator's scale ``x_scale · w_scale``
    (what QLinearConv adds before requantizing)."""
    scale = np.maximum(float(x_scale) * np.asarray(w_scale, np.float64), 1e-30).astype(np.float32)
    codes = np.clip(np.rint(np.asarray(b, np.float64) / scale), -2**31, 2**31 - 1).astype(np.int32)
    return codes, scale
