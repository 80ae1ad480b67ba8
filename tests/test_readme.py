"""The README's quick start, run as written on a fresh copy of the repository.

The copy holds what a clone holds (the files git tracks, plus new ones not ignored); a fresh virtual
environment gets onnxlr through the README's own install command (``pip install -e .``); then every code
block of the quick start runs in order, shell blocks with bash and Python blocks with that
environment's Python, from the copy's root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block between "## Quick start" and the next section."""
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def install_command(readme: str) -> str:
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    (command,) = [line.split("#")[0].strip() for line in section.splitlines() if line.strip().startswith("pip install")]
    return command


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "onnxlr"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the files a clone would hold are unknown")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


@pytest.mark.slow
def test_the_quick_start_runs_as_written_on_a_fresh_clone(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = quick_start_blocks(readme)
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash", "python"]
    clone = _clone(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    install = install_command(readme)
    assert install == "pip install -e ."
    subprocess.run(["bash", "-ec", install + " -q"], cwd=clone, env=env, check=True)
    outputs = []
    for lang, code in blocks:
        command = ["bash", "-ec", code] if lang == "bash" else [str(venv / "bin" / "python"), "-c", code]
        run = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        assert run.returncode == 0, f"{lang} block failed:\n{code}\n{run.stdout}\n{run.stderr}"
        outputs.append(run.stdout)
    # what the quick start promises: the layers listed with their 90%/99% energy ranks, an int8 model
    # written within the tolerance, smaller, with the report page beside it
    assert "r@90%" in outputs[0] and "MatMul" in outputs[0]
    assert "tolerance top-1 agreement (last axis) >= 0.98: PASSED" in outputs[2]
    assert "share of equal elements" in outputs[2]  # the int64 label, compared by agreement
    written = clone / "model.int8.onnx"
    onnx.checker.check_model(str(written), full_check=True)
    assert written.stat().st_size < 0.7 * (clone / "model.onnx").stat().st_size
    assert (clone / "report.html").stat().st_size > 10_000
    assert "PASSED" in outputs[3]
    with np.load(clone / "calib.npz") as calib, np.load(clone / "samples.npz") as held_out:
        assert calib["input"].shape[1] == held_out["input"].shape[1] == 64
    # the onnxlr that ran is the fresh clone's, not this checkout's
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import onnxlr.passes; print(onnxlr.passes.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(clone))
