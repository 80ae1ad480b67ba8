"""FactorizeMatMul on small hand-built graphs, checked against ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager

FULL = FactorizeMatMulConfig(rank_ratio=1.0, force=True)


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def factorize(model, config=FULL):
    out, records = PassManager([FactorizeMatMul(config)]).run(model)
    onnx.checker.check_model(out, full_check=True)
    return out, records[0]


def make_model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


@settings(max_examples=60, deadline=None)
@given(
    trans_a=st.integers(0, 1), trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([1.0, 0.0, 0.3]),
    bias=st.sampled_from(["none", "vector", "row", "matrix", "scalar"]),
    m=st.integers(1, 6), k=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 1000),
)
def test_gemm_full_rank_is_exact_for_every_attribute_combination(trans_a, trans_b, alpha, beta, bias, m, k, n, seed):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(B, "W")]
    inputs = ["x", "W"]
    if bias != "none":
        shape = {"vector": (n,), "row": (1, n), "matrix": (m, n), "scalar": ()}[bias]
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    x_shape = [k, m] if trans_a else [m, k]
    model = make_model([node], [vi("x", x_shape)], [vi("y", [m, n])], inits)
    out, record = factorize(model)
    assert [c.action for c in record.layers] == ["rewritten"]
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
    x = rng.standard_normal(x_shape).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape", [[5, 16], [2, 3, 16], [2, 1, 3, 16]])
def test_matmul_full_rank_is_exact_with_batched_inputs(x_shape):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 10)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", x_shape)], [vi("y", x_shape[:-1] + [10])], [numpy_helper.from_array(W, "W")])
    out, record = factorize(model)
    assert record.layers[0].action == "rewritten"
    names = {t.name for t in out.graph.initializer}
    assert names == {"W/lr_A", "W/lr_B"}  # readable factor names; the dense weight is gone
    x = rng.standard_normal(x_shape).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_float16_weights_keep_their_dtype_and_stay_close():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((16, 12)).astype(np.float16)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", [4, 16], TensorProto.FLOAT16)], [vi("y", [4, 12], TensorProto.FLOAT16)],
                       [numpy_helper.from_array(W, "W")])
    out, _ = factorize(model)
    assert all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer)
    x = rng.standard_normal((4, 16)).astype(np.float16)
    np.testing.assert_allclose(run(out, {"x": x})[0].astype(np.float32), run(model, {"x": x})[0].astype(np.float32),
                               rtol=2e-2, atol=5e-2)


def two_layer_model(k=32, h=24, n=20, shared=False, seed=0):
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((k, h)).astype(np.float32)
    inits = [numpy_helper.from_array(W1, "W1")]
    if shared:  # the same square weight used twice
        W1 = rng.standard_normal((k, k)).astype(np.float32)
        inits = [numpy_helper.from_array(W1, "W1")]
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "W1"], ["y"], name="mm2")]
        return make_model(nodes, [vi("x", ["batch", k])], [vi("y", ["batch", k])], inits)
    W2 = rng.standard_normal((h, n)).astype(np.float32)
    inits.append(numpy_helper.from_array(W2, "W2"))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", ["batch", k])], [vi("y", ["batch", n])], inits)


def test_shared_weight_is_factorized_once_and_stays_exact():
    model = two_layer_model(shared=True)
    out, record = factorize(model)
    assert len(record.rewritten) == 2
    assert sorted(t.name for t in out.graph.initializer) == ["W1/lr_A", "W1/lr_B"]
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_rank_that_saves_nothing_is_skipped_with_the_reason_unless_forced():
    model = two_layer_model()  # 32x24: break-even 13.7
    _, record = factorize(model, FactorizeMatMulConfig(rank_ratio=0.75))
    assert {c.node: c.action for c in record.layers} == {"mm1": "skipped", "mm2": "skipped"}
    skip = next(c for c in record.layers if c.node == "mm1")
    assert "break-even" in skip.reason and skip.details["rank"] == 18
    _, forced = factorize(model, FactorizeMatMulConfig(rank_ratio=0.75, force=True))
    assert all(c.action == "rewritten" for c in forced.layers)


def test_energy_rule_and_per_layer_overrides():
    model = two_layer_model()
    _, record = factorize(model, FactorizeMatMulConfig(energy=0.5, ranks={"mm2": 3, "W1": 5}))
    ranks = {c.node: c.details["rank"] for c in record.layers}
    assert ranks == {"mm1": 5, "mm2": 3}  # overrides by weight name and by node name win
    _, by_energy = factorize(model, FactorizeMatMulConfig(energy=0.5))
    for change in by_energy.layers:
        assert change.details["energy_kept"] >= 0.5
    with pytest.raises(OnnxlrError, match="no factorizable"):
        factorize(model, FactorizeMatMulConfig(ranks={"nope": 2}))
    with pytest.raises(OnnxlrError, match="exceeds"):
        factorize(model, FactorizeMatMulConfig(ranks={"mm1": 40}))


def test_reduced_rank_output_error_matches_the_spectrum_bound():
    model = two_layer_model()
    out, record = factorize(model, FactorizeMatMulConfig(ranks={"mm2": 4}))
    change = next(c for c in record.layers if c.node == "mm2")
    assert change.action == "rewritten" and change.details["params_after"] == 4 * (24 + 20)
    W2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W2"))
    A = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W2/lr_A"))
    B = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W2/lr_B"))
    s = np.linalg.svd(W2, compute_uv=False)
    assert np.linalg.norm(W2 - A @ B) == pytest.approx(np.sqrt(np.sum(s[4:] ** 2)), rel=1e-4)


def test_unfactorizable_layers_are_skipped_with_reasons():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f(8, 8), "Wfirst"), numpy_helper.from_array(f(2, 8, 8), "W3d"),
             numpy_helper.from_array(f(8, 8), "Wtied")]
    nodes = [
        helper.make_node("MatMul", ["Wfirst", "x"], ["a"], name="weight_first"),
        helper.make_node("MatMul", ["a", "W3d"], ["b"], name="weight_3d"),
        helper.make_node("MatMul", ["x", "w_in"], ["c"], name="weight_input"),
        helper.make_node("MatMul", ["x", "Wtied"], ["d"], name="tied"),
        helper.make_node("Gather", ["Wtied", "idx"], ["e"], name="gather"),
    ]
    model = make_model(nodes, [vi("x", [8, 8]), vi("w_in", [8, 8]), vi("idx", [2], TensorProto.INT64)],
                       [vi("b", [2, 8, 8]), vi("c", [8, 8]), vi("d", [8, 8]), vi("e", [2, 8])], inits)
    out, record = factorize(model)
    reasons = {c.node: c.reason for c in record.layers}
    assert record.rewritten == []
    assert "first operand" in reasons["weight_first"]
    assert "3-D" in reasons["weight_3d"]
    assert "not a constant" in reasons["weight_input"]
    assert "also read by Gather" in reasons["tied"]
    assert len(out.graph.node) == len(model.graph.node)


def test_int_weights_are_skipped():
    W = np.ones((4, 4), dtype=np.int32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", [2, 4], TensorProto.INT32)], [vi("y", [2, 4], TensorProto.INT32)],
                       [numpy_helper.from_array(W, "W")])
    _, record = factorize(model)
    assert "not floating point" in record.layers[0].reason


def test_input_model_is_not_modified():
    model = two_layer_model()
    before = model.SerializeToString()
    factorize(model, FactorizeMatMulConfig(rank_ratio=0.1))
    assert model.SerializeToString() == before


def test_config_validation():
    with pytest.raises(OnnxlrError):
        FactorizeMatMulConfig(rank_ratio=0.5, energy=0.9)
    with pytest.raises(OnnxlrError):
        FactorizeMatMulConfig(rank_ratio=0.0)
    with pytest.raises(OnnxlrError):
        FactorizeMatMulConfig(ranks={"a": -1})
    assert FactorizeMatMulConfig(ranks={"a": 0}).ranks == {"a": 0}  # 0 keeps the layer dense
