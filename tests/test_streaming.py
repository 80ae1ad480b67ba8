"""Streamed processing of external-data models (onnxlr.io mapped load, onnxlr.graph spill) gives the
same bytes as processing the model in memory, and never loads the whole model."""

import filecmp

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import api, graph, io
from onnxlr.errors import OnnxlrError


def _mlp(path, widths=(96, 256, 512, 128), seed=0):
    """An MLP (MatMul + bias Add + Relu) with every weight in ``path``.data."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}")]
        prev = f"a{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


@pytest.mark.parametrize("options", [{"rank_ratio": 0.25}, {"rank_ratio": 0.6}, {"energy": 0.8},
                                     {"target": "params=0.5"}, {"rank_ratio": 0.25, "workers": 2}])
def test_streamed_output_is_byte_identical_to_in_memory(tmp_path, options):
    source = _mlp(tmp_path / "mlp.onnx")
    before = source.with_suffix(".onnx.data").read_bytes()
    streamed, report = api.optimize(source, validate=False, **options)
    assert report.streamed and io.is_mapped(streamed)
    in_memory, memory_report = api.optimize(onnx.load(str(source)), validate=False, **options)
    assert not memory_report.streamed
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    api.write(streamed, tmp_path / "a" / "out.onnx", source=source, external_data=True)
    api.write(in_memory, tmp_path / "b" / "out.onnx", source=source, external_data=True)
    for name in ("out.onnx", "out.onnx.data"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    assert source.with_suffix(".onnx.data").read_bytes() == before  # the input is untouched
    assert report.optimized.params == memory_report.optimized.params < report.original.params
    # sizes before writing: the streamed one counts its file references' few bytes of metadata too
    assert report.optimized.bytes == pytest.approx(memory_report.optimized.bytes, rel=5e-3)
    # and the output is a valid model ONNX Runtime runs from its own folder
    onnx.checker.check_model(str(tmp_path / "a" / "out.onnx"))


def test_streamed_run_validates_and_keeps_factors_out_of_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "SPILL_MIN_BYTES", 1)
    source = _mlp(tmp_path / "mlp.onnx")
    optimized, report = api.optimize(source, rank_ratio=0.25, inputs=None, max_error="rel_l2=10")
    assert report.streamed and report.validation is not None and report.passed
    assert [p.status for p in report.validation.providers] == ["ran"]
    factors = [t for t in optimized.graph.initializer if "/lr_" in t.name]
    assert factors and all(t.data_location == TensorProto.EXTERNAL for t in factors)
    out = api.write(optimized, tmp_path / "out" / "small.onnx" if (tmp_path / "out").mkdir() is None else None,
                    source=source)
    reloaded = onnx.load(str(out))
    assert not io.is_mapped(reloaded) and len(reloaded.graph.initializer) == len(optimized.graph.initializer)


def test_mapped_weights_are_memory_maps_until_written(tmp_path):
    source = _mlp(tmp_path / "mlp.onnx")
    model = io.load_model(source, mapped=True)
    g = graph.import_graph(model)
    W = g.tensors()["W1"].values
    assert isinstance(W, np.memmap) and not W.flags.writeable
    np.testing.assert_array_equal(W, numpy_helper.to_array(onnx.load(str(source)).graph.initializer[2]))
    exported = graph.export_model(g, model)
    assert io.is_mapped(exported)  # the read weight went back out as its file reference


def test_a_tensor_beyond_its_data_file_is_refused(tmp_path):
    source = _mlp(tmp_path / "mlp.onnx")
    data = source.with_suffix(".onnx.data")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(OnnxlrError, match="needs .* bytes at offset"):
        io.load_model(source, mapped=True)


def test_cli_streams_an_external_data_model_and_keeps_it_external(tmp_path, capsys):
    import json

    import onnxruntime as ort

    from onnxlr.cli import main

    source = _mlp(tmp_path / "mlp.onnx")
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    assert main(["optimize", str(source), "-o", str(out), "--rank-ratio", "0.25", "--no-validate",
                 "--svd-solver", "exact", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["streamed"] is True
    assert {layer["details"]["svd_solver"] for layer in data["passes"][-1]["layers"]
            if layer["action"] == "rewritten"} == {"exact"}
    assert (tmp_path / "small.onnx.data").exists()  # a streamed input stays external
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 96), np.float32)})[0].shape == (2, 128)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "workers must be at least 1"),
    (["--executor", "dask"], "invalid choice"),
    (["--svd-solver", "lanczos"], "invalid choice"),
])
def test_cli_refuses_bad_executor_options(tmp_path, capsys, argv, message):
    from conftest import user_error_line

    source = _mlp(tmp_path / "mlp.onnx")
    line = user_error_line(capsys, ["optimize", source, "-o", tmp_path / "o.onnx", "--no-validate", *argv])
    assert message in line


def test_validate_opens_external_data_models_from_their_files(tmp_path):
    source = _mlp(tmp_path / "mlp.onnx")
    optimized, _ = api.optimize(source, rank_ratio=0.5, validate=False)
    out = api.write(optimized, tmp_path / "o" / "small.onnx" if (tmp_path / "o").mkdir() is None else None,
                    source=source)
    report = api.validate(source, out, max_error="rel_l2=10", repeats=2)
    assert report.passed and report.original.params > report.optimized.params
    assert report.original.bytes == pytest.approx(sum(f.stat().st_size for f in tmp_path.glob("mlp.onnx*")), rel=1e-3)
