"""Providers, the standalone runner, devices reached through a command prefix, per-node profiles.

OpenVINO is validated for real through a second virtual environment holding onnxruntime-openvino
(``make test`` builds it and sets ``ONNXLR_OPENVINO_PYTHON``); CUDA where a GPU build is present.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxlr import api
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.runtimes import devices, profiling, providers, runner
from onnxlr.runtimes.devices import Device

OPENVINO_PYTHON = os.environ.get("ONNXLR_OPENVINO_PYTHON")
needs_openvino = pytest.mark.skipif(
    not OPENVINO_PYTHON, reason="needs ONNXLR_OPENVINO_PYTHON: a Python with onnxruntime-openvino (make test builds one)")


@pytest.fixture
def models(tmp_path, mlp_proto):
    """The tiny MLP and a rank-8 factorization of it, as bytes, with 20 samples."""
    optimized, _ = api.optimize(mlp_proto, rank_ratio=0.35, validate=False)
    x = np.random.default_rng(0).standard_normal((20, 32)).astype(np.float32)
    return {"original": mlp_proto.SerializeToString(), "optimized": optimized.SerializeToString()}, {"x": x}


def test_runner_outputs_equal_a_direct_session(models):
    blobs, feeds = models
    response = runner.run(blobs, feeds, providers=["CPUExecutionProvider"], batch_size=8, repeats=3, profile_runs=2)
    (result,) = response["results"]
    assert result["available"] and not result["reason"]
    for label, blob in blobs.items():
        direct = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        ran = result["models"][label]
        np.testing.assert_allclose(ran["outputs"]["y"], direct, rtol=1e-5, atol=1e-6)
        assert ran["latency"]["runs"] == 3 and ran["latency"]["median_ms"] > 0
        # per-node profile, by ORT's node names (fc1 + its bias Add fused: "fused fc1/MatMulAddFusion")
        assert {"fc1", "fc2"} <= {profiling.graph_node_name(n) for n in ran["nodes"]}
        assert all(n["provider"] == "CPUExecutionProvider" and n["ms"] >= 0 for n in ran["nodes"].values())
    assert "fc1/lr_A" in result["models"]["optimized"]["nodes"]
    assert response["onnxruntime"] == ort.__version__


def test_runner_all_and_missing_providers(models):
    blobs, feeds = models
    response = runner.run(blobs, feeds, providers=runner.ALL, repeats=1)
    assert [r["provider"] for r in response["results"]] == ort.get_available_providers()
    for r in response["results"]:
        ran = r["provider"] not in runner.NOT_DEVICES
        assert bool(r["models"]) is ran and (r["reason"] == "") is ran
    missing = runner.run(blobs, feeds, providers=["NoSuchExecutionProvider"], repeats=1)["results"][0]
    assert not missing["available"] and missing["models"] == {}


def test_a_model_failing_on_a_provider_is_reported_not_raised(models):
    blobs, feeds = models
    (result,) = runner.run({**blobs, "broken": b"not a model"}, feeds, providers=["CPUExecutionProvider"],
                           repeats=1)["results"]
    assert result["failed"] == "broken" and result["reason"]


def test_encode_decode_round_trip_keeps_names_dtypes_and_order():
    outputs = {"z/last:0": np.arange(6, dtype=np.int64).reshape(2, 3), "a": np.array([True, False]),
               "half": np.ones((1, 2), np.float16), "scalar": np.float32(3.5)}
    response = {"onnxruntime": "x", "results": [{"provider": "P", "models": {"m": {"outputs": outputs,
                                                                                   "latency": {"median_ms": 1.0}}}}]}
    text = json.dumps(runner.encode(response))
    back = runner.decode(json.loads(text))["results"][0]["models"]["m"]
    assert list(back["outputs"]) == list(outputs) and back["latency"] == {"median_ms": 1.0}
    for name, array in outputs.items():
        assert back["outputs"][name].dtype == np.asarray(array).dtype
        np.testing.assert_array_equal(back["outputs"][name], array)


def test_runner_script_needs_neither_onnxlr_nor_its_folder(tmp_path, models):
    """Copied anywhere, the runner runs by itself and writes JSON with outputs and latencies."""
    blobs, feeds = models
    (tmp_path / "a.onnx").write_bytes(blobs["original"])
    np.savez(tmp_path / "x.npz", **feeds)
    script = tmp_path / "runner.py"
    shutil.copy(runner.__file__, script)
    probe = ("import runpy,sys; sys.argv=%r; g=runpy.run_path(%r, run_name='onnxlr_runner'); "
             "assert g['main'](sys.argv[1:]) == 0; "
             "assert not [m for m in sys.modules if m.startswith('onnxlr')], 'imported onnxlr'"
             % (["runner", str(tmp_path / "a.onnx"), "--inputs", str(tmp_path / "x.npz"), "--providers",
                 "CPUExecutionProvider", "--repeats", "2", "--out", str(tmp_path / "r.json")], str(script)))
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path)
    result = runner.decode(json.loads((tmp_path / "r.json").read_text()))["results"][0]
    ran = result["models"]["a.onnx"]
    assert ran["latency"]["runs"] == 2
    expected = ort.InferenceSession(blobs["original"], providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(ran["outputs"]["y"], expected, rtol=1e-5, atol=1e-6)


def test_device_through_another_python_equals_local(models):
    blobs, feeds = models
    kwargs = dict(providers=["CPUExecutionProvider"], repeats=2, profile_runs=1)
    here = Device.parse("local").run(blobs, feeds, **kwargs)["results"][0]
    there = Device.parse(sys.executable).run(blobs, feeds, **kwargs)["results"][0]
    for label in blobs:
        np.testing.assert_array_equal(here["models"][label]["outputs"]["y"], there["models"][label]["outputs"]["y"])
    assert set(there["models"]["optimized"]["nodes"]) == set(here["models"]["optimized"]["nodes"])


def _fake_remote_shell(tmp_path: Path, name: str) -> Path:
    """A stand-in for ssh/adb: drops the host word and runs the rest through ``sh -c`` as one string,
    the way a remote shell receives ssh's arguments (so the runner's code must arrive shell-quoted)."""
    script = tmp_path / name
    script.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_device_through_a_remote_shell_prefix(tmp_path, models):
    blobs, feeds = models
    ssh = _fake_remote_shell(tmp_path, "ssh")
    device = Device.parse(f"{ssh} user@board {sys.executable}")
    assert device.argv()[-1].startswith("'")  # quoted for the remote shell
    response = device.run(blobs, feeds, providers=["CPUExecutionProvider"], repeats=1)
    assert response["results"][0]["models"]["original"]["outputs"]["y"].shape == (20, 24)


def test_device_prefix_without_python_gets_python3():
    assert Device.parse("ssh pi@board").command == ("ssh", "pi@board", "python3")
    assert Device.parse("adb shell /data/local/tmp/python3.11").command[-1] == "/data/local/tmp/python3.11"
    assert devices.parse_devices(["local", "ssh b", "ssh b"]) == [Device("local"), Device.parse("ssh b")]


def test_device_errors_are_one_line(tmp_path, models):
    blobs, feeds = models
    with pytest.raises(OnnxlrError, match="command 'no-such-command-xyz' not found"):
        Device.parse("no-such-command-xyz").run(blobs, feeds, providers=["CPUExecutionProvider"])
    bare = tmp_path / "venv-without-ort"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    with pytest.raises(OnnxlrError, match="did not run the models .*No module named"):
        Device.parse(str(bare / "bin" / "python")).run(blobs, feeds, providers=["CPUExecutionProvider"])
    with pytest.raises(OnnxlrError, match="malformed --device"):
        Device.parse("ssh 'unclosed")


def test_cli_validate_on_a_device(capsys, tmp_path, mlp_path, models):
    blobs, _ = models
    optimized = tmp_path / "opt.onnx"
    optimized.write_bytes(blobs["optimized"])
    report = tmp_path / "r.json"
    code = main(["validate", str(mlp_path), str(optimized), "--providers", "all", "--device", sys.executable,
                 "--repeats", "2", "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"device {sys.executable} (onnxruntime {ort.__version__})" in out and "device local" in out
    results = json.loads(report.read_text())["validation"]["providers"]
    listed = [(r["device"], r["provider"]) for r in results]
    for device in ("local", sys.executable):
        assert [p for d, p in listed if d == device] == ort.get_available_providers()
    ran = [r for r in results if r["available"]]
    assert {r["device"] for r in ran} == {"local", sys.executable}
    assert {r["status"] for r in ran} == {"ran"}
    assert all(r["status"] == "not_a_device" for r in results if r["provider"] == "AzureExecutionProvider")
    assert all(r["profile"]["layers"] and r["outputs"][0]["rel_l2"] < 0.5 for r in ran)


# --- OpenVINO, for real, from its own environment ------------------------------------------------

@needs_openvino
def test_openvino_from_its_own_venv(tmp_path, mlp_path, models):
    blobs, feeds = models
    optimized = tmp_path / "opt.onnx"
    optimized.write_bytes(blobs["optimized"])
    report = api.validate(mlp_path, optimized, providers="all", devices=[OPENVINO_PYTHON], inputs=feeds, repeats=3)
    by_key = {(p.device, p.provider): p for p in report.validation.providers}
    local_cpu = by_key[("local", "CPUExecutionProvider")]
    ov = by_key[(OPENVINO_PYTHON, "OpenVINOExecutionProvider")]
    assert ov.available and not ov.reason, ov.reason
    assert ov.onnxruntime != "" and ov.options["device_type"] == "CPU"
    assert ov.latency_original.median_ms > 0 and ov.latency_optimized.median_ms > 0
    # the same factorization error on OpenVINO as on ONNX Runtime's CPU provider
    assert ov.outputs[0].rel_l2 == pytest.approx(local_cpu.outputs[0].rel_l2, rel=1e-3, abs=1e-5)
    # OpenVINO compiles the graph into its own subgraph nodes: the profile says where nodes ran
    assert "OpenVINOExecutionProvider" in ov.profile.placement["optimized"]
    assert ("local", "OpenVINOExecutionProvider") not in by_key  # 'all' is each build's own providers


@needs_openvino
def test_openvino_options_reach_the_provider(models):
    blobs, feeds = models
    response = Device.parse(OPENVINO_PYTHON).run(
        blobs, feeds, providers=["OpenVINOExecutionProvider"],
        provider_options={"OpenVINOExecutionProvider": {"device_type": "NO_SUCH_DEVICE"}}, repeats=1)
    result = response["results"][0]
    assert result["failed"] == "original" and "NO_SUCH_DEVICE" in result["reason"]
    assert "fell back to CPU" in result["reason"]  # ORT would have run it all on the CPU, silently


# --- an emulated ARM64 device (QEMU user mode) ---------------------------------------------------

ARM64_PYTHON = os.environ.get("ONNXLR_ARM64_PYTHON")
needs_arm64 = pytest.mark.skipif(
    not ARM64_PYTHON, reason="needs ONNXLR_ARM64_PYTHON: the emulated ARM64 Python (make test builds .arm64)")


def test_this_machine_is_not_emulated():
    assert runner.emulation() == ""


@needs_arm64
def test_the_emulated_arm64_device_compares_outputs_and_times_nothing(tmp_path, mlp_path, models):
    """ARM's kernels run the models (their outputs count: a result must agree there too), but an emulated
    CPU's times are not the device's: no latency, no speed-up, and the report says why."""
    blobs, feeds = models
    optimized = tmp_path / "opt.onnx"
    optimized.write_bytes(blobs["optimized"])
    report = api.validate(mlp_path, optimized, devices=[ARM64_PYTHON], inputs=feeds, repeats=3)
    by_device = {p.device: p for p in report.validation.providers if p.provider == "CPUExecutionProvider"}
    local, arm = by_device["local"], by_device[ARM64_PYTHON]
    assert arm.emulated.startswith("qemu-aarch64") and not local.emulated
    assert arm.latency_original is None and arm.speedup is None and local.speedup > 0
    assert arm.outputs[0].rel_l2 == pytest.approx(local.outputs[0].rel_l2, rel=1e-4, abs=1e-7)
    assert f"emulated ({arm.emulated}): outputs compared, latency not measured" in report.format()
    written = report.to_dict()["validation"]["providers"]
    assert [p["emulated"] for p in written if p["device"] == ARM64_PYTHON] == [arm.emulated]


@needs_arm64
def test_an_int8_model_agrees_on_arm_kernels(tmp_path, mlp_path):
    """ARM's integer kernels (no VNNI; other u8/s8 paths) give the int8 result the x86 ones give."""
    calib = {"x": np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)}
    inputs = {"x": np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)}
    int8, _ = api.optimize(mlp_path, recipe="int8", calib=calib, validate=False)
    path = tmp_path / "int8.onnx"
    onnx.save(int8, path)
    response = Device.parse(ARM64_PYTHON).run({"model": path.read_bytes()}, inputs, providers=["CPUExecutionProvider"])
    arm = response["results"][0]["models"]["model"]["outputs"]["y"]
    local = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    assert response["emulated"].startswith("qemu-aarch64")
    np.testing.assert_allclose(arm, local, rtol=0, atol=1e-4 * float(np.abs(local).max()))


# --- CUDA where present ---------------------------------------------------------------------------

@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime build has no CUDA provider (install onnxruntime-gpu on a GPU machine)")
def test_cuda_provider_runs_with_its_options(mlp_path, models):
    blobs, feeds = models
    report = api.validate(mlp_path, mlp_path, providers="cuda:device_id=0", inputs=feeds, repeats=3)
    (cuda,) = report.validation.providers
    assert cuda.available and not cuda.reason and cuda.options == {"device_id": "0"}
    assert cuda.outputs[0].max_abs < 1e-4


# --- provider registry ----------------------------------------------------------------------------

def test_provider_specs_with_options():
    specs = providers.parse_provider_specs("cpu, cuda:device_id=1, openvino:device_type=GPU:precision=FP16, cpu")
    assert [(s.name, s.options) for s in specs] == [
        ("CPUExecutionProvider", {}), ("CUDAExecutionProvider", {"device_id": "1"}),
        ("OpenVINOExecutionProvider", {"device_type": "GPU", "precision": "FP16"})]
    assert providers.parse_provider_specs("all,cpu")[0].name == providers.ALL
    assert providers.parse_providers("all") == providers.local_devices()
    assert "AzureExecutionProvider" not in providers.local_devices()
    with pytest.raises(OnnxlrError, match="malformed provider option 'device_id' in 'cuda:device_id'"):
        providers.parse_provider_specs("cuda:device_id")
    with pytest.raises(OnnxlrError, match="'all' takes no options"):
        providers.parse_provider_specs("all:x=1")
    assert providers.resolve_provider("FutureExecutionProvider") == "FutureExecutionProvider"


def test_registry_lists_every_provider_onnxruntime_knows():
    rows = providers.registry()
    names = [r["name"] for r in rows]
    assert set(ort.get_all_providers()) <= set(names)
    assert all(r["in_build"] == (r["name"] in ort.get_available_providers()) for r in rows)
    openvino = next(r for r in rows if r["name"] == "OpenVINOExecutionProvider")
    assert "onnxruntime-openvino" in openvino["package"] and "device_type" in openvino["defaults"]
    assert "install onnxruntime-gpu" in providers.missing_reason("CUDAExecutionProvider") or \
        "CUDAExecutionProvider" in ort.get_available_providers()


def test_cli_providers_lists_the_build(capsys):
    assert main(["providers"]) == 0
    out = capsys.readouterr().out
    assert "CPUExecutionProvider" in out and "in this build" in out and "onnxruntime-openvino" in out
    assert main(["providers", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} >= set(ort.get_all_providers())


# --- profiles -------------------------------------------------------------------------------------

def _node(op, ms, provider="CPUExecutionProvider"):
    return {"op": op, "ms": ms, "provider": provider}


def test_profile_summary_maps_rewritten_layers():
    original = {"fused fc1/MatMulAddFusion": _node("MatMul", 2.0), "relu": _node("Relu", 0.1), "fc2": _node("Gemm", 1.0)}
    optimized = {"fc1/lr_A": _node("MatMul", 0.4), "fc1": _node("MatMul", 0.5), "relu": _node("Relu", 0.1),
                 "fc2": _node("Gemm", 1.0)}
    summary = profiling.summarize(original, optimized, "CPUExecutionProvider")
    (layer,) = summary.layers
    assert layer.node == "fc1" and layer.before_ms == 2.0 and layer.after_ms == pytest.approx(0.9)
    assert layer.after_nodes == ["fc1", "fc1/lr_A"]
    assert summary.by_op["MatMul"] == (2.0, 0.9) and summary.total_ms == pytest.approx((3.1, 2.0))
    assert profiling.fallback_warning(summary, "CPUExecutionProvider") == ""
    assert profiling.graph_node_name("fused a/b/SomeFusion") == "a/b" and profiling.graph_node_name("x/y") == "x/y"


def test_fallback_warning_when_the_rewrite_leaves_more_to_the_cpu():
    ep = "XnnpackExecutionProvider"
    original = {"fc1": _node("MatMul", 1.0, ep), "fc2": _node("Gemm", 1.0, ep)}
    optimized = {"fc1/q": _node("DequantizeLinear", 0.2), "fc1": _node("MatMul", 0.5, ep), "fc2": _node("Gemm", 1.0, ep)}
    summary = profiling.summarize(original, optimized, ep)
    warning = profiling.fallback_warning(summary, ep)
    assert "1 of 3 nodes on the CPU fallback (original: 0 of 2)" in warning and "DequantizeLinear" in warning
    assert profiling.fallback_warning(profiling.summarize(original, original, ep), ep) == ""


def test_validation_profile_shows_each_rewritten_layer(mlp_path, models):
    blobs, feeds = models
    report = api.validate(mlp_path, onnx.load_from_string(blobs["optimized"]), inputs=feeds, repeats=2)
    (cpu,) = report.validation.providers
    layers = {t.node: t for t in cpu.profile.layers}
    assert set(layers) == {"fc1", "fc2"}
    assert all(t.before_ms > 0 and t.after_ms > 0 and len(t.after_nodes) == 2 for t in layers.values())
    text = report.format()
    assert "profile: kernels" in text and "fc1" in text.split("profile: kernels")[1]


def test_validate_does_not_touch_the_model_files(tmp_path, mlp_path, models):
    blobs, feeds = models
    before = mlp_path.read_bytes()
    api.validate(mlp_path, onnx.load_from_string(blobs["optimized"]), inputs=feeds, repeats=1, devices=[sys.executable])
    assert mlp_path.read_bytes() == before and onnx.load(mlp_path).graph.node
