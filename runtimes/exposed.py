"""A model's intermediate tensors as extra outputs of a copy of it, run by ONNX Runtime on calibration
batches: the plumbing every statistic (:mod:`onnxlr.runtimes.stats`, :mod:`onnxlr.runtimes.sensitivity`)
is collected through.

Batches may be a **callable** returning a fresh iterable (called once per pass over the data), a
**re-iterable** (a list, a :class:`~onnxlr.calibration.CalibrationSet`), or a **one-shot iterator**,
whose batches are kept in memory during the first pass when a second one is needed (:class:`BatchSource`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain

import numpy as np
import onnx
from onnx import helper

from onnxlr.errors import OnnxlrError
from onnxlr.feeds import model_inputs
from onnxlr.runtimes.providers import make_session

try:  # ORT's exception for bad feeds (wrong shape, wrong type, unknown input name)
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - layout of older onnxruntime builds
    _OrtInvalidArgument = ValueError

Batch = Mapping[str, np.ndarray]
BatchesLike = Iterable[Batch] | Callable[[], Iterable[Batch]]


class TensorNames:
    """Names in the main graph: what can be exposed, what is fed, what is already an output."""

    def __init__(self, model: onnx.ModelProto):
        self.initializers = {t.name for t in model.graph.initializer}
        self.inputs = [s.name for s in model_inputs(model)]
        self.outputs = [o.name for o in model.graph.output]
        self.produced = {name for node in model.graph.node for name in node.output if name}

    def require(self, name: str) -> None:
        if name in self.produced or name in self.inputs:
            return
        if name in self.initializers:
            raise OnnxlrError(f"tensor {name!r} is a weight (initializer), not an activation")
        raise OnnxlrError(f"tensor {name!r} is not in the model (neither a node output nor a model input)")


def working_copy(model: onnx.ModelProto, feeds: Batch | None = None) -> tuple[onnx.ModelProto, dict[str, onnx.TypeProto]]:
    """A copy of ``model`` to add outputs to, and the tensor types known by shape inference.

    The copy keeps the original inputs, value_info and outputs (inferred ones are only used for types and
    sizes), so ONNX Runtime sees the model as the user gave it. With ``feeds``, inference runs with the
    model inputs fixed to their shapes: every dimension known where inference can follow it (a detector
    taking any image size, whose intermediate dims are otherwise free) — for sizing passes; later batches
    may have other shapes. A model over 1 GiB is not copied for that (its symbolic sizes stand).
    """
    sources = [model]
    if feeds is not None and model.ByteSize() <= 2**30:
        sources.insert(0, _with_input_shapes(model, feeds))
    work = next((w for source in sources for w in _inferred(source)), None)
    if work is None:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    types = {}
    for value in chain(work.graph.input, work.graph.value_info, work.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type
    for field, original in ((work.graph.input, model.graph.input), (work.graph.value_info, model.graph.value_info),
                            (work.graph.output, model.graph.output)):
        del field[:]
        field.extend(original)
    return work, types


def _inferred(model: onnx.ModelProto):
    """``model`` with inferred shapes (data propagation first), or nothing: inference is best effort."""
    for data_prop in (True, False):
        try:
            yield onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
            return
        except Exception:  # noqa: BLE001 - custom ops, > 2 GiB protos…
            continue


def _with_input_shapes(model: onnx.ModelProto, feeds: Batch) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have the shapes of ``feeds`` (and no stale value_info)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        if value.name in feeds and value.type.HasField("tensor_type"):
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(feeds[value.name])):
                dim.Clear()
                dim.dim_value = int(size)
    return fixed


def output_info(name: str, types: Mapping[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A graph output for ``name``: typed (no shape) when inference knew the type, else name only —
    ONNX Runtime infers the type of an untyped output itself."""
    type_proto = types.get(name)
    if type_proto is not None:
        return helper.make_tensor_value_info(name, type_proto.tensor_type.elem_type, None)
    value = onnx.ValueInfoProto()
    value.name = name
    return value


def exposing_session(model: onnx.ModelProto, tensors: Sequence[str], threads: int):
    """A CPU session of a copy of ``model`` with ``tensors`` added as outputs (None if none asked)."""
    if not tensors:
        return None
    outputs = {o.name for o in model.graph.output}
    if all(name in outputs for name in tensors):
        return make_session(model.SerializeToString(), "CPUExecutionProvider", threads)
    work, types = working_copy(model)
    work.graph.output.extend(output_info(name, types) for name in tensors if name not in outputs)
    return make_session(work.SerializeToString(), "CPUExecutionProvider", threads)


def run_batch(session, fetch: Sequence[str], feeds: Batch, index: int) -> list[np.ndarray]:
    if session is None:
        return []
    try:
        return session.run(list(fetch), dict(feeds))
    except (_OrtInvalidArgument, ValueError) as exc:
        raise OnnxlrError(f"calibration batch {index}: {str(exc).splitlines()[0]}") from None


class BatchSource:
    """Hands out the batches once per pass (see module docstring for the contract)."""

    def __init__(self, batches: BatchesLike):
        self.keep = False
        self._kept: list | None = None
        if callable(batches) and not isinstance(batches, Iterable):
            self._factory = batches
            self._one_shot = False
        elif isinstance(batches, Iterable):
            self._factory = None
            self._batches = batches
            self._one_shot = iter(batches) is batches
        else:
            raise OnnxlrError(f"calibration batches must be an iterable of input dicts or a callable returning one, "
                              f"got {type(batches).__name__}")

    def first(self) -> Iterable[Batch]:
        return self._fresh()

    def again(self) -> Iterable[Batch]:
        if self._one_shot:
            return self._kept
        return self._fresh()

    def record(self, batch: Batch) -> None:
        """Called for each batch of the first pass: keep it if a one-shot iterator must be replayed."""
        if self.keep and self._one_shot:
            if self._kept is None:
                self._kept = []
            self._kept.append(batch)

    def _fresh(self) -> Iterable[Batch]:
        if self._factory is not None:
            return self._factory()
        return self._batches


def fed(batch: Batch, name: str, index: int) -> np.ndarray:
    if name not in batch:
        raise OnnxlrError(f"calibration batch {index} has no array for model input {name!r}")
    return np.asarray(batch[name])


def row_mask(mask: np.ndarray | None, leading: tuple) -> np.ndarray | None:
    """Boolean row selector when ``leading`` dims match the mask's shape (or are the flattened mask)."""
    if mask is None:
        return None
    if leading == mask.shape or (len(leading) == 1 and mask.ndim > 1 and leading[0] == mask.size):
        return mask.reshape(-1)
    return None
