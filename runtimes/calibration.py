"""The calibration service: what passes and searches need of the calibration data, computed with ONNX
Runtime once per model state and kept.

Passes name what they need (``Pass.needs`` → :mod:`onnxlr.statistics` requests); the service computes
all requests of one call in as few ONNX Runtime passes over the data as ``memory_budget`` allows
(:func:`onnxlr.runtimes.stats.collect`) and remembers every result by (model, request), so a model
factorized at many budgets (the lossless search, the latency loop) has its statistics collected once.
Output sensitivities (``fisher``) and paired statistics (sequential compression) come from here too.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import onnx

from onnxlr import progress
from onnxlr.calibration import CalibrationSet, find_mask_input
from onnxlr.graph import import_graph
from onnxlr.runtimes.providers import default_threads
from onnxlr.runtimes.sensitivity import output_sensitivity
from onnxlr.runtimes.exposed import TensorNames
from onnxlr.runtimes.paired import PairedRuns
from onnxlr.runtimes.stats import collect
from onnxlr.statistics import CrossStats

# Output sensitivities cost 1 + 2*probes runs per batch: they are measured on a bounded subset.
SENSITIVITY_SAMPLES = 64
SENSITIVITY_PROBES = 32


def model_digest(model: onnx.ModelProto) -> str:
    """A fingerprint of a model's state (a mapped model's weights are references: cheap to hash)."""
    return hashlib.sha1(model.SerializeToString()).hexdigest()


class StatisticsService:
    """Statistics of ``calib`` (a :class:`~onnxlr.calibration.CalibrationSet`) on any model fed like
    the one it is bound to. ``threads``: ONNX Runtime's intra-op threads (default: all cores)."""

    def __init__(self, calib: CalibrationSet, *, threads: int | None = None, memory_budget: int = 2**30):
        if not isinstance(calib, CalibrationSet):
            raise TypeError("StatisticsService takes a CalibrationSet; use StatisticsService.of(model, data)")
        self.calib = calib
        self.threads = threads or default_threads()
        self.memory_budget = memory_budget
        self._memo: dict = {}
        self._paired: PairedRuns | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto, calib, *, samples: int | None = None, batch_size: int = 8,
           threads: int | None = None) -> "StatisticsService":
        """The service of ``calib`` (an .npz, a folder, a dict of arrays or an iterable of feed dicts)
        for ``model``'s inputs."""
        return cls(CalibrationSet(calib, model, samples=samples, batch_size=batch_size), threads=threads)

    def collect_for(self, model: onnx.ModelProto, rewrite) -> dict:
        """What the pass ``rewrite`` needs (``rewrite.needs``) on ``model``."""
        return self.collect(model, rewrite.needs(import_graph(model)))

    def collect(self, model: onnx.ModelProto, requests: Sequence) -> dict:
        """``{request.key: result}`` of ``requests`` on ``model`` (results already computed for this model
        state are not computed again). A tensor inside an If/Loop/Scan subgraph cannot be exposed as a
        model output: its requests get no result (the pass fits those layers data-free)."""
        names = TensorNames(model)
        requests = [r for r in requests if r.tensor in names.produced or r.tensor in names.inputs]
        digest = model_digest(model)
        wanted = [r for r in dict.fromkeys(requests) if (digest, r) not in self._memo]
        if wanted:
            progress.phase(f"calibration statistics of {len(wanted)} tensors")
            found = collect(model, wanted, self.calib.batches, mask_input=find_mask_input(model),
                            threads=self.threads, memory_budget=self.memory_budget)
            for request in wanted:
                self._memo[(digest, request)] = found[request.key]
        return {r.key: self._memo[(digest, r)] for r in requests}

    def sensitivity(self, model: onnx.ModelProto, tensors: Sequence[str], *, samples: int = SENSITIVITY_SAMPLES,
                    probes: int = SENSITIVITY_PROBES) -> dict[str, np.ndarray]:
        """Per tensor, each unit's effect on the model output, on at most ``samples`` calibration samples
        (:func:`onnxlr.runtimes.sensitivity.output_sensitivity`)."""
        key = (model_digest(model), "sensitivity", tuple(tensors), samples, probes)
        if key not in self._memo:
            progress.phase(f"output sensitivities of {len(tensors)} tensors ({probes} probes, {samples} samples)")
            batches = lambda: self.calib.batches(samples=samples)  # noqa: E731
            self._memo[key] = output_sensitivity(model, list(tensors), batches, probes=probes,
                                                 mask_input=find_mask_input(model), threads=self.threads) \
                if tensors else {}
        return self._memo[key]

    def paired(self, reference: onnx.ModelProto, compressed: onnx.ModelProto,
               tensors: Sequence[str]) -> dict[str, CrossStats]:
        """Paired statistics of ``tensors`` in ``reference`` and ``compressed`` on the same batches
        (sequential compression): one pass over the data running both models."""
        if self._paired is None:
            self._paired = PairedRuns(self.calib.batches, mask_input=find_mask_input(self.calib.model),
                                      threads=self.threads)
        return self._paired.collect(reference, compressed, list(tensors))

    def batches(self, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
        """The calibration batches in memory, ``batch_size`` samples each (for searches that run them
        many times)."""
        return list(self.calib.batches(batch_size=batch_size))
