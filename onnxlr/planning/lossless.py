"""``--target lossless``: the smallest share of parameters whose factorization still meets the tolerance.

Bisection over ``--target params=S`` between 0 and :data:`MAX_SHARE` in :data:`STEPS` halvings, each
candidate compared with the original on every calibration batch with the metric and threshold of
``--max-error``. The share found on the calibration data must also hold on the held-out inputs: the
optimizer then steps back towards the dense model (half the remaining distance each time, at most
:data:`RETRIES` times) while validation fails (:func:`step_back`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx

from onnxlr.compare import Tolerance, compare
from onnxlr.errors import OnnxlrError
from onnxlr.pipeline import PassRecord
from onnxlr.planning.targets import Target
from onnxlr.runtimes.providers import make_session

MAX_SHARE = 0.99
STEPS = 6
RETRIES = 3


def _outputs(model: onnx.ModelProto, batches: Sequence[dict], threads: int) -> dict[str, np.ndarray]:
    session = make_session(model.SerializeToString(), "CPUExecutionProvider", threads)
    names = [o.name for o in session.get_outputs()]
    runs = [session.run(None, {k: np.asarray(v) for k, v in batch.items()}) for batch in batches]
    return {name: np.concatenate([np.atleast_1d(r[i]) for r in runs]) for i, name in enumerate(names)}


def lossless_target(model: onnx.ModelProto, tolerance: Tolerance, build: Callable[[Target], onnx.ModelProto],
                    batches: Sequence[dict], *, threads: int) -> tuple[Target, PassRecord]:
    """The smallest ``params`` target whose model ``build(target)`` meets ``tolerance`` against ``model``
    on ``batches``, and a report record of every share tried; OnnxlrError when not even the largest
    share meets it."""
    reference = _outputs(model, batches, threads)
    record = PassRecord("lossless_search", {"tolerance": str(tolerance), "tried": {}})

    def meets(share: float) -> bool:
        try:
            got = _outputs(build(Target("params", round(share, 4))), batches, threads)
        except OnnxlrError:  # below the smallest reachable budget
            ok = False
        else:
            ok = all(tolerance.holds(compare(name, reference[name], got[name])) for name in reference)
        record.config["tried"][round(share, 4)] = ok
        return ok

    low, high = 0.0, MAX_SHARE
    if not meets(high):
        raise OnnxlrError(f"no factorization meets {tolerance} on the calibration data, even keeping "
                          f"{high:.0%} of the parameters")
    for _ in range(STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    record.config["share"] = round(high, 4)
    return Target("params", round(high, 4)), record


def step_back(record: PassRecord) -> Target:
    """The next share to try when the held-out inputs disagree: half-way to :data:`MAX_SHARE` (kept in
    ``record``)."""
    share = record.config["share"]
    share = round(share + (MAX_SHARE - share) / 2, 4)
    record.config.setdefault("held_out_retries", []).append(share)
    record.config["share"] = share
    return Target("params", share)
