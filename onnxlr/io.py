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

import errno
import os
import shutil
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
        if path.stat().st_size == 0:
            raise OnnxlrError(f"{path} is empty (0 bytes), not an ONNX model")
        raise OnnxlrError(f"{path} is not an ONNX model (no graph or no nodes)")
    check_versions(model, str(path))
    base_dir = path.parent
    external = [t for t in iter_tensors(model.graph) if external_data_helper.uses_external_data(t)]
    for tensor in external:
        _check_external_location(tensor, base_dir)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (ValueError, OSError, onnx.checker.ValidationError) as exc:
            raise OnnxlrError(f"{path}: cannot read external data: {' '.join(str(exc).split())[:200]}") from None
    check_input(model, path)
    return model


def files_of(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it names (existing ones), for overwrite checks."""
    path = Path(path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: only the file itself is at stake
        return [path]
    locations = {entry.value for t in iter_tensors(model.graph) for entry in t.external_data if entry.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations) if (path.parent / loc).is_file())]


def check_input(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model that is not valid ONNX (the checks every output must pass) as a user error,
    before onnxlr rewrites it and the output check blames onnxlr: strings that are not UTF-8,
    tensors whose data does not fill their shape, undefined inputs, unknown ops."""
    try:
        _decode_strings(model.graph)
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:  # too big for the in-memory checker
            onnx.checker.check_model(str(path))
        else:
            check_model(model)
    except (UnicodeError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxlrError(f"{path} is not a valid ONNX model: {first[:200]}") from None


def _decode_strings(graph: onnx.GraphProto) -> None:
    """Check that every name in ``graph`` (subgraphs included) is UTF-8 text: protobuf hands a
    non-UTF-8 string field over as bytes, which fails only when a pass writes it into a new node."""
    names = [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    for node in graph.node:
        names += [node.name, node.op_type, node.domain, *node.input, *node.output]
        for attr in node.attribute:
            names.append(attr.name)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _decode_strings(sub)
    for name in names:
        if not isinstance(name, str):
            raise UnicodeError(f"the name {name!r} is not UTF-8 text")
        name.encode("utf-8")  # lone surrogates fail here


def check_versions(model: onnx.ModelProto, label: str = "the model") -> None:
    """Raise OnnxlrError when the model's IR version or default-domain opset is newer than the
    installed onnx supports (nothing downstream could check or rewrite it reliably)."""
    max_ir = onnx.IR_VERSION
    if model.ir_version > max_ir:
        raise OnnxlrError(f"{label} has IR version {model.ir_version}; the installed onnx {onnx.__version__} "
                          f"supports IR versions up to {max_ir}")
    max_opset = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            raise OnnxlrError(f"{label} uses ONNX opset {opset.version}; the installed onnx {onnx.__version__} "
                              f"supports opsets up to {max_opset}")


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
    folder = output_folder(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:  # the conversion below rewrites tensors in place: work on a copy
        model = _copy(model)

    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
            )
        try:
            onnx.save_model(model, str(tmp_model))
        except OSError as exc:
            raise _write_error(path, exc) from None
        if check:
            if external_data:
                onnx.checker.check_model(str(tmp_model))
                onnx.shape_inference.infer_shapes_path(str(tmp_model), check_type=True, strict_mode=True)
            else:
                check_model(model)
        # Data file first: the model file only appears once everything it refers to is in place.
        moved_data = None
        try:
            if (tmp_dir / data_name).exists():  # absent when no tensor was large enough to move out
                moved_data = folder / data_name
                os.replace(tmp_dir / data_name, moved_data)
            os.replace(tmp_model, path)
        except OSError as exc:
            if moved_data is not None and not path.exists():  # no model refers to it: do not leave it behind
                moved_data.unlink(missing_ok=True)
            raise _write_error(path, exc) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _write_error(path: Path, exc: OSError) -> OnnxlrError:
    """A one-line user error for a failed write (the caller has removed every partial file)."""
    if exc.errno == errno.ENOSPC:
        return OnnxlrError(f"no space left on the device holding {path.parent}; {path} not written")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OnnxlrError(f"cannot write {path}: {exc.strerror} (output folder not writable?)")
    return OnnxlrError(f"cannot write {path}: {exc.strerror or exc}")


def output_folder(path: str | os.PathLike) -> Path:
    """The folder ``path`` will be written into; OnnxlrError if it is missing or not writable, or if
    ``path`` is a folder itself."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxlrError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise OnnxlrError(f"output path is a folder: {path}")
    if not os.access(folder, os.W_OK):
        raise OnnxlrError(f"output folder is not writable: {folder}")
    return folder


def check_writable_folder(path: str | os.PathLike) -> None:
    """Fail early, before any slow work, when ``path``'s folder is missing or cannot take a new file.

    Creates and removes one empty temporary file there (``os.access`` is not enough: root passes it
    on a read-only file system)."""
    path = Path(path)
    folder = output_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OnnxlrError(f"no space left on the device holding {folder}") from None
        raise OnnxlrError(f"output folder is not writable: {folder} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
