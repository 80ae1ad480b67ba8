"""docs/report.schema.json describes what Report.to_dict() really produces, and rejects what it does not.

Real reports of tiny models (the MLP of conftest.py, a small CNN for the conv factorization) from
every kind of run: low-rank with a tolerance, int8, conv decompositions, `validate`, unavailable and
mobile providers, the .ort conversion. Each goes through JSON (``to_json``) first, as a reader sees it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import api
from onnxlr.cli import main

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"
FAST = dict(repeats=2, batch_size=4)


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _as_read(report) -> dict:
    """The report as a consumer of ``--report`` reads it."""
    return json.loads(report.to_json())


def _errors(validator, data) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 3, 8, 8] -> Conv 16x3x3x3 -> Relu -> Conv 16x16x3x3 -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm 16->10 -> y[batch, 10]."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_normal((16, 3, 3, 3)) * 0.3, "w2": rng.standard_normal((16, 16, 3, 3)) * 0.1,
               "w3": rng.standard_normal((16, 10)) * 0.3, "b3": np.zeros(10)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "tiny_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_schema_is_valid_draft_2020_12(validator):
    assert validator.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_lowrank_report_with_tolerance_and_providers_matches(validator, mlp_path, sample_x):
    x = sample_x(16)
    _, report = api.optimize(mlp_path, calib={"x": sample_x(32, seed=1)}, rank_ratio=0.5, inputs={"x": x},
                             max_error="rel_l2=10", providers="cpu,openvino,nnapi", **FAST)
    data = _as_read(report)
    assert _errors(validator, data) == []
    assert data["schema_version"] == 2 and data["passed"] is True
    providers = {p["provider"]: p for p in data["validation"]["providers"]}
    assert providers["CPUExecutionProvider"]["latency_optimized"]["median_ms"] > 0
    assert providers["CPUExecutionProvider"]["profile"] is not None
    # providers this build lacks are reported, not run; NNAPI / CoreML get the static check
    assert providers["NnapiExecutionProvider"]["available"] is False
    assert {c["target"] for c in data["validation"]["mobile"]} == {"NNAPI", "CoreML MLProgram", "CoreML NeuralNetwork"}
    assert {c["action"] for p in data["passes"] for c in p["layers"]} <= {"rewritten", "skipped"}


def test_int8_and_conv_reports_match(validator, tmp_path):
    model = tiny_cnn()
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    inputs = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    _, conv = api.optimize(model, calib=calib, rank_ratio=0.5, conv="auto", rank_multiple=1, inputs=inputs, **FAST)
    data = _as_read(conv)
    assert _errors(validator, data) == []
    rewritten = [c for p in data["passes"] if p["name"] == "factorize_conv" for c in p["layers"]
                 if c["action"] == "rewritten"]
    assert rewritten and all(isinstance(c["details"]["ranks"], list) for c in rewritten)
    _, int8 = api.optimize(model, recipe="lowrank+int8", calib=calib, inputs=inputs, **FAST)
    assert _errors(validator, _as_read(int8)) == []
    _, dry = api.optimize(model, rank_ratio=0.5, validate=False)
    data = _as_read(dry)
    assert data["validation"] is None and _errors(validator, data) == []


def test_validate_and_ort_reports_from_the_cli_match(validator, tmp_path, mlp_path, sample_x):
    np.savez(tmp_path / "x.npz", x=sample_x(8))
    out, ort_json, val_json = tmp_path / "small.onnx", tmp_path / "o.json", tmp_path / "v.json"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--rank-ratio", "0.5", "--ort", "--inputs",
                 str(tmp_path / "x.npz"), "--repeats", "2", "--report", str(ort_json)]) == 0
    data = json.loads(ort_json.read_text())
    assert _errors(validator, data) == []
    assert data["written"] is True and data["ort_format"]["ok"] is True
    assert main(["validate", str(mlp_path), str(out), "--repeats", "2", "--report", str(val_json)]) == 0
    data = json.loads(val_json.read_text())
    assert _errors(validator, data) == [] and data["passes"] == [] and data["written"] is False


def test_wrong_reports_fail_validation(validator, mlp_path, sample_x):
    _, report = api.optimize(mlp_path, rank_ratio=0.5, inputs={"x": sample_x(8)}, **FAST)
    good = _as_read(report)
    assert _errors(validator, good) == []

    def broken(edit) -> list[str]:
        data = copy.deepcopy(good)
        edit(data)
        return _errors(validator, data)

    cpu = lambda d: d["validation"]["providers"][0]  # noqa: E731
    assert broken(lambda d: d["original"].update(params="61706"))  # a count as a string
    assert broken(lambda d: d.pop("passed"))  # a required field missing
    assert broken(lambda d: d.update(schema_version=1))  # another version of the schema
    assert broken(lambda d: d.update(extra=1))  # unknown top-level field
    assert broken(lambda d: d["passes"][0]["layers"][0].update(action="changed"))  # not an action
    assert broken(lambda d: cpu(d)["outputs"][0].update(cosine_min=None))
    assert broken(lambda d: cpu(d)["latency_original"].pop("p90_ms"))
    assert broken(lambda d: cpu(d)["profile"].update(total_ms=[1.0]))  # not an (original, optimized) pair
    assert broken(lambda d: cpu(d).update(available=False))  # not run, yet no reason and latencies
    assert broken(lambda d: d["validation"]["mobile"].append(
        {"target": "NNAPI", "original": {}, "optimized": {}, "warnings": []}))
    # pass-specific details may carry anything, but the common keys keep their types
    assert not broken(lambda d: d["passes"][0]["layers"][0]["details"].update(something_new={"a": 1}))
    assert broken(lambda d: d["passes"][0]["layers"][0]["details"].update(rank="8"))


def test_non_finite_numbers_are_written_as_null(validator, mlp_path, sample_x):
    """An all-zero reference makes rel_l2 infinite: the JSON stays strict (no Infinity) and valid."""
    _, report = api.optimize(mlp_path, rank_ratio=0.5, inputs={"x": sample_x()}, repeats=1)
    output = report.validation.providers[0].outputs[0]
    output.rel_l2, output.max_abs = float("inf"), float("nan")
    text = report.to_json()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert data["validation"]["providers"][0]["outputs"][0]["rel_l2"] is None
    assert _errors(validator, data) == []


def test_a_model_that_grew_is_flagged_but_not_its_metadata():
    """Provenance metadata and an opset upgrade add a few hundred bytes to any result (411 bytes on PP-OCR
    det's 9.9 MB): that is no alarm; a result 5% larger than the original is."""
    from onnxlr.pipeline import PassRecord
    from onnxlr.report import ModelSummary, Report

    original, passes = ModelSummary(1000, 9_929_594, 218), [PassRecord("flush_denormals", {})]
    assert Report(original, ModelSummary(1000, 9_930_005, 218), passes).alarms == []
    [alarm] = Report(original, ModelSummary(1050, 10_426_000, 218), passes).alarms
    assert alarm.startswith("the model grew: 9,929,594 -> 10,426,000 bytes")
