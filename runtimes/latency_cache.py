"""On-disk cache of latency measurements, shared by the latency guard and the latency table.

Timings depend on the machine and the runtime, so entries are keyed by a sha256 over the provider,
the onnxruntime version, the CPU model and the intra-op thread count, plus what was measured (the
layer's shapes). A second run, or another model with the same layer shapes, then measures nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort

CACHE_DIR = Path(os.environ.get("ONNXLR_CACHE", Path.home() / ".cache" / "onnxlr"))


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measurement_key(provider: str, threads: int, *what) -> str:
    """sha256 (hex) of ``[provider, onnxruntime version, CPU model, threads, *what]`` as JSON.

    ``what`` is anything JSON can encode (non-JSON values go through ``str``): the shapes and
    attributes that decide how long the measured layer runs.
    """
    blob = json.dumps([provider, ort.__version__, cpu_model(), threads, *what], default=str, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class DiskCache:
    """A JSON object ``key -> value`` kept in a file: read once, changed in memory, written by ``save``.

    path : the JSON file, or None for a cache that lives in memory only. A missing or damaged file is
        an empty cache: losing it only costs measuring again.

    ``save`` merges the entries the file holds by then (a concurrent run may have added some; on the
    same key ours win) and replaces the file atomically, so a reader never sees half a file.
    """

    def __init__(self, path: Path | str | None):
        self.path = None if path is None else Path(path)
        self._data = self._read()

    def get(self, key: str, default=None):
        return self._data.get(key, default)

    def put(self, key: str, value) -> None:
        """Set ``key`` in memory; ``save`` writes it to disk."""
        self._data[key] = value

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = {**self._read(), **self._data}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self) -> dict:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing, unreadable or not JSON
            return {}
        return data if isinstance(data, dict) else {}
