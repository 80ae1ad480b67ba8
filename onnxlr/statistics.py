"""Statistics of calibration activations, as plain numpy containers (no ONNX Runtime here).

:class:`TensorStats` hold running float64 sums over the rows ``r`` (length k) of one tensor: the Gram
``sum r rᵀ``, the sums of ``r`` and ``|r|``, the row count and the per-column range. :class:`CrossStats`
pair the rows of one tensor in a reference model and in a compressed copy of it (sequential
compression). :class:`ActivationStats` hold, of an (N, C, *spatial) activation, the per-channel range and
mean and a histogram of every value (what static activation quantizers are calibrated on). They are
filled by :mod:`onnxlr.runtimes.stats` and read by the passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxlr import conv_factors

# rows are converted to float64 at most this many elements at a time (32 MiB)
_CHUNK_ELEMENTS = 2**22


@dataclass
class TensorStats:
    """Running statistics of the rows r (length k) of one tensor.

    gram: (k, k) float64, sum of r rᵀ. sum: (k,) float64, sum of r. abs_sum: (k,) float64, sum of |r|.
    count: number of rows accumulated. low, high: (k,) float64, smallest and largest value per column
    (the range an activation quantizer must cover; ±inf before any row).
    """

    gram: np.ndarray
    sum: np.ndarray
    abs_sum: np.ndarray
    count: int = 0
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def __post_init__(self):
        if self.low is None:
            self.low = np.full_like(self.sum, np.inf)
        if self.high is None:
            self.high = np.full_like(self.sum, -np.inf)

    @property
    def abs_max(self) -> np.ndarray:
        """(k,) largest |r| per column; zeros when no row was accumulated."""
        return np.maximum(np.abs(self.low), np.abs(self.high), where=self.count > 0, out=np.zeros_like(self.sum))

    @classmethod
    def zeros(cls, k: int) -> TensorStats:
        """Empty statistics for rows of length k."""
        return cls(np.zeros((k, k)), np.zeros(k), np.zeros(k), 0)

    @property
    def k(self) -> int:
        return self.sum.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """(k,) mean row; zeros when no row was accumulated."""
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        """(k,) mean of |r|; zeros when no row was accumulated."""
        return self.abs_sum / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """(k, k) centered covariance (gram - count·mean meanᵀ) / count (population, not count - 1)."""
        mean = self.mean
        return (self.gram - self.count * np.outer(mean, mean)) / max(self.count, 1)

    @property
    def centered_gram(self) -> np.ndarray:
        """(k, k) Gram of the centered rows, ``gram - count·mean meanᵀ``: the statistic of the optimal
        affine fit (a rank-r map plus a bias), as ``count · covariance``."""
        return self.gram - self.count * np.outer(self.mean, self.mean)

    def merged(self, other: "TensorStats") -> "TensorStats":
        """Statistics of both row sets together (for a weight read by several layers)."""
        return TensorStats(self.gram + other.gram, self.sum + other.sum, self.abs_sum + other.abs_sum,
                           self.count + other.count, np.minimum(self.low, other.low), np.maximum(self.high, other.high))

    def update(self, rows: np.ndarray) -> None:
        """Accumulate rows (m, k), in float64 (BLAS ``rᵀ r``), a bounded number of rows at a time."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.k:
            raise ValueError(f"rows must have shape (m, {self.k}), got {rows.shape}")
        step = max(1, _CHUNK_ELEMENTS // max(self.k, 1))
        for start in range(0, rows.shape[0], step):
            r = np.ascontiguousarray(rows[start:start + step], dtype=np.float64)
            self.gram += r.T @ r
            self.sum += r.sum(axis=0)
            self.abs_sum += np.abs(r).sum(axis=0)
            if len(r):
                np.minimum(self.low, r.min(axis=0), out=self.low)
                np.maximum(self.high, r.max(axis=0), out=self.high)
        self.count += rows.shape[0]


@dataclass
class CrossStats:
    """Paired rows of one tensor in a reference model (rows x) and in a compressed copy of it (rows x̂)
    fed the same batches: the statistics of sequential compression.

    ref, hat: TensorStats of x and of x̂. cross: (k, k) float64, sum of x̂ xᵀ (not symmetric).
    """

    ref: TensorStats
    hat: TensorStats
    cross: np.ndarray

    @classmethod
    def zeros(cls, k: int) -> CrossStats:
        return cls(TensorStats.zeros(k), TensorStats.zeros(k), np.zeros((k, k)))

    @property
    def centered_cross(self) -> np.ndarray:
        """(k, k) cross Gram of the centered rows, ``cross - count·mean(x̂) mean(x)ᵀ``."""
        return self.cross - self.hat.count * np.outer(self.hat.mean, self.ref.mean)

    def merged(self, other: "CrossStats") -> "CrossStats":
        return CrossStats(self.ref.merged(other.ref), self.hat.merged(other.hat), self.cross + other.cross)

    def update(self, ref_rows: np.ndarray, hat_rows: np.ndarray) -> None:
        """Accumulate paired rows (m, k): row i of both comes from the same position of the same sample."""
        if np.shape(ref_rows) != np.shape(hat_rows):
            raise ValueError(f"paired rows differ in shape: {np.shape(ref_rows)} and {np.shape(hat_rows)}")
        self.ref.update(ref_rows)
        self.hat.update(hat_rows)
        step = max(1, _CHUNK_ELEMENTS // max(self.ref.k, 1))
        for start in range(0, len(ref_rows), step):
            x = np.ascontiguousarray(ref_rows[start:start + step], dtype=np.float64)
            x_hat = np.ascontiguousarray(hat_rows[start:start + step], dtype=np.float64)
            self.cross += x_hat.T @ x


HISTOGRAM_BINS = 2048


@dataclass
class ActivationStats:
    """Running statistics of the values of one activation (N, C, *spatial); axis 1 is the channel axis
    (a tensor of rank < 2 counts as one channel).

    low, high: (C,) float64 smallest and largest value per channel (±inf before any value).
    sum: (C,) float64 sum per channel; count: values per channel accumulated.
    hist: (bins,) float64 counts of all values over ``[edge_low, edge_high]`` in equal bins. The edges
    grow to cover new values (old counts are moved into the wider bins, each at its bin's centre), so a
    histogram is built in one pass over the data.
    """

    low: np.ndarray
    high: np.ndarray
    sum: np.ndarray
    count: int = 0
    hist: np.ndarray | None = None
    edge_low: float = 0.0
    edge_high: float = 0.0
    floating: bool = True  # False when the tensor holds integers (shapes, indices): no quantizer for it

    @classmethod
    def zeros(cls, channels: int, bins: int = HISTOGRAM_BINS) -> "ActivationStats":
        return cls(np.full(channels, np.inf), np.full(channels, -np.inf), np.zeros(channels), 0, np.zeros(bins))

    @property
    def mean(self) -> np.ndarray:
        """(C,) mean per channel; zeros before any value."""
        return self.sum / max(self.count, 1)

    @property
    def range(self) -> tuple[float, float]:
        """Smallest and largest value over all channels ((0, 0) before any value)."""
        if not self.count:
            return 0.0, 0.0
        return float(self.low.min()), float(self.high.max())

    @property
    def edges(self) -> np.ndarray:
        """(bins + 1,) the histogram's bin edges."""
        return np.linspace(self.edge_low, self.edge_high, len(self.hist) + 1)

    @property
    def centres(self) -> np.ndarray:
        """(bins,) the histogram's bin centres."""
        edges = self.edges
        return 0.5 * (edges[1:] + edges[:-1])

    def update(self, activation: np.ndarray) -> None:
        """Accumulate one activation (N, C, *spatial) (float32 values are read as they are)."""
        a = np.asarray(activation)
        a = a.astype(np.uint8) if a.dtype == np.bool_ else a  # masks: min/max and histograms need numbers
        a = a.reshape(1, 1, -1) if a.ndim < 2 else a
        self.floating = bool(np.issubdtype(a.dtype, np.floating))
        if a.shape[1] != len(self.low) or not a.size:
            if not a.size:
                return
            raise ValueError(f"activation has {a.shape[1]} channels, statistics hold {len(self.low)}")
        per_channel = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        np.minimum(self.low, per_channel.min(axis=1), out=self.low)
        np.maximum(self.high, per_channel.max(axis=1), out=self.high)
        self.sum += per_channel.sum(axis=1, dtype=np.float64)
        self.count += per_channel.shape[1]
        self._grow(float(self.low.min()), float(self.high.max()))
        self.hist += np.histogram(a, bins=len(self.hist), range=(self.edge_low, self.edge_high))[0]

    def _grow(self, low: float, high: float) -> None:
        """Widen the edges to cover ``[low, high]``; old counts move into the wider bins at their centres
        (a bin's worth of blur per widening — calibration sees few batches, so few widenings)."""
        if self.edge_low <= low and high <= self.edge_high and self.edge_high > self.edge_low:
            return
        if not self.hist.any():
            self.edge_low, self.edge_high = low, (high if high > low else low + 1e-6)
            return
        centres, old = self.centres, self.hist
        self.edge_low, self.edge_high = min(low, self.edge_low), max(high, self.edge_high)
        self.hist = np.histogram(centres, bins=len(old), range=(self.edge_low, self.edge_high), weights=old)[0]


# --------------------------------------------------------------------------------------- requests
# What a pass asks of the calibration data (``Pass.needs``). The statistics service
# (:mod:`onnxlr.runtimes.calibration`) computes them and hands each pass a dict keyed by ``request.key``.


@dataclass(frozen=True)
class Rows:
    """:class:`TensorStats` of the rows of ``tensor`` along its last axis (padding rows, where an
    attention mask marks them, left out)."""

    tensor: str

    @property
    def key(self) -> str:
        return self.tensor


@dataclass(frozen=True)
class ChannelRows:
    """:class:`TensorStats` of the channel vectors of an (N, C, *spatial) ``tensor``: rows (N·∏spatial, C)."""

    tensor: str

    @property
    def key(self) -> str:
        return self.tensor

    @staticmethod
    def rows(activation: np.ndarray) -> np.ndarray:
        return channel_rows(activation)


@dataclass(frozen=True)
class Patches:
    """:class:`TensorStats` of the im2col patches (rows of length Cin·∏kernel) conv ``node`` multiplies
    on its input ``tensor``."""

    node: str
    tensor: str
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"

    @property
    def key(self) -> str:
        return self.node

    def rows(self, activation: np.ndarray) -> np.ndarray:
        pads = conv_factors.explicit_pads(activation.shape[2:], self.kernel, self.strides, self.dilations,
                                          self.pads, self.auto_pad)
        return conv_factors.im2col(activation, self.kernel, self.strides, pads, self.dilations)


@dataclass(frozen=True)
class TokenCounts:
    """How often each row of a ``size``-row table is looked up through the index ``tensor``: an int64
    histogram (padding positions left out)."""

    tensor: str
    size: int

    @property
    def key(self) -> str:
        return self.tensor


@dataclass(frozen=True)
class Sensitivity:
    """Each unit's effect on the model output, of the layer output ``tensor``: (n,) float64
    (:mod:`onnxlr.runtimes.sensitivity`)."""

    tensor: str

    @property
    def key(self) -> str:
        return self.tensor


@dataclass(frozen=True)
class Activation:
    """:class:`ActivationStats` of ``tensor`` (N, C, *spatial): per-channel range and mean, and a
    histogram of its values (static activation quantization)."""

    tensor: str

    @property
    def key(self) -> str:
        return self.tensor


def channel_rows(activation: np.ndarray) -> np.ndarray:
    """Rows of an (N, C, *spatial) activation as channel vectors: shape (N·∏spatial, C)."""
    activation = np.asarray(activation)
    return np.moveaxis(activation, 1, -1).reshape(-1, activation.shape[1])
