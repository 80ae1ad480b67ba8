"""Paired statistics for sequential compression: a reference model and a compressed copy of it run on the
same calibration batches, the rows of one tensor in both accumulated together (:class:`CrossStats`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes.exposed import BatchesLike, BatchSource, TensorNames, exposing_session, fed, run_batch
from onnxlr.runtimes.stats import rows_of
from onnxlr.statistics import CrossStats


class PairedRuns:
    """Runs a reference model and a compressed version of it on the same calibration batches and
    collects `CrossStats` of tensors present in both under the same name (sequential compression).

    Each :meth:`collect` builds one session per model and makes one pass over the batches, running
    both models on each batch; only one batch's activations are held at a time. ``batches`` is as for
    :func:`collect_stats` (a one-shot iterator is kept in memory after its first pass so that later
    calls see the same batches).
    """

    def __init__(self, batches: BatchesLike, *, mask_input: str | None = None, threads: int = 2):
        self._source = BatchSource(batches)
        self._source.keep = True
        self._passes = 0
        self.mask_input = mask_input
        self.threads = threads

    def collect(self, reference: onnx.ModelProto, compressed: onnx.ModelProto,
                tensors: Sequence[str]) -> dict[str, CrossStats]:
        """``{tensor: CrossStats}`` over all batches (x from ``reference``, x̂ from ``compressed``)."""
        tensors = list(dict.fromkeys(tensors))
        ref_graph, graph = TensorNames(reference), TensorNames(compressed)
        for name in tensors:
            ref_graph.require(name)
            graph.require(name)
        fetch = [t for t in tensors if t not in ref_graph.inputs]
        sessions = [exposing_session(m, fetch, self.threads) for m in (reference, compressed)]
        batches = self._source.first() if self._passes == 0 else self._source.again()
        record = self._source.record if self._passes == 0 else None
        self._passes += 1
        stats: dict[str, CrossStats] = {}
        for index, batch in enumerate(batches):
            if record is not None:
                record(batch)
            feeds = {name: np.asarray(value) for name, value in batch.items()}
            ref, hat = (dict(zip(fetch, run_batch(session, fetch, feeds, index))) for session in sessions)
            mask = None
            if self.mask_input is not None:
                mask = np.asarray(fed(batch, self.mask_input, index)) != 0
            for name in tensors:
                x = ref[name] if name in ref else fed(batch, name, index)
                x, x_hat = rows_of(x, mask), rows_of(hat.get(name, x), mask)
                if name not in stats:
                    stats[name] = CrossStats.zeros(x.shape[1])
                stats[name].update(x, x_hat)
        if tensors and not stats:
            raise OnnxlrError("no calibration batches")
        return stats
