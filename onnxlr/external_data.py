"""Tensors kept in external data files: finding them, their extent in their files, their bytes, and
writing a model's large tensors into one aligned data file.

A model loaded *mapped* (:func:`onnxlr.io.load_model`) keeps its external tensors in their files, with
absolute locations; :func:`materialize` gives a copy with the data loaded, and
:func:`write_external_data` copies them chunk by chunk into the output's data file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import onnx
import onnx.numpy_helper
from onnx import external_data_helper

# Tensors of at least this many bytes go to the data file when external data is written (onnx's
# default); each starts at a multiple of EXTERNAL_DATA_ALIGNMENT so it can be memory-mapped in place.
EXTERNAL_SIZE_THRESHOLD = 1024
EXTERNAL_DATA_ALIGNMENT = 4096
COPY_CHUNK = 64 * 1024**2


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def is_mapped(model: onnx.ModelProto) -> bool:
    """Whether ``model`` was loaded mapped: some tensor still refers to a data file."""
    return any(external_data_helper.uses_external_data(t) for t in iter_tensors(model.graph))


def external_extent(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """``(location, offset, length)`` of an externally stored tensor."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info.get("length", -1))


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors kept in external data files."""
    return sum(max(external_extent(t)[2], 0) for t in iter_tensors(model.graph)
               if external_data_helper.uses_external_data(t))


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the data of mapped tensors (absolute external locations) loaded in."""
    if not is_mapped(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    for tensor in iter_tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            _load_mapped(tensor)
    return model


def _load_mapped(tensor: onnx.TensorProto) -> None:
    """Read a mapped tensor's bytes into it (it no longer refers to a file)."""
    location, offset, length = external_extent(tensor)
    with open(location, "rb") as source:
        source.seek(offset)
        tensor.raw_data = source.read(length)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's tensors (initializers and Constant attributes), in memory or in
    external data files."""
    total = 0
    for tensor in iter_tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            total += max(external_extent(tensor)[2], 0)
        elif tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += tensor.ByteSize()
    return total


def write_external_data(model: onnx.ModelProto, data_path: Path) -> None:
    """Move every tensor of at least EXTERNAL_SIZE_THRESHOLD bytes of ``model`` (modified) into
    ``data_path``, in graph order, each at an aligned offset. Tensors already external (mapped) are
    copied from their files chunk by chunk, so the model never needs to fit in memory; the bytes
    written are the same whether a tensor was in memory or mapped."""
    with open(data_path, "wb") as out:
        for tensor in iter_tensors(model.graph):
            mapped = external_data_helper.uses_external_data(tensor)
            if mapped and external_extent(tensor)[2] < EXTERNAL_SIZE_THRESHOLD:  # small: inline, as in memory
                _load_mapped(tensor)
                mapped = False
            if not mapped and tensor.data_type == onnx.TensorProto.STRING:
                continue
            if not mapped and not tensor.HasField("raw_data"):
                if tensor.ByteSize() < EXTERNAL_SIZE_THRESHOLD:
                    continue
                tensor.raw_data = onnx.numpy_helper.to_array(tensor).tobytes()
                for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(name)
            if not mapped and len(tensor.raw_data) < EXTERNAL_SIZE_THRESHOLD:
                continue
            offset = -out.tell() % EXTERNAL_DATA_ALIGNMENT + out.tell()
            out.write(b"\0" * (offset - out.tell()))
            if mapped:
                location, start, length = external_extent(tensor)
                with open(location, "rb") as source:
                    source.seek(start)
                    left = length
                    while left > 0:
                        chunk = source.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{location} ended before tensor {tensor.name!r}")
                        out.write(chunk)
                        left -= len(chunk)
            else:
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
