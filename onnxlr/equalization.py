"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization") of conv pairs — plain numpy.

For ``conv1 → f → conv2`` with ``f`` positively homogeneous per channel (nothing, Relu, or
``x · gate(x)`` with a per-channel gate conv), dividing conv1's output channel c by ``s_c`` and
multiplying what conv2 reads of channel c by ``s_c`` leaves the pair's output unchanged:
``f(x / s) = f(x) / s``. A HardSwish written ``x · Clip(Conv_dw1x1(x; w, b), 0, 1)`` stays exact when the
gate's weight takes ``w · s`` too. Choosing ``s`` from the calibrated per-channel ranges of conv1's
output evens them out, so one per-tensor activation scale fits every channel (a pointwise conv output
with one channel at 126 next to a median of 4.6 loses every small channel to rounding otherwise).
"""

from __future__ import annotations

import numpy as np

FACTOR_LIMITS = (1 / 32, 32)


def equalization_factors(activation_absmax: np.ndarray, conv2_absmax: np.ndarray | None,
                         limits: tuple[float, float] = FACTOR_LIMITS) -> np.ndarray:
    """(C,) factors ``s``: conv1's output channel c is divided by ``s_c``.

    activation_absmax: (C,) largest |value| of each channel of conv1's output on the calibration data.
    conv2_absmax: (C,) largest |weight| conv2 applies to each input channel; None when conv2 is depthwise —
        its per-channel weight scales absorb any factor, so the channels are equalized fully
        (``s = a / median a``). Otherwise DFQ's balance ``s = sqrt(a / r)``, geometric mean 1.
    Channels never active keep 1; factors are clipped to ``limits``.
    """
    a = np.asarray(activation_absmax, np.float64)
    active = a > 0
    if not active.any():
        return np.ones_like(a)
    if conv2_absmax is None:
        s = a / np.median(a[active])
    else:
        s = np.sqrt(np.maximum(a, 1e-30) / np.maximum(np.asarray(conv2_absmax, np.float64), 1e-30))
        s = s / np.exp(np.mean(np.log(s[active])))
    return np.clip(np.where(active, s, 1.0), *limits)


def equalize(W1: np.ndarray, b1: np.ndarray | None, W2: np.ndarray, s: np.ndarray, conv2_depthwise: bool,
             gate_weight: np.ndarray | None = None):
    """Weights of the equalized pair: ``(W1 / s, b1 / s, W2 · s, gate_weight · s)`` with ``s`` applied on
    conv1's output axis 0, on conv2's input axis 1 (axis 0 when conv2 is depthwise: channel c is its own
    group) and on the gate's axis 0. Shapes are kept; None stays None."""
    s = np.asarray(s, np.float64)
    W1 = np.asarray(W1, np.float64) / s.reshape((-1,) + (1,) * (np.ndim(W1) - 1))
    b1 = None if b1 is None else np.asarray(b1, np.float64) / s
    W2 = np.asarray(W2, np.float64)
    if conv2_depthwise:
        W2 = W2 * s.reshape((-1,) + (1,) * (W2.ndim - 1))
    else:
        W2 = W2 * s.reshape((1, -1) + (1,) * (W2.ndim - 2))
    gate = None
    if gate_weight is not None:
        gate = np.asarray(gate_weight, np.float64) * s.reshape((-1,) + (1,) * (np.ndim(gate_weight) - 1))
    return W1, b1, W2, gate
