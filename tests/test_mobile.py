"""NNAPI / CoreML usability (ORT's static checker) and ORT-format conversion, on tiny models."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import api
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.runtimes.mobile import OrtConversion, Partitioning, convert_to_ort, friendliness_warnings, usability

TARGETS = ["NNAPI", "CoreML MLProgram", "CoreML NeuralNetwork"]


def chain(middle: list[str], batch: int | str = 4) -> onnx.ModelProto:
    """x[batch, 8] -> MatMul -> Add -> <middle ops, each x -> x> -> MatMul -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["t"])]
    for i, op in enumerate(middle):
        nodes.append(helper.make_node(op, [nodes[-1].output[0]], [f"t{i}"]))
    nodes.append(helper.make_node("MatMul", [nodes[-1].output[0], "W"], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def by_target(results: list[Partitioning]) -> dict[str, Partitioning]:
    assert [r.target for r in results] == TARGETS
    return {r.target: r for r in results}


def test_supported_chain_is_one_partition():
    nnapi = by_target(usability(chain(["Relu"])))["NNAPI"]
    assert nnapi.partitions == 1
    assert nnapi.nodes == nnapi.supported_nodes > 0
    assert nnapi.supported_share == 1.0
    assert nnapi.unsupported_ops == []
    assert nnapi.suitability == "YES"


def test_unsupported_op_splits_the_partition():
    # Sign is in none of ORT's supported-op lists, and keeps the shape fixed
    results = by_target(usability(chain(["Relu", "Sign", "Relu"])))
    for target in TARGETS:
        assert results[target].partitions == 2
        assert results[target].unsupported_ops == ["ai.onnx:Sign"]
        assert results[target].supported_share < 1.0
        assert results[target].suitability in ("MAYBE", "NO")


def test_dynamic_shapes_block_nodes_unless_assumed_fixed():
    as_is = by_target(usability(chain(["Relu"], batch="N")))["NNAPI"]
    assert as_is.partitions == 0 and as_is.nodes_unsupported_due_to_dynamic_shape == as_is.nodes
    assert as_is.suitability == "NO"
    fixed = by_target(usability(chain(["Relu"], batch="N"), assume_fixed_shapes=True))["NNAPI"]
    assert fixed.partitions == 1 and fixed.nodes_unsupported_due_to_dynamic_shape == 0


def test_transpose_without_perm_does_not_crash_the_checker():
    # ORT's checker reads Transpose's attribute[0] unconditionally
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert by_target(usability(model))["NNAPI"].partitions == 1
    assert not model.graph.node[0].attribute  # the caller's model is untouched


def test_bytes_and_path_agree_and_model_is_untouched(tmp_path):
    model = chain(["Relu", "Sign", "Relu"])
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(before)
    from_proto, from_bytes, from_path = usability(model), usability(before), usability(path)
    assert from_bytes == from_path == from_proto
    assert usability(str(path)) == from_path
    assert model.SerializeToString() == before and path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # nothing left beside the model


def test_missing_model_file(tmp_path):
    with pytest.raises(OnnxlrError, match="not found"):
        usability(tmp_path / "nope.onnx")


def test_friendliness_warnings_name_what_got_worse():
    original, optimized = usability(chain(["Relu"])), usability(chain(["Relu", "Sign", "Relu"]))
    warnings = friendliness_warnings(original, optimized)
    assert len(warnings) == 3
    nnapi = next(w for w in warnings if w.startswith("NNAPI:"))
    assert "Sign" in nnapi and "1 -> 2 partitions" in nnapi and "YES -> MAYBE" in nnapi
    assert friendliness_warnings(original, usability(chain(["Relu"]))) == []
    assert friendliness_warnings(optimized, original) == []  # better is not a warning


def test_friendliness_warnings_each_criterion():
    old = Partitioning("NNAPI", 10, 10, 1, [], 0, "YES")
    assert friendliness_warnings([old], [Partitioning("NNAPI", 10, 9, 1, [], 1, "YES")]) == \
        ["NNAPI: supported nodes 100% -> 90%"]
    assert friendliness_warnings([old], [Partitioning("NNAPI", 12, 12, 1, [], 0, "YES")]) == []
    [line] = friendliness_warnings([old], [Partitioning("NNAPI", 11, 10, 1, ["ai.onnx:Einsum"], 0, "YES")])
    assert "new unsupported ops ai.onnx:Einsum" in line
    assert friendliness_warnings([old], [Partitioning("CoreML MLProgram", 10, 0, 0, [], 0, "NO")]) == []


@pytest.mark.parametrize("runtime_optimizations", [False, True])
def test_convert_to_ort_runs_like_the_onnx_model(tmp_path, runtime_optimizations):
    model = chain(["Relu", "Sign", "Relu"])
    source = tmp_path / "m.onnx"
    source.write_bytes(model.SerializeToString())
    before = source.read_bytes()
    target = tmp_path / "m.ort"
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    result = convert_to_ort(source, target, runtime_optimizations=runtime_optimizations, feeds={"x": x})
    assert isinstance(result, OrtConversion)
    assert result.ok, result.reason
    assert result.path == target and target.stat().st_size == result.bytes > 0
    assert result.max_abs_diff <= 1e-5
    assert source.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.ort"]  # no temporary file left
    # the file really is ORT format and gives the ONNX model's outputs
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    got = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_convert_to_ort_from_proto_with_synthetic_feeds(tmp_path):
    model = chain(["Relu"])
    before = model.SerializeToString()
    result = convert_to_ort(model, tmp_path / "m.ort")
    assert result.ok and result.max_abs_diff <= 1e-5
    assert model.SerializeToString() == before


def test_convert_to_ort_bad_output_folder(tmp_path):
    with pytest.raises(OnnxlrError, match="output folder does not exist"):
        convert_to_ort(chain(["Relu"]), tmp_path / "missing" / "m.ort")
    with pytest.raises(OnnxlrError, match="is a folder"):
        convert_to_ort(chain(["Relu"]), tmp_path)


def test_convert_to_ort_reports_a_model_ort_rejects(tmp_path):
    model = chain(["Relu"])
    model.graph.node[-1].input[0] = "undefined"  # reads a tensor nothing defines
    result = convert_to_ort(model.SerializeToString(), tmp_path / "m.ort")
    assert not result.ok and result.reason.startswith("conversion failed:") and "\n" not in result.reason
    assert os.listdir(tmp_path) == []


# --- in validation and the CLI --------------------------------------------------------------------

def test_validation_checks_mobile_targets_and_warns_when_the_rewrite_is_less_friendly(tmp_path):
    """Asked for nnapi (not in this build), validation runs ORT's static check on both models at the
    shapes validated with, and warns that the 'optimized' model splits the NNAPI partition."""
    original, worse = chain(["Relu", "Relu", "Relu"], batch="n"), chain(["Relu", "Sign", "Relu"], batch="n")
    feeds = {"x": np.ones((4, 8), np.float32)}
    report = api.validate(original, worse, providers="cpu,nnapi", inputs=feeds, repeats=1)
    v = report.validation
    nnapi = next(c for c in v.mobile if c.target == "NNAPI")
    # shapes fixed to the validation batch: nothing is blocked by the dynamic batch dimension
    assert nnapi.original.partitions == 1 and nnapi.original.nodes_unsupported_due_to_dynamic_shape == 0
    assert nnapi.optimized.partitions == 2 and nnapi.optimized.unsupported_ops == ["ai.onnx:Sign"]
    assert any(w.startswith("NNAPI:") and "Sign" in w for w in v.warnings)
    assert not next(p for p in v.providers if p.provider == "NnapiExecutionProvider").available
    text = report.format()
    assert "NNAPI (static check, not run): 1 partition" in text and "warning: NNAPI" in text
    assert api.validate(original, original, providers="cpu", inputs=feeds, repeats=1).validation.mobile == []


def test_cli_writes_a_checked_ort_copy(capsys, tmp_path, mlp_path):
    out = tmp_path / "small.onnx"
    report = tmp_path / "r.json"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--rank-ratio", "0.5", "--ort", "--repeats", "2",
                 "--report", str(report)]) == 0
    ort_file = out.with_suffix(".ort")
    assert ort_file.stat().st_size > 0 and f"and {ort_file}" in capsys.readouterr().out
    data = json.loads(report.read_text())["ort_format"]
    assert data["ok"] and data["path"] == str(ort_file) and data["max_abs_diff"] < 1e-4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind
