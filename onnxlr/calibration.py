"""Calibration data: batches of model inputs, streamed from disk or from Python, checked against the model.

`calibration_batches` accepts these sources:

- **an .npz file** (``numpy.savez`` / ``savez_compressed``) with one array per model input, keyed by the
  input's name. All arrays share a leading *sample* axis; batches are slices of ``batch_size`` rows.
  Rows are read from the archive as they are needed (compressed or not), so the whole file is never
  held in memory at once. Two exceptions, for models with state and settings among their inputs
  (Silero VAD: ``input [batch, 512]``, ``state [2, batch, 128]``, ``sr`` a scalar):

  - a 0-d array (a scalar input such as a sample rate) has no sample axis: it is given with every batch;
  - when the model has an input whose axis 0 is a fixed size above 1 (a recurrent state with the batch
    on axis 1) and the arrays do not share a leading length, the file is **one feed**, given whole.
- **a folder of .npz files**: each file, in sorted file-name order (zero-pad numbers: ``batch_007.npz``),
  is laid out like the single .npz above and is cut into batches of ``batch_size`` rows; a batch never
  spans two files, so files may differ in their free dimensions (e.g. sequence length).
- **a folder of .npy files** named ``<input name>.npy``, one per model input: treated like one .npz
  whose arrays are the files. They are memory-mapped, so only the rows of the current batch are read.

  Other files in a folder are ignored; a folder holding both .npz and .npy files is an error.
- **a dict of arrays** (API use): treated like one .npz already in memory.
- **any other iterable** of dicts ``{input name: array}`` (API use, e.g. a generator): each dict is
  passed through as one batch, whatever its size.

Every batch is checked against the model's inputs (missing or extra arrays, dtype, rank, fixed
dimensions, NaN/Inf) and a problem raises `OnnxlrError` naming the file or batch and the input.
Object arrays (pickles) are never loaded.

`find_mask_input` picks the attention-mask input whose zeros mark padding rows that activation
statistics must skip.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.feeds import check_feeds, fixed_batch, model_inputs

Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------ public


def calibration_batches(source, model: onnx.ModelProto, *, samples: int | None = None,
                        batch_size: int = 8) -> Iterator[Batch]:
    """Batches ``{input name: array}`` read from ``source`` (see the module docstring for layouts).

    ``samples=N`` stops after N samples in total, cutting the last batch short. ``batch_size`` is the
    number of rows per batch for file sources and dicts (the last batch of each file may be smaller);
    batches from an iterable keep their own size.

    Problems with the source itself (not found, not a file or folder, empty folder, bad arguments) are
    raised at once; problems with the data (bad arrays, no samples at all) are raised while iterating.
    The returned iterator is one-shot: to read the data again, call this function again.
    """
    samples = _positive_int(samples, "samples", allow_none=True)
    batch_size = _positive_int(batch_size, "batch size")
    if isinstance(source, (str, os.PathLike)):
        chunks = _path_chunks(Path(source), model, batch_size)
        label = str(source)
    elif isinstance(source, Mapping):
        arrays = {str(k): _as_array(v, f"input {k!r}") for k, v in source.items()}
        chunks = _slice_arrays(arrays, "calibration inputs", batch_size, _whole_feeds(model))
        label = "calibration inputs"
    elif isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise OnnxlrError(f"calibration data must be a path to an .npz file or a folder, or an iterable of "
                          f"input dicts; got {type(source).__name__}")
    else:
        chunks = _iterable_chunks(source)
        label = "the calibration iterable"
    return _checked(chunks, model, samples, label)


class CalibrationSet:
    """The user's calibration data, bound to the model whose inputs it feeds, readable again and again.

    source : a path (an .npz, a folder), a dict of arrays, or an iterable of feed dicts — a one-shot
        iterator (a generator) is read into a list once, since statistics read the data several times.
    samples : read at most this many samples; ``batch_size`` : rows per batch (file and dict sources).

    Iterating yields checked batches (:func:`calibration_batches`); :meth:`batches` re-cuts them.
    Problems with the source itself are raised here, at once.
    """

    def __init__(self, source, model: onnx.ModelProto, *, samples: int | None = None, batch_size: int = 8):
        if isinstance(source, CalibrationSet):
            source = source.source
        if isinstance(source, Iterator):
            source = list(source)
        # a model exported with a fixed batch runs that many samples at a time, whatever the data's stacking
        # or the batch size a search asks for (:meth:`batches`)
        self.fixed_batch = fixed_batch(model)
        batch_size = self.fixed_batch or batch_size
        self.source, self.model, self.samples, self.batch_size = source, model, samples, batch_size
        calibration_batches(source, model, samples=samples, batch_size=batch_size)  # fail on a bad source now

    def __iter__(self) -> Iterator[Batch]:
        return calibration_batches(self.source, self.model, samples=self.samples, batch_size=self.batch_size)

    def batches(self, *, batch_size: int | None = None, samples: int | None = None) -> Iterator[Batch]:
        """The batches again, ``batch_size`` rows each (file and dict sources) and at most ``samples``
        (and at most the set's own limit)."""
        limit = min(s for s in (samples, self.samples) if s is not None) if samples or self.samples else None
        size = self.fixed_batch or batch_size or self.batch_size
        return calibration_batches(self.source, self.model, samples=limit, batch_size=size)


def find_mask_input(model: onnx.ModelProto, mask: str | None = None) -> str | None:
    """The model input that marks padding (0 = padding), or None.

    ``mask`` names it explicitly: it must be a model input of integer or bool type (OnnxlrError
    otherwise). Without it, an integer/bool input whose name contains ``attention_mask`` is chosen
    (case-insensitive), else the only integer/bool input whose name contains ``mask``; several such
    candidates, or none, give None (name it explicitly then).
    """
    specs = {s.name: s for s in model_inputs(model)}
    if mask is not None:
        if mask not in specs:
            raise OnnxlrError(f"mask input {mask!r} is not a model input (inputs: {', '.join(specs) or 'none'})")
        if not _is_int_or_bool(specs[mask].dtype):
            raise OnnxlrError(f"mask input {mask!r} has type {specs[mask].dtype}; a mask must be an integer or bool input")
        return mask
    candidates = [s.name for s in specs.values() if _is_int_or_bool(s.dtype)]
    attention = [n for n in candidates if "attention_mask" in n.lower()]
    if attention:
        return attention[0]
    masks = [n for n in candidates if "mask" in n.lower()]
    return masks[0] if len(masks) == 1 else None


# ---------------------------------------------------------------------------------------- checking


def _checked(chunks: Iterator[tuple[Batch, str]], model: onnx.ModelProto, samples: int | None,
             label: str) -> Iterator[Batch]:
    """Check each (batch, label) against the model, cut the total at ``samples``, fail if empty."""
    taken = 0
    try:
        for batch, where in chunks:
            n = _rows(batch)
            if n is None:  # one feed given whole: one sample, never cut
                n = 1
            elif samples is not None and taken + n > samples:
                batch = {k: (v[:samples - taken] if v.ndim else v) for k, v in batch.items()}
                n = samples - taken
            if n == 0:
                continue
            check_feeds(model, batch, where)
            taken += n
            yield batch
            if samples is not None and taken >= samples:
                return
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if taken == 0:
        raise OnnxlrError(f"no calibration samples in {label}")


def _rows(batch: Batch) -> int | None:
    """The number of samples in a batch: its arrays' shared leading length, scalars aside; None when they
    share none (a feed given whole)."""
    lengths = {v.shape[0] for v in batch.values() if v.ndim}
    if not lengths:
        return None
    return lengths.pop() if len(lengths) == 1 else None


def _whole_feeds(model: onnx.ModelProto) -> bool:
    """Whether files whose arrays share no leading length are one feed each (else an error): so when the
    model has an input whose axis 0 cannot be a sample axis, being a fixed size above 1."""
    return any(spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 1 for spec in model_inputs(model))


# --------------------------------------------------------------------------------------- iterables


def _iterable_chunks(source: Iterable) -> Iterator[tuple[Batch, str]]:
    for index, item in enumerate(source):
        where = f"calibration batch {index}"
        if not isinstance(item, Mapping):
            raise OnnxlrError(f"{where} is a {type(item).__name__}; expected a dict of arrays keyed by input name")
        yield {str(k): _as_array(v, f"{where}: input {k!r}") for k, v in item.items()}, where


def _as_array(value, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise OnnxlrError(f"{what} is an object array; calibration data must be numeric (no pickles)")
    return array


def _slice_arrays(arrays: Batch, label: str, batch_size: int, whole: bool) -> Iterator[tuple[Batch, str]]:
    """Rows ``[i, i + batch_size)`` of arrays that share a leading sample axis (scalars go with every batch);
    the arrays whole, as one feed, when they share none and ``whole`` allows it."""
    n = _shared_length({k: v.shape for k, v in arrays.items()}, label, whole)
    if n is None:
        yield {k: np.array(v) for k, v in arrays.items()}, f"{label} (one feed)"
        return
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield ({k: np.array(v[start:stop] if v.ndim else v) for k, v in arrays.items()},
               f"{label} (samples {start}-{stop - 1})")


def _shared_length(shapes: Mapping[str, tuple], label: str, whole: bool) -> int | None:
    """The leading length the arrays share, 0-d arrays aside; None for one feed given whole (see
    :func:`_whole_feeds`)."""
    if not shapes:
        raise OnnxlrError(f"{label} holds no arrays")
    lengths = {k: s[0] for k, s in shapes.items() if len(s)}
    if len(set(lengths.values())) == 1:
        return next(iter(lengths.values()))
    if whole or not lengths:
        return None
    detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
    raise OnnxlrError(f"{label}: arrays have different numbers of samples ({detail})")


# ------------------------------------------------------------------------------------------- paths


def _path_chunks(path: Path, model: onnx.ModelProto, batch_size: int) -> Iterator[tuple[Batch, str]]:
    """Resolve the layout now (errors at once), then return a generator over its batches."""
    if path.is_file():
        _require_npz(path)
        return _npz_chunks(path, batch_size, _whole_feeds(model))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        npz = [p for p in files if p.suffix.lower() == ".npz"]
        npy = [p for p in files if p.suffix.lower() == ".npy"]
        if npz and npy:
            raise OnnxlrError(f"calibration folder {path} mixes .npz and .npy files; use one layout")
        if npz:
            for p in npz:
                _require_npz(p)
            return _npz_folder_chunks(npz, batch_size, _whole_feeds(model))
        if npy:
            return _npy_folder_chunks(path, npy, batch_size, _whole_feeds(model))
        raise OnnxlrError(f"calibration folder {path} holds no .npz or .npy files")
    if path.exists():
        raise OnnxlrError(f"calibration data {path} is neither a file nor a folder")
    raise OnnxlrError(f"calibration data not found: {path}")


def _require_npz(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise OnnxlrError(f"{path} is not an .npz file (arrays saved with numpy.savez)")


def _npz_folder_chunks(paths: list[Path], batch_size: int, whole: bool) -> Iterator[tuple[Batch, str]]:
    for path in paths:
        yield from _npz_chunks(path, batch_size, whole)


def _npz_chunks(path: Path, batch_size: int, whole: bool) -> Iterator[tuple[Batch, str]]:
    """Stream ``batch_size`` rows at a time from every array of one .npz (or the file as one feed, see
    :func:`_shared_length`)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise OnnxlrError(f"{path} is not a readable .npz file ({exc})") from None
    with npz:
        readers = {}
        try:
            for name in npz.files:
                readers[name] = _MemberReader(npz, name, path)
            n = _shared_length({k: r.shape for k, r in readers.items()}, str(path), whole)
            if n is None:
                yield {k: r.read_all() for k, r in readers.items()}, f"{path} (one feed)"
                return
            scalars = {k: r.read_all() for k, r in readers.items() if not r.shape}
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                batch = {k: (scalars[k] if k in scalars else r.read(stop - start)) for k, r in readers.items()}
                yield batch, f"{path} (samples {start}-{stop - 1})"
        finally:
            for reader in readers.values():
                reader.close()


class _MemberReader:
    """Sequential row reader over one array of an .npz, without loading the whole array.

    Arrays that cannot be streamed (Fortran order, unusual .npy versions) are loaded whole instead.
    """

    def __init__(self, npz, name: str, path: Path):
        self.label = f"{path}: array {name!r}"
        self._stream = None
        self._whole = None
        self._offset = 0
        member = name if name in npz.zip.namelist() else name + ".npy"
        try:
            stream = npz.zip.open(member)
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                shape, fortran, dtype = None, True, None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, NotImplementedError, RuntimeError) as exc:
            raise OnnxlrError(f"{self.label} is not readable ({exc})") from None
        if dtype is not None and dtype.hasobject:
            stream.close()
            raise OnnxlrError(f"{self.label} is an object array; calibration data must be numeric (no pickles)")
        if fortran and (shape is None or len(shape) > 1):
            stream.close()
            self._whole = self._load_whole(npz, name)
            shape, dtype = self._whole.shape, self._whole.dtype
        else:
            self._stream = stream
        self.shape = tuple(shape)
        self.dtype = dtype
        self._row_shape = self.shape[1:]  # a scalar reads as one "row" of shape ()
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * dtype.itemsize

    def _load_whole(self, npz, name: str) -> np.ndarray:
        try:
            return npz[name]
        except ValueError as exc:
            if "pickle" in str(exc) or "object" in str(exc):
                raise OnnxlrError(f"{self.label} is an object array; calibration data must be numeric (no pickles)") from None
            raise OnnxlrError(f"{self.label} is not readable ({exc})") from None
        except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
            raise OnnxlrError(f"{self.label} is not readable ({type(exc).__name__})") from None

    def read_all(self) -> np.ndarray:
        """The whole array (a scalar, or every row)."""
        if not self.shape:
            return self.read(1).reshape(())
        return self.read(self.shape[0])

    def read(self, count: int) -> np.ndarray:
        """The next ``count`` rows, as a fresh writable array."""
        if self._whole is not None:
            rows = np.array(self._whole[self._offset:self._offset + count])
            self._offset += count
            return rows
        nbytes = count * self._row_bytes
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        got = 0
        try:
            while got < nbytes:
                n = self._stream.readinto(view[got:])
                if not n:
                    break
                got += n
        except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
            raise OnnxlrError(f"{self.label} is not readable ({exc})") from None
        if got < nbytes:
            raise OnnxlrError(f"{self.label} is truncated (expected {self.shape[0]} samples)")
        self._offset += count
        return np.frombuffer(buffer, dtype=self.dtype).reshape((count, *self._row_shape))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _npy_folder_chunks(folder: Path, files: list[Path], batch_size: int, whole: bool) -> Iterator[tuple[Batch, str]]:
    arrays = {}
    for path in files:
        try:
            arrays[path.stem] = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "object" in str(exc) or "pickle" in str(exc):
                raise OnnxlrError(f"{path} is an object array; calibration data must be numeric (no pickles)") from None
            raise OnnxlrError(f"{path} is not a readable .npy file ({exc})") from None
        except (OSError, EOFError) as exc:
            raise OnnxlrError(f"{path} is not a readable .npy file ({exc})") from None
    yield from _slice_arrays(arrays, str(folder), batch_size, whole)


# ------------------------------------------------------------------------------------------ helpers


def _positive_int(value, what: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OnnxlrError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _is_int_or_bool(dtype: np.dtype) -> bool:
    return dtype == np.bool_ or np.issubdtype(dtype, np.integer)
