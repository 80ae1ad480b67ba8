"""Helpers shared by the reference-model builders.

* Atomic writes: every output file is written to a temporary file in the same
  folder and then moved into place with ``os.replace``, so a reader never sees
  a half-written file, and an interrupted build leaves no truncated output.
* Cache check: each builder writes a metadata JSON *last*. It records
  ``"complete": true``, the builder's format version and the size of every
  output file. A cache entry counts as usable only if all of that still holds.
* ONNX Runtime sessions with a fixed, small thread count, so figures are
  reproducible and tests do not oversubscribe the machine.

Only the standard library and numpy are imported at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

ORT_THREADS = 2


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; move it onto ``final`` on success.

    If the body raises, the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=final.name + ".tmp.", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: Path, obj: Mapping[str, Any]) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Atomically write arrays with ``np.savez`` (no pickled objects)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops numpy appending ".npz"
            np.savez(f, **arrays)
    return Path(path)


def write_npy(path: Path, array: np.ndarray) -> Path:
    """Atomically write one array with ``np.save`` (no pickled objects)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return Path(path)


def file_sizes(paths: list[Path]) -> dict[str, int]:
    """Map each file's name to its size in bytes (recorded in the metadata)."""
    return {p.name: p.stat().st_size for p in paths}


def cached_metadata(meta_path: Path, outputs: list[Path], fmt: int) -> dict | None:
    """Return the metadata if the cache entry is complete and intact, else None.

    Complete means: the JSON parses, says ``complete``, has format version
    ``fmt``, and every output exists with the size recorded in the JSON.
    """
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("complete") is not True or meta.get("format") != fmt:
        return None
    recorded = meta.get("files", {})
    for p in outputs:
        if not p.exists() or recorded.get(p.name) != p.stat().st_size:
            return None
    return meta


def ort_session(model: str | os.PathLike | bytes, threads: int = ORT_THREADS):
    """An ONNX Runtime CPU session for a model given as a path, bytes or ModelProto."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        model = model.SerializeToString()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(session, feeds: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Run ``session`` on ``feeds`` in row batches; concatenate its first output.

    Only the feeds the model declares as inputs are passed, so a transformed
    model that dropped an input still works with the same feeds.
    """
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise KeyError(f"model inputs {missing} not in feeds {sorted(feeds)}")
    n = len(feeds[names[0]])
    outs = []
    for start in range(0, n, batch_size):
        batch = {k: np.ascontiguousarray(feeds[k][start:start + batch_size]) for k in names}
        outs.append(session.run(None, batch)[0])
    return np.concatenate(outs, axis=0)
