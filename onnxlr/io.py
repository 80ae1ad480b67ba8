"""Reading and writing ONNX models safely.

- The input file is only ever opened for reading.
- External data is loaded only from inside the model's own folder: a location that is absolute,
  climbs out with ``..`` or resolves (through symlinks) outside the folder is refused; onnx itself
  also refuses data files that are symbolic links.
- Outputs are written atomically: everything goes to a temporary file in the destination folder,
  which is renamed over the destination only once complete and checked.
- Tensors above :data:`EXTERNAL_DATA_THRESHOLD` in total are written as external data automatically,
  since a protobuf cannot exceed 2 GB.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxlr.errors import OnnxlrError

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # a margin under protobuf's 2 GiB limit


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


def _check_external_location(tensor: onnx.TensorProto, base_dir: Path) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise OnnxlrError(f"tensor {tensor.name!r} is stored externally but names no file")
    if os.path.isabs(location) or Path(location).drive:
        raise OnnxlrError(
            f"tensor {tensor.name!r}: external data location {location!r} is an absolute path; "
            "only files inside the model's folder are read"
        )
    if ".." in Path(location).parts:
        raise OnnxlrError(
            f"tensor {tensor.name!r}: external data location {location!r} leaves the model's folder"
        )
    resolved = (base_dir / location).resolve()
    if not resolved.is_relative_to(base_dir.resolve()):
        raise OnnxlrError(
            f"tensor {tensor.name!r}: external data location {location!r} resolves outside the "
            "model's folder (symlink?)"
        )
    if not resolved.is_file():
        raise OnnxlrError(f"tensor {tensor.name!r}: external data file {location!r} is missing")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model and its external data (if any) into memory.

    Raises
    ------
    OnnxlrError
        when the file is missing, not an ONNX model, or its external data is missing or points
        outside the model's folder.
    """
    path = Path(path)
    if not path.exists():
        raise OnnxlrError(f"model file not found: {path}")
    if not path.is_file():
        raise OnnxlrError(f"not a file: {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxlrError(f"{path} is not a valid ONNX model ({type(exc).__name__})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise OnnxlrError(f"{path} is not an ONNX model (no graph or no nodes)")
    base_dir = path.parent
    external = [t for t in iter_tensors(model.graph) if external_data_helper.uses_external_data(t)]
    for tensor in external:
        _check_external_location(tensor, base_dir)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (ValueError, OSError, onnx.checker.ValidationError) as exc:
            raise OnnxlrError(f"{path}: cannot read external data: {' '.join(str(exc).split())[:200]}") from None
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's tensors (initializers and Constant attributes)."""
    total = 0
    for tensor in iter_tensors(model.graph):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += tensor.ByteSize()
    return total


def check_model(model: onnx.ModelProto) -> None:
    """Run onnx.checker and strict shape inference; raise ``onnx.checker.ValidationError`` if invalid."""
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Check and write ``model`` to ``path`` atomically.

    Parameters
    ----------
    model : the model to write (not modified).
    path : destination ``.onnx`` file; its folder must exist.
    external_data : True to store tensors in ``<name>.data`` beside the model, False to embed them,
        None (default) to decide by size (external above ~2 GB).
    check : run onnx.checker and shape inference before anything is renamed into place.

    Returns the destination path.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxlrError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise OnnxlrError(f"output path is a folder: {path}")
    if not os.access(folder, os.W_OK):
        raise OnnxlrError(f"output folder is not writable: {folder}")
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:  # the conversion below rewrites tensors in place: work on a copy
        model = _copy(model)

    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OnnxlrError(f"cannot write to {folder}: {exc.strerror}") from None
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
            )
        try:
            onnx.save_model(model, str(tmp_model))
        except OSError as exc:
            raise OnnxlrError(f"cannot write {path}: {exc.strerror}") from None
        if check:
            if external_data:
                onnx.checker.check_model(str(tmp_model))
                onnx.shape_inference.infer_shapes_path(str(tmp_model), check_type=True, strict_mode=True)
            else:
                check_model(model)
        # Data file first: the model file only appears once everything it refers to is in place.
        if (tmp_dir / data_name).exists():  # absent when no tensor was large enough to move out
            os.replace(tmp_dir / data_name, folder / data_name)
        os.replace(tmp_model, path)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
    return path


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
