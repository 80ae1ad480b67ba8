"""Reading and writing ONNX models safely.

- The input file is only ever opened for reading.
- External data is loaded only from inside the model's own folder: a location that is absolute,
  climbs out with ``..`` or resolves (through symlinks) outside the folder is refused; onnx itself
  also refuses data files that are symbolic links.
- Outputs are written atomically: everything goes to a temporary file in the destination folder,
  which is renamed over the destination only once complete and checked.
- Tensors above :data:`EXTERNAL_DATA_THRESHOLD` in total are written as external data automatically,
  since a protobuf cannot exceed 2 GB.
- A model with external data can be loaded *mapped* (``load_model(path, mapped=True)``): its tensors
  stay in their files, each read through a memory map when a pass asks for it (:mod:`onnxlr.graph`),
  and :func:`save_model` copies them chunk by chunk into the output's data file. In such a model the
  external locations are absolute paths (onnx and ONNX Runtime refuse those: :func:`materialize`
  gives a copy with the data loaded).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxlr.errors import OnnxlrError

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # a margin under protobuf's 2 GiB limit
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


def load_model(path: str | os.PathLike, *, mapped: bool = False) -> onnx.ModelProto:
    """Load an ONNX model and its external data (if any) into memory; with ``mapped``, leave external
    data in its files (their locations made absolute, see the module docstring).

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
    if external and mapped:
        check_input(model, path, by_path=True)
        for tensor in external:
            _check_extent(tensor, base_dir, path)
            entry = next(e for e in tensor.external_data if e.key == "location")
            entry.value = str((base_dir / entry.value).resolve())
        return model
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (ValueError, OSError, onnx.checker.ValidationError) as exc:
            raise OnnxlrError(f"{path}: cannot read external data: {' '.join(str(exc).split())[:200]}") from None
    check_input(model, path)
    return model


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps any tensor in an external data file."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (OSError, DecodeError, RuntimeError, ValueError):
        return False  # load_model reports what is wrong with it
    return is_mapped(model)


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


def _check_extent(tensor: onnx.TensorProto, base_dir: Path, path: Path) -> None:
    """The tensor's bytes lie inside its data file (a mapped read past the end would crash)."""
    location, offset, length = external_extent(tensor)
    size = (base_dir / location).stat().st_size
    expected = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * int(np.prod(tensor.dims))
    if length < 0:
        length = size - offset
    if offset < 0 or offset + length > size or length != expected:
        raise OnnxlrError(f"{path}: tensor {tensor.name!r} needs {expected} bytes at offset {offset} of "
                          f"{location}, which holds {size}")


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the data of mapped tensors (absolute external locations) loaded in."""
    if not is_mapped(model):
        return model
    model = _copy(model)
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


def files_of(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it names (existing ones), for overwrite checks."""
    path = Path(path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: only the file itself is at stake
        return [path]
    locations = {entry.value for t in iter_tensors(model.graph) for entry in t.external_data if entry.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations) if (path.parent / loc).is_file())]


def check_input(model: onnx.ModelProto, path: Path, *, by_path: bool = False) -> None:
    """Refuse a model that is not valid ONNX (the checks every output must pass) as a user error,
    before onnxlr rewrites it and the output check blames onnxlr: strings that are not UTF-8,
    tensors whose data does not fill their shape, undefined inputs, unknown ops."""
    try:
        _decode_strings(model.graph)
        if by_path or model.ByteSize() > EXTERNAL_DATA_THRESHOLD:  # external data unloaded, or too big
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
        None (default) to decide by size (external above ~2 GB, and for a mapped model).
    check : run onnx.checker and shape inference before anything is renamed into place.

    Returns the destination path.
    """
    path = Path(path)
    folder = output_folder(path)
    if external_data is None:  # a mapped model stays external: embedding it would load it whole
        external_data = is_mapped(model) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:  # the conversion below rewrites tensors in place: work on a copy
        model = _copy(model)
    else:
        model = materialize(model)  # mapped tensors, if any, are embedded

    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            try:
                write_external_data(model, tmp_dir / data_name)
            except OSError as exc:
                raise _write_error(path, exc) from None
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
