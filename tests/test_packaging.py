"""The wheel installs in a fresh virtual environment and its CLI works there.

This proves the package-dir mapping (passes/ -> onnxlr.passes, runtimes/ -> onnxlr.runtimes,
models/ -> onnxlr.models) and the declared core dependencies outside the editable checkout.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_optimizes_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    wheel = next(dist.glob("onnxlr-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True)
    cli = venv / "bin" / "onnxlr"
    help_text = subprocess.run([str(cli), "--help"], check=True, capture_output=True, text=True).stdout
    assert "optimize" in help_text and "inspect" in help_text

    W = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])],
                              [numpy_helper.from_array(W, "W")])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    out = tmp_path / "m.small.onnx"
    run = subprocess.run([str(cli), "optimize", str(model), "-o", str(out), "--rank-ratio", "0.25",
                          "--dim", "batch=4", "--repeats", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "speed-up" in run.stdout
    onnx.checker.check_model(onnx.load(out))
    # the installed package is the wheel's, not the checkout's
    where = subprocess.run([str(py), "-c", "import onnxlr.passes as p; print(p.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(venv) in where
