"""FactorizeEmbedding: exact at full rank, frequency weighting favours the rows that are looked up."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.passes.factorize_embedding import FactorizeEmbedding, FactorizeEmbeddingConfig
from onnxlr.pipeline import PassManager

V, D = 50, 12


def embedding_model(tied=False, axis=0):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["e"], name="embed", axis=axis)]
    e_shape = ["batch", "seq", D] if axis == 0 else [V, "batch", "seq"]
    outputs = [helper.make_tensor_value_info("e", TensorProto.FLOAT, e_shape)]
    if tied:
        nodes.append(helper.make_node("MatMul", ["x", "T"], ["y"], name="tied"))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, D]))
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
    if tied:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, V]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(table, "T")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_full_rank_is_exact_and_names_are_readable():
    model = embedding_model()
    out, records = PassManager([FactorizeEmbedding(FactorizeEmbeddingConfig(rank_ratio=1.0, force=True))]).run(model)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Gather", "MatMul"]
    assert sorted(t.name for t in out.graph.initializer) == ["T/lr_A", "T/lr_B"]
    ids = np.random.default_rng(1).integers(0, V, size=(3, 7))
    np.testing.assert_allclose(run(out, {"ids": ids}), run(model, {"ids": ids}), atol=1e-5)
    assert records[0].rewritten[0].details["params_after"] == D * (V + D)


def test_frequency_weighting_reconstructs_frequent_tokens_better():
    model = embedding_model()
    frequent = np.arange(5)
    ids = np.tile(frequent, (40, 4))  # calibration text uses only 5 tokens
    optimized, report = onnxlr.optimize(model, calib=[{"ids": ids}], embeddings=True, ranks={"embed": 3},
                                        validate=False)
    plain, _ = onnxlr.optimize(model, embeddings=True, ranks={"embed": 3}, validate=False)
    change = report.passes[-1].rewritten[0]
    assert change.details["method"] == "frequency-weighted svd" and "calib_error" in change.details
    probe = {"ids": frequent[None, :]}
    ref = run(model, probe)
    weighted_err = np.linalg.norm(run(optimized, probe) - ref)
    plain_err = np.linalg.norm(run(plain, probe) - ref)
    assert weighted_err < 0.5 * plain_err


def test_tied_and_column_gathers_are_skipped_with_reasons():
    _, records = PassManager([FactorizeEmbedding(FactorizeEmbeddingConfig(rank_ratio=0.1))]).run(embedding_model(tied=True))
    assert "tied" in records[0].skipped[0].reason
    _, records = PassManager([FactorizeEmbedding(FactorizeEmbeddingConfig(rank_ratio=0.1))]).run(embedding_model(axis=1))
    assert "axis 1" in records[0].skipped[0].reason


def test_embedding_pass_only_runs_when_asked(tmp_path):
    model = embedding_model()
    out, report = onnxlr.optimize(model, rank_ratio=0.1, validate=False)
    assert [r.name for r in report.passes] == ["factorize_matmul"]
    assert [n.op_type for n in out.graph.node] == ["Gather"]
    with pytest.raises(onnxlr.OnnxlrError, match="no factorizable"):
        onnxlr.optimize(model, ranks={"embed": 3}, validate=False)  # the table is not a MatMul weight
