"""Softening attention masks (:mod:`onnxlr.passes.soften_attention_mask`) where the calibration data
say it changes nothing.

The pass is exact only while a masked score stays far enough below its row's maximum; how far the
scores spread is a property of the trained model. So each candidate value is tried, the mildest first
(the fastest), and kept when the outputs on the first calibration batches equal the original's to
float32 round-off; when none does, the masks are left as they were and the report says why.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxlr import progress
from onnxlr.calibration import CalibrationSet
from onnxlr.passes.soften_attention_mask import SoftenAttentionMask, SoftenAttentionMaskConfig
from onnxlr.pipeline import LayerChange, PassManager, PassRecord
from onnxlr.runtimes.providers import make_session

VALUES = (-30.0, -60.0)
CHECK_SAMPLES = 32
# largest output difference taken as round-off, relative to the output's largest magnitude
ROUND_OFF = 1e-5


def soften_masks(model: onnx.ModelProto, calibration: CalibrationSet, threads: int
                 ) -> tuple[onnx.ModelProto, PassRecord | None]:
    """``model`` with its attention masks softened to the mildest of :data:`VALUES` that leaves the
    outputs on the calibration data unchanged, and the pass's record (None when it found no mask)."""
    candidates = {value: PassManager([SoftenAttentionMask(SoftenAttentionMaskConfig(value=value))]).run(model)
                  for value in VALUES}
    if not any(record.rewritten for _, (record,) in candidates.values()):
        return model, None
    progress.phase("checking softened attention masks on the calibration data")
    feeds = list(calibration.batches(samples=CHECK_SAMPLES))
    reference = _outputs(model, feeds, threads)
    tried = []
    for value, (softened, (record,)) in candidates.items():
        change = _largest_change(reference, _outputs(softened, feeds, threads))
        tried.append(f"{value:g}: {change:.2g}")
        if change <= ROUND_OFF:
            record.config.update(checked_on=f"{sum(len(next(iter(f.values()))) for f in feeds)} calibration samples",
                                 largest_output_change=change)
            return softened, record
    _, (record,) = candidates[VALUES[-1]]
    reason = (f"softening changes the outputs on the calibration data (largest relative change per value "
              f"{', '.join(tried)}; round-off is {ROUND_OFF:g})")
    return model, PassRecord(record.name, record.config, [
        LayerChange(c.node, c.op, "skipped", reason) for c in record.rewritten])


def _outputs(model: onnx.ModelProto, feeds: list[dict], threads: int) -> list[list[np.ndarray]]:
    session = make_session(model.SerializeToString(), "CPUExecutionProvider", threads)
    return [[np.asarray(v) for v in session.run(None, batch)] for batch in feeds]


def _largest_change(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The largest ``max|got - ref| / max|ref|`` over outputs and batches (an integer output that
    differs counts as 1)."""
    worst = 0.0
    for ref_batch, got_batch in zip(reference, got):
        for ref, out in zip(ref_batch, got_batch):
            if not np.issubdtype(ref.dtype, np.floating):
                worst = max(worst, float(not np.array_equal(ref, out)))
                continue
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
            worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
