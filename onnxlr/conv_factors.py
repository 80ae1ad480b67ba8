"""Convolution weights as matrices: the unfoldings each Conv decomposition factorizes, and back.

A Conv weight ``W`` has shape ``(Cout, Cin, *kernel)`` (1-D: ``(kw,)``, 2-D: ``(kh, kw)``); group 1.
Each decomposition below is a reshape of ``W`` into a matrix ``M`` (rows = what the first new conv
reads, columns = what the last one writes), a low-rank factorization ``M ≈ A @ B`` done by the
ordinary matrix methods of :mod:`onnxlr.linalg` (plain, or whitened by the Gram of the matching
input rows), and a reshape of ``A`` and ``B`` back into conv weights. Every ``*_weights`` function
reproduces ``W`` exactly at full rank (tests check it against ONNX Runtime). References: Jaderberg et
al. 2014 and AIMET (spatial SVD), Zhang et al. 2016 (channel / "weight" SVD), Kim et al. 2016 (Tucker-2).

- **channel SVD**: ``M[(c, i, j), o] = W[o, c, i, j]`` of shape ``(Cin*kh*kw, Cout)``: the rows of the
  data are im2col patches. ``A`` becomes a conv ``Cin -> r`` with the original kernel, stride, pads and
  dilation; ``B`` a 1×1 conv ``r -> Cout`` carrying the bias. Parameters ``r*(Cin*K + Cout)``.
- **spatial SVD** (2-D only): ``M[(c, i), (o, j)] = W[o, c, i, j]`` of shape ``(Cin*kh, Cout*kw)``: a
  ``kh×1`` conv ``Cin -> r`` (vertical stride/pad/dilation) then a ``1×kw`` conv ``r -> Cout``
  (horizontal ones). Parameters ``r*(Cin*kh + Cout*kw)``. Data-aware version: rows are vertical
  patches ``(Cin*kh)``, an approximation (the exact objective couples the horizontal taps).
- **Tucker-2**: a 1×1 conv ``Cin -> r1``, the core ``r1 -> r2`` with the original kernel and geometry,
  a 1×1 conv ``r2 -> Cout``. Input factor from the SVD of the mode-``Cin`` unfolding (whitened by the
  channel Gram when given), output factor from the mode-``Cout`` unfolding of what remains (HOSVD
  order: input side first, so its whitening is honoured exactly). Parameters
  ``Cin*r1 + r1*r2*K + r2*Cout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxlr import linalg


def kernel_size(W: np.ndarray) -> int:
    """Number of kernel taps ``K = prod(kernel)``."""
    return int(np.prod(W.shape[2:], dtype=np.int64))


# ----------------------------------------------------------------------------------- channel SVD


def channel_matrix(W: np.ndarray) -> np.ndarray:
    """``(Cin*K, Cout)`` matrix of the channel decomposition (rows in im2col patch order c, taps)."""
    return W.reshape(W.shape[0], -1).T


def channel_weights(A: np.ndarray, B: np.ndarray, kernel: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights ``(r, Cin, *kernel)`` and ``(Cout, r, 1, …)`` from ``A (Cin*K, r)``, ``B (r, Cout)``."""
    r = A.shape[1]
    first = A.T.reshape(r, -1, *kernel)
    second = B.T.reshape(B.shape[1], r, *([1] * len(kernel)))
    return first, second


def channel_params(cin: int, cout: int, K: int, r: int) -> int:
    return r * (cin * K + cout)


# ----------------------------------------------------------------------------------- spatial SVD


def spatial_matrix(W: np.ndarray) -> np.ndarray:
    """``(Cin*kh, Cout*kw)`` matrix of the spatial decomposition (2-D kernels only)."""
    cout, cin, kh, kw = W.shape
    return W.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_weights(A: np.ndarray, B: np.ndarray, cin: int, cout: int, kh: int, kw: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights ``(r, Cin, kh, 1)`` and ``(Cout, r, 1, kw)`` from ``A (Cin*kh, r)``, ``B (r, Cout*kw)``."""
    r = A.shape[1]
    first = A.T.reshape(r, cin, kh, 1)
    second = B.reshape(r, cout, kw).transpose(1, 0, 2).reshape(cout, r, 1, kw)
    return first, second


def spatial_params(cin: int, cout: int, kh: int, kw: int, r: int) -> int:
    return r * (cin * kh + cout * kw)


# -------------------------------------------------------------------------------------- Tucker-2


def tucker2(W: np.ndarray, r_in: int, r_out: int, patch_gram: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a conv weight: ``(first (r_in, Cin, 1…), core (r_out, r_in, *kernel), last (Cout, r_out, 1…))``.

    Without data: HOSVD (input factor from the mode-Cin unfolding, output factor from the mode-Cout
    unfolding of what remains). With ``patch_gram`` (the ``(Cin*K, Cin*K)`` Gram of the conv's im2col
    patches) every step minimises the calibrated output error ``||X_patches (M - M')||``: the input
    projection is the whitened SVD of the mode-Cin unfolding under the input channel Gram (the
    patch Gram's tap-diagonal blocks, averaged); given it, the core is refitted by least squares
    against the patch Gram (exact); given both, the output factor is the top-``r_out`` principal
    subspace of the layer's approximated output (output PCA, exact). Exact when ``r_in = Cin`` and
    ``r_out = Cout``.
    """
    cout, cin = W.shape[:2]
    kernel = W.shape[2:]
    K = kernel_size(W)
    ones = (1,) * len(kernel)
    # Mode-Cin unfolding as a "k x n" matrix: rows = input channels, columns = (out, taps).
    M_in = W.transpose(1, 0, *range(2, W.ndim)).reshape(cin, -1)
    if patch_gram is None:
        Q, _ = np.linalg.qr(linalg.truncated_svd(M_in, r_in)[0])  # orthonormal basis of the kept inputs
        P = Q.T  # the first conv computes z = P x
        core_in = np.moveaxis(np.tensordot(W, Q, axes=([1], [0])), -1, 1)  # (Cout, r_in, *k)
        U = np.linalg.svd(core_in.reshape(cout, -1), full_matrices=False)[0][:, :r_out]
    else:
        P = linalg.whitened_svd(M_in, _channel_gram(patch_gram, cin, K), r_in)[0].T
        lifted = _lift(P.T, K)  # (Cin*K, r_in*K): patches -> projected patches
        patch_gram = clamped(patch_gram)
        C = linalg.refit_output_factor(channel_matrix(W), lifted, patch_gram)  # (r_in*K, Cout)
        core_in = C.T.reshape(cout, r_in, *kernel)
        # Output PCA: the r_out directions holding most of the approximated output's energy.
        H = lifted.T @ patch_gram @ lifted
        U = np.linalg.eigh(C.T @ H @ C)[1][:, ::-1][:, :r_out]
    core = np.tensordot(U.T, core_in, axes=([1], [0]))  # (r_out, r_in, *k)
    return P.reshape(r_in, cin, *ones), core, U.reshape(cout, r_out, *ones)


def clamped(G: np.ndarray) -> np.ndarray:
    """``G`` with its eigenvalues floored at ``1e-6 * max`` (``linalg.clamped_eigh``): a least-squares
    refit against the raw Gram of a few calibration images is free along directions the data never
    excite and drifts arbitrarily there (measured: PP-OCR det at *full* rank lost all agreement);
    against the clamped one the full-rank refit is the weight itself."""
    lam, Q = linalg.clamped_eigh(G)
    return (Q * lam) @ Q.T


def _lift(A: np.ndarray, taps: int) -> np.ndarray:
    """``A (Cin, r)`` acting on every tap of a patch: ``(Cin*taps, r*taps)`` with rows (c, t), columns
    (a, t) — the first 1×1 conv seen from the patches of the conv after it."""
    cin, r = A.shape
    return np.einsum("ca,ts->ctas", A, np.eye(taps)).reshape(cin * taps, r * taps)


def _channel_gram(G: np.ndarray, cin: int, K: int) -> np.ndarray:
    """Gram of input pixels (c) from the patch Gram: its tap-diagonal blocks, averaged."""
    return np.einsum("atbt->ab", G.reshape(cin, K, cin, K)) / K


def vertical_gram(G: np.ndarray, cin: int, kh: int, kw: int) -> np.ndarray:
    """Gram of vertical patches (c, i) from the im2col patch Gram (c, i, j): the blocks of equal
    horizontal tap j, averaged."""
    return np.einsum("aijbkj->aibk", G.reshape(cin, kh, kw, cin, kh, kw)).reshape(cin * kh, cin * kh) / kw


def spatial_refit(W: np.ndarray, A: np.ndarray, patch_gram: np.ndarray) -> np.ndarray:
    """Given the vertical factor ``A (Cin*kh, r)``, the horizontal factor ``B (r, Cout*kw)`` minimising
    the calibrated output error of the whole conv, ``||X_patches (M - M'(A, B))||`` (least squares:
    the composed weight is linear in B)."""
    cout, cin, kh, kw = W.shape
    r = A.shape[1]
    # M'[(c,i,j), o] = sum_r A[(c,i), r] B[r, (o,j)]: rows (c,i,j), columns (r,j') of A ⊗ I_kw.
    lifted = np.einsum("xr,js->xjrs", A, np.eye(kw)).reshape(cin * kh * kw, r * kw)
    B_t = linalg.refit_output_factor(channel_matrix(W), lifted, clamped(patch_gram))  # (r*kw, Cout) rows (r, j)
    return B_t.reshape(r, kw, cout).transpose(0, 2, 1).reshape(r, cout * kw)


def tucker2_params(cin: int, cout: int, K: int, r_in: int, r_out: int) -> int:
    return cin * r_in + r_in * r_out * K + r_out * cout


# ----------------------------------------------------------------------------------- data rows


def explicit_pads(spatial: tuple[int, ...], kernel: tuple[int, ...], strides, dilations, pads, auto_pad) -> list[int]:
    """The pads (ONNX order) a Conv applies to an input of spatial shape ``spatial``, resolving
    ``auto_pad`` (SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the beginning)."""
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    d = len(kernel)
    if auto_pad in ("NOTSET", "", None):
        return list(pads) if pads else [0] * (2 * d)
    if auto_pad == "VALID":
        return [0] * (2 * d)
    begin, end = [], []
    for size, k, s, dl in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * dl + 1 - size, 0)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def im2col(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
           dilations: tuple[int, ...]) -> np.ndarray:
    """Patches of ``x`` (N, C, *spatial) as rows ``(N * outputs, C * K)`` in channel-major, tap order —
    the rows a Conv with these attributes multiplies by ``channel_matrix(W)``.

    pads: ONNX order (begin_1, …, begin_d, end_1, …, end_d).
    """
    d = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    windows = np.lib.stride_tricks.sliding_window_view(
        x, [dilations[i] * (kernel[i] - 1) + 1 for i in range(d)], axis=tuple(range(2, 2 + d)))
    # windows: (N, C, *out_full, *window); take strided outputs and dilated taps
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, dl) for dl in dilations)
    windows = windows[index]  # (N, C, *out, *kernel)
    n, c = windows.shape[:2]
    out_axes = tuple(range(2, 2 + d))
    tap_axes = tuple(range(2 + d, 2 + 2 * d))
    rows = windows.transpose(0, *out_axes, 1, *tap_axes)
    return rows.reshape(-1, c * int(np.prod(kernel)))


# ------------------------------------------------------------------------------ candidates of a layer


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
               patch_gram: np.ndarray | None, rank_ratio: float | None = None) -> list[Candidate]:
    """Every requested decomposition at the largest rank within ``budget`` parameters, or with
    ``rank_ratio`` at that share of each decomposition's full rank (1: exact), or at ``override``."""
    cout, cin = W.shape[:2]
    K = kernel_size(W)
    if rank_ratio is not None and not override:
        return _at_rank_ratio(W, decompositions, rank_ratio, patch_gram)
    out = []
    for kind in decompositions:
        if kind == "spatial" and W.ndim != 4:
            continue
        if kind == "channel":
            r = override or _round(budget / (cin * K + cout), multiple, min(cin * K, cout))
            r = min(r, cin * K, cout)
            M = channel_matrix(W)
            A, B = _factor(M, r, patch_gram)
            out.append(Candidate(kind, (r,), channel_weights(A, B, W.shape[2:]), channel_params(cin, cout, K, r)))
        elif kind == "spatial":
            kh, kw = W.shape[2:]
            r = override or _round(budget / (cin * kh + cout * kw), multiple, min(cin * kh, cout * kw))
            r = min(r, cin * kh, cout * kw)
            gram = None if patch_gram is None else vertical_gram(patch_gram, cin, kh, kw)
            A, B = _factor(spatial_matrix(W), r, gram)
            if patch_gram is not None:  # the vertical Gram is an approximation: refit B exactly
                B = spatial_refit(W, A, patch_gram)
            out.append(Candidate(kind, (r,), spatial_weights(A, B, cin, cout, kh, kw),
                                 spatial_params(cin, cout, kh, kw, r)))
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
            weights = tucker2(W, r_in, r_out, patch_gram)
            out.append(Candidate(kind, (r_in, r_out), weights, tucker2_params(cin, cout, K, r_in, r_out)))
    for c in out:
        c.error = conv_error(W, compose(c), patch_gram)
    return out


def _at_rank_ratio(W: np.ndarray, decompositions, ratio: float, patch_gram: np.ndarray | None) -> list[Candidate]:
    """Each decomposition at ⌈ratio × its full rank⌉: channel min(Cin·K, Cout), spatial min(Cin·kh,
    Cout·kw), Tucker-2 (Cin, Cout) — the rank rule of MatMul layers, for convs."""
    cout, cin = W.shape[:2]
    K = kernel_size(W)
    if ratio >= 1 and "channel" in decompositions:
        decompositions = ["channel"]  # at full rank every decomposition is exact: one SVD is enough
    out = []
    for kind in decompositions:
        if kind == "channel":
            out += candidates(W, [kind], None, math.ceil(ratio * min(cin * K, cout)), 1, patch_gram)
        elif kind == "spatial" and W.ndim == 4:
            kh, kw = W.shape[2:]
            out += candidates(W, [kind], None, math.ceil(ratio * min(cin * kh, cout * kw)), 1, patch_gram)
        elif kind == "tucker2":
            r_in, r_out = min(math.ceil(ratio * cin), cin, cout * K), math.ceil(ratio * cout)
            r_out = min(r_out, cout, r_in * K)
            c = Candidate(kind, (r_in, r_out), tucker2(W, r_in, r_out, patch_gram), tucker2_params(cin, cout, K, r_in, r_out))
            c.error = conv_error(W, compose(c), patch_gram)
            out.append(c)
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


def conv_error(W: np.ndarray, W_new: np.ndarray, patch_gram: np.ndarray | None) -> float:
    """Relative output error on the calibration patches, or relative weight error without them."""
    M, M_new = channel_matrix(W).astype(np.float64), channel_matrix(W_new).astype(np.float64)
    E = M - M_new
    if patch_gram is None:
        return float(np.linalg.norm(E) / max(np.linalg.norm(M), 1e-300))
    num = max(float(np.sum(E * (patch_gram @ E))), 0.0)
    den = float(np.sum(M * (patch_gram @ M)))
    return math.sqrt(num / den) if den > 0 else 0.0
