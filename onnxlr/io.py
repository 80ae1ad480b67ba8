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

import numpy as np
import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxlr.errors import OnnxlrError
from onnxlr.external_data import (external_extent, is_mapped, iter_tensors, materialize, tensor_bytes,
                                  write_external_data)

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # a margin under protobuf's 2 GiB limit


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


def open_model(model: "str | os.PathLike | onnx.ModelProto", *, mapped: bool = False) -> tuple[onnx.ModelProto, str]:
    """The model and its path ("" for a ModelProto, checked for versions this onnx reads); ``mapped``: a
    file with external data stays in its files (:func:`load_model`)."""
    if isinstance(model, onnx.ModelProto):
        check_versions(model)
        return model, ""
    return load_model(model, mapped=mapped), str(model)


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps any tensor in an external data file."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (OSError, DecodeError, RuntimeError, ValueError):
        return False  # load_model reports what is wrong with it
    return is_mapped(model)


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
        tmp_model = _write_checked(model, tmp_dir / path.name, tmp_dir / data_name if external_data else None,
                                   check, path)
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


def _write_checked(model: onnx.ModelProto, target: Path, data: Path | None, check: bool, destination: Path) -> Path:
    """Write ``model`` (its large tensors into ``data`` when given) to ``target`` and check the file;
    errors name ``destination``, where it is going."""
    try:
        if data is not None:
            write_external_data(model, data)
        onnx.save_model(model, str(target))
    except OSError as exc:
        raise _write_error(destination, exc) from None
    if check:
        if data is not None:
            onnx.checker.check_model(str(target))
            onnx.shape_inference.infer_shapes_path(str(target), check_type=True, strict_mode=True)
        else:
            check_model(model)
    return target


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


def check_output_path(path: str | os.PathLike, source: str | os.PathLike) -> None:
    """OnnxlrError when writing ``path`` (or its ``<name>.data``) would overwrite the model ``source``
    or an external data file it reads: same path, symlink, hard link or ``..`` spelling."""
    for target in (Path(path), Path(f"{path}.data")):
        for used in files_of(source):
            if target.resolve() == used.resolve() or target.exists() and used.exists() and os.path.samefile(target, used):
                if used == Path(source):
                    raise OnnxlrError(f"output path {path} is the input model; choose another path")
                raise OnnxlrError(f"writing {path} would overwrite the input's external data {used.name}; "
                                  "choose another path")


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


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file renamed over it; a full disk
    or an unwritable folder is an OnnxlrError and leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(data, encoding="utf-8") if isinstance(data, str) else tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OnnxlrError(f"no space left on the device holding {path.parent}; {path} not written") from None
        raise OnnxlrError(f"cannot write {path}: {exc.strerror or exc}") from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
