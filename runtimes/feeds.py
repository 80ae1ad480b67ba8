"""Sample inputs for running a model: read from an .npz keyed by input name, or synthesised.

Synthetic inputs follow the model's declared input types. Symbolic dimensions take their value from
``dims`` (``--dim batch=8``), or 1 when unset. Integer inputs that index a constant table through
``Gather`` are drawn inside that table's range; integer inputs named like masks are all ones; other
integers are drawn from {0, 1}; floats are standard normal.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxlr.errors import OnnxlrError


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list  # ints for fixed dimensions, str (symbolic name) or None for free ones


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = []
        for dim in tensor_type.shape.dim:
            # a negative dim_value (paddle2onnx writes -1 for a free batch axis) is no fixed size
            if dim.HasField("dim_value") and dim.dim_value >= 0:
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or None)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def parse_dims(items: list[str] | None) -> dict[str, int]:
    """``["batch=8", "sequence=64"]`` -> ``{"batch": 8, "sequence": 64}``; OnnxlrError if malformed."""
    dims = {}
    for item in items or []:
        match = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*", item)
        if not match or int(match.group(2)) < 1:
            raise OnnxlrError(f"malformed --dim {item!r}: expected NAME=POSITIVE_INTEGER, e.g. batch=8")
        dims[match.group(1)] = int(match.group(2))
    return dims


def _gather_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """Input name -> size of the constant table it indexes through Gather (axis size)."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    ranges = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            shape = tables[node.input[0]]
            if shape:
                ranges[node.input[1]] = shape[axis]
    return ranges


def synthetic_feeds(model: onnx.ModelProto, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of random inputs matching the model's input types (see module docstring)."""
    dims = dims or {}
    rng = np.random.default_rng(seed)
    ranges = _gather_ranges(model)
    feeds = {}
    for spec in model_inputs(model):
        shape = [d if isinstance(d, int) else dims.get(d, 1) if d else 1 for d in spec.shape]
        if np.issubdtype(spec.dtype, np.floating):
            value = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            value = np.ones(shape, dtype=np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            if spec.name in ranges:
                value = rng.integers(0, ranges[spec.name], size=shape).astype(spec.dtype)
            elif "mask" in spec.name.lower():
                value = np.ones(shape, dtype=spec.dtype)
            else:
                value = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            raise OnnxlrError(f"cannot synthesise input {spec.name!r} of type {spec.dtype}; pass --inputs")
        feeds[spec.name] = value
    return feeds


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], source: str) -> None:
    """Raise OnnxlrError unless ``feeds`` has every model input with the right dtype, rank, fixed dims,
    and finite values, and nothing else."""
    specs = {s.name: s for s in model_inputs(model)}
    missing = [name for name in specs if name not in feeds]
    if missing:
        raise OnnxlrError(f"{source} has no array for model input {missing[0]!r} (has: {', '.join(feeds) or 'nothing'})")
    extra = [name for name in feeds if name not in specs]
    if extra:
        raise OnnxlrError(f"{source} has array {extra[0]!r}, which is not a model input (inputs: {', '.join(specs)})")
    for name, spec in specs.items():
        value = feeds[name]
        if value.dtype != spec.dtype:
            raise OnnxlrError(f"{source}: input {name!r} has dtype {value.dtype}, the model expects {spec.dtype}")
        if spec.shape and value.ndim != len(spec.shape):
            raise OnnxlrError(f"{source}: input {name!r} has shape {list(value.shape)}, the model expects rank {len(spec.shape)}")
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise OnnxlrError(f"{source}: input {name!r} has size {got} on axis {axis}, the model expects {want}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise OnnxlrError(f"{source}: input {name!r} contains NaN or Inf: {_non_finite(value)}")


def _non_finite(value: np.ndarray) -> str:
    """``"3 of 128 values are not finite (2 NaN, 1 Inf)"``."""
    nan = int(np.count_nonzero(np.isnan(value)))
    inf = int(np.count_nonzero(np.isinf(value)))
    return f"{nan + inf} of {value.size} values are not finite ({nan} NaN, {inf} Inf)"


def check_original_outputs(model, feeds: dict[str, np.ndarray], source: str,
                           threads: int | None = None, batch_size: int = 8) -> None:
    """Run ``model`` (a ModelProto, or the path of a file ONNX Runtime opens itself) on CPU over
    ``feeds`` (in batches of ``batch_size`` along axis 0) and raise OnnxlrError when it cannot run
    in this ONNX Runtime (an opset or IR version it does not take, …),
    or when an output holds NaN or Inf (:func:`check_finite_outputs`). Meant to run before any
    rewriting; ``source`` says where the inputs came from."""
    import onnxruntime as ort

    from onnxlr.runtimes.providers import default_threads, make_session
    from onnxlr.runtimes.runner import batches

    try:
        opened = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        session = make_session(opened, "CPUExecutionProvider", threads or default_threads())
        names = [o.name for o in session.get_outputs()]
        counts = {name: [0, 0, 0] for name in names}  # output -> [NaN, Inf, values] over all batches
        for batch in batches(feeds, batch_size):
            for name, value in zip(names, session.run(None, batch)):
                counts[name] = [t + c for t, c in zip(counts[name], _nonfinite(value))]
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, …)
        detail = _ORT_PREFIX.sub("", " ".join(str(exc).split()))
        raise OnnxlrError(f"the original model cannot run in ONNX Runtime {ort.__version__} on {source}: "
                          f"{detail[:300]}") from None
    _raise_if_nonfinite(counts, source)


def check_finite_outputs(outputs: dict[str, np.ndarray], source: str) -> None:
    """Raise OnnxlrError when an output of the original model holds NaN or Inf: the original is then
    broken on these inputs and no comparison against it means anything."""
    _raise_if_nonfinite({name: _nonfinite(value) for name, value in outputs.items()}, source)


def _nonfinite(value) -> list[int]:
    """[NaN count, Inf count, size] of one output."""
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        return [0, 0, value.size]
    return [int(np.count_nonzero(np.isnan(value))), int(np.count_nonzero(np.isinf(value))), value.size]


def _raise_if_nonfinite(counts: dict[str, list[int]], source: str) -> None:
    bad = [(name, c) for name, c in counts.items() if c[0] or c[1]]
    if bad:
        name, (nan, inf, size) = bad[0]
        raise OnnxlrError(f"the original model produces NaN/Inf in output {name!r} on {source} "
                          f"({nan + inf} of {size} values are not finite: {nan} NaN, {inf} Inf); "
                          f"fix the model or the inputs before compressing it")


# "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/…/file.cc:123 void ns::Function(args…) " before the message
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (\S+:\d+ [^(]*\([^)]*\) )?")


def load_npz(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays from an .npz keyed by input name, checked against the model's inputs."""
    path = Path(path)
    if not path.is_file():
        raise OnnxlrError(f"input file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise OnnxlrError(f"{path} is not an .npz file (arrays saved with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise OnnxlrError(f"{path} holds object arrays (pickles), which are not loaded") from None
        raise OnnxlrError(f"{path} is not a readable .npz file ({exc})") from None
    # NotImplementedError / RuntimeError: zip features zipfile refuses (newer versions, unknown
    # compression, patched or encrypted entries)
    except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise OnnxlrError(f"{path} is not a readable .npz file ({type(exc).__name__})") from None
    check_feeds(model, feeds, str(path))
    return feeds
