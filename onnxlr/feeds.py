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
    """``["batch=8", "input:1=512"]`` -> ``{"batch": 8, "input:1": 512}``: a symbolic dimension by name,
    or an input's axis by ``INPUT:AXIS`` (for dimensions an exporter left unnamed); OnnxlrError if
    malformed."""
    dims = {}
    for item in items or []:
        match = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*", item)
        if not match or int(match.group(2)) < 1:
            raise OnnxlrError(f"malformed --dim {item!r}: expected NAME=POSITIVE_INTEGER or INPUT:AXIS=POSITIVE_INTEGER, "
                              f"e.g. batch=8 or input:1=512")
        dims[match.group(1)] = int(match.group(2))
    return dims


def free_dim(input_name: str, axis: int, dim, dims: dict[str, int], default: int = 1) -> int:
    """The size a free dimension of an input takes: ``dims["INPUT:AXIS"]``, else ``dims[its name]``,
    else ``default``."""
    return dims.get(f"{input_name}:{axis}", dims.get(dim, default) if isinstance(dim, str) else default)


def check_dims(model: onnx.ModelProto, dims: dict[str, int] | None) -> None:
    """OnnxlrError for a ``--dim`` that names no symbolic dimension and no free axis of an input."""
    specs = {s.name: s for s in model_inputs(model)}
    named = {d for s in specs.values() for d in s.shape if isinstance(d, str)}
    for key in dims or {}:
        name, sep, axis = key.rpartition(":")
        if sep and name in specs and axis.isdigit():
            shape = specs[name].shape
            if int(axis) >= len(shape) or isinstance(shape[int(axis)], int):
                raise OnnxlrError(f"--dim {key}: input {name!r} has no free axis {axis} (its shape is {shape})")
        elif key not in named:
            free = [f"{s.name}:{i}" for s in specs.values() for i, d in enumerate(s.shape) if not isinstance(d, int)]
            raise OnnxlrError(f"--dim {key}: no symbolic dimension or input axis of that name (named: "
                              f"{', '.join(sorted(named)) or 'none'}; free axes: {', '.join(free) or 'none'})")


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch every input fixes on its axis 0 (an export with a static batch), or None."""
    leading = {s.shape[0] if s.shape else None for s in model_inputs(model)}
    return leading.pop() if len(leading) == 1 and isinstance(next(iter(leading)), int) else None


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
        shape = [d if isinstance(d, int) else free_dim(spec.name, axis, d, dims) for axis, d in enumerate(spec.shape)]
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
    batch = fixed_batch(model)
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
            if axis == 0 and batch and got % batch == 0 and got:
                continue  # samples stacked on a fixed batch axis: run ``batch`` at a time
            if isinstance(want, int) and got != want:
                raise OnnxlrError(f"{source}: input {name!r} has size {got} on axis {axis}, the model expects {want}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise OnnxlrError(f"{source}: input {name!r} contains NaN or Inf: {_non_finite(value)}")


def _non_finite(value: np.ndarray) -> str:
    """``"3 of 128 values are not finite (2 NaN, 1 Inf)"``."""
    nan = int(np.count_nonzero(np.isnan(value)))
    inf = int(np.count_nonzero(np.isinf(value)))
    return f"{nan + inf} of {value.size} values are not finite ({nan} NaN, {inf} Inf)"


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


def synthetic_caveat(model: onnx.ModelProto, dims: dict[str, int] | None) -> str:
    """What synthetic inputs do not show, said where the report names the data it compared on."""
    specs = model_inputs(model)
    unset = sorted({f"{s.name}:{i}" for s in specs for i, d in enumerate(s.shape)
                    if not isinstance(d, int) and f"{s.name}:{i}" not in (dims or {}) and d not in (dims or {})})
    guessed = [s.name for s in specs if np.issubdtype(s.dtype, np.integer) and not s.shape
               and "mask" not in s.name.lower()]
    notes = ["random values: no evidence of accuracy on real data, give --inputs"]
    if unset:
        notes.append(f"free dimensions at 1 ({', '.join(unset[:4])}{' …' if len(unset) > 4 else ''}: set them with --dim)")
    if guessed:
        notes.append(f"integer scalar{'s' if len(guessed) > 1 else ''} {', '.join(map(repr, guessed))} drawn from "
                     "{0, 1}: give real values in --inputs")
    return " — " + "; ".join(notes)


def sample_inputs(model: onnx.ModelProto, inputs=None, dims: dict[str, int] | None = None,
                  seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Feeds to validate on and a label saying where they came from: ``inputs`` (an .npz path or a dict
    keyed by input name, checked against the model), or synthetic ones (:func:`synthetic_feeds`)."""
    check_dims(model, dims)
    if inputs is None:
        label = "synthetic inputs" + (f" ({', '.join(f'{k}={v}' for k, v in dims.items())})" if dims else "")
        return synthetic_feeds(model, dict(dims or {}), seed=seed), label + synthetic_caveat(model, dims)
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        feeds = {k: np.asarray(v) for k, v in inputs.items()}
        check_feeds(model, feeds, "inputs")
        return feeds, "given inputs"
    return load_npz(inputs, model), str(inputs)
