"""Data-aware FactorizeMatMul through the public API: exactness, the calibrated objective, bias folding."""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import message_lines
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.errors import OnnxlrError


def correlated_inputs(n, k=32, seed=0):
    """Strongly correlated, non-centred inputs: where data-aware methods differ from plain SVD."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * (0.7 ** np.arange(k))[:, None]
    return (rng.standard_normal((n, k)) @ mix + 0.5).astype(np.float32)


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("method", ["svd", "whitened", "fisher", "asvd", "isvt"])
def test_every_method_is_exact_at_full_rank(mlp_proto, method):
    calib = [{"x": correlated_inputs(64, seed=1)}]
    optimized, report = onnxlr.optimize(mlp_proto, calib=calib, method=method, rank_ratio=1.0, force=True,
                                        validate=False)
    assert {c.details["method"] for c in report.pass_named("factorize_matmul").rewritten} == {method}
    x = correlated_inputs(16, seed=2)
    np.testing.assert_allclose(run(optimized, x), run(mlp_proto, x), rtol=1e-3, atol=1e-4)


def test_whitened_beats_svd_on_the_calibrated_output_error(mlp_proto):
    calib = [{"x": correlated_inputs(256, seed=1)}]
    errors = {}
    for method in ("svd", "whitened", "asvd", "isvt"):
        optimized, report = onnxlr.optimize(mlp_proto, calib=calib, method=method, ranks={"fc1": 4, "fc2": 4},
                                            validate=False)
        x = correlated_inputs(256, seed=1)  # measured on the calibration data: the objective itself
        ref = run(mlp_proto, x)
        errors[method] = np.linalg.norm(run(optimized, x) - ref) / np.linalg.norm(ref)
        assert all("calib_error" in c.details for c in report.pass_named("factorize_matmul").rewritten)
    assert errors["whitened"] < errors["svd"]
    assert errors["whitened"] <= errors["asvd"] * 1.001
    assert errors["isvt"] == pytest.approx(errors["whitened"], rel=1e-3)


def test_plain_svd_needs_no_calibration_and_data_aware_methods_do(mlp_proto):
    _, report = onnxlr.optimize(mlp_proto, rank_ratio=0.5, validate=False)
    assert {c.details["method"] for c in report.pass_named("factorize_matmul").rewritten} == {"svd"}
    with pytest.raises(OnnxlrError, match="needs calibration data"):
        onnxlr.optimize(mlp_proto, method="whitened", rank_ratio=0.5, validate=False)


def _matmul_model(bias: str):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 12)).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    if bias == "add":
        inits.append(numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="bias"))
    else:
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias", ["add", "none"])
def test_mean_error_is_folded_into_the_bias(bias):
    model = _matmul_model(bias)
    x = correlated_inputs(512, k=16, seed=3) + 2.0  # a large mean makes the correction matter
    optimized, _ = onnxlr.optimize(model, calib=[{"x": x}], method="asvd", ranks={"mm": 3}, validate=False)
    ops = [n.op_type for n in optimized.graph.node]
    if bias == "add":
        assert ops.count("Add") == 1  # folded into the existing bias constant
    else:
        assert ops.count("Add") == 1 and "Relu" in ops  # a new Add before the Relu
    no_fold, _ = onnxlr.optimize(model, calib=[{"x": x}], method="asvd", ranks={"mm": 3}, validate=False,
                                 bias_correction=False)
    pre = lambda m: run(m, x)  # noqa: E731
    if bias == "add":
        mean_err = np.abs((pre(optimized) - pre(model)).mean(axis=0)).max()
        mean_err_without = np.abs((pre(no_fold) - pre(model)).mean(axis=0)).max()
        assert mean_err < 1e-3 < mean_err_without


def test_cli_calibrated_optimize_and_its_errors(mlp_path, tmp_path, capsys):
    from onnxlr.cli import main

    good = tmp_path / "calib.npz"
    np.savez(good, x=correlated_inputs(40, seed=5))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--calib", str(good), "--calib-samples", "24",
                 "--rank-ratio", "0.25", "--repeats", "2", "--dim", "batch=4"]) == 0
    text = capsys.readouterr().out
    assert "method: whitened" in text and "output err" in text and out.exists()

    bad = tmp_path / "bad.npz"
    np.savez(bad, y=correlated_inputs(8))
    cases = [
        (["--method", "whitened"], "needs calibration data"),
        (["--calib", str(bad)], "no array for model input 'x'"),
        (["--calib", str(tmp_path / "missing.npz")], "not found"),
        (["--calib", str(good), "--calib-samples", "0"], "--calib-samples"),
    ]
    for extra, needle in cases:
        target = tmp_path / "never.onnx"
        code = main(["optimize", str(mlp_path), "-o", str(target), "--rank-ratio", "0.5", *extra])
        err = message_lines(capsys.readouterr().err)
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
        assert not target.exists()


def test_fisher_accepts_a_one_shot_generator_of_batches(mlp_proto):
    batches = ({"x": correlated_inputs(16, seed=s)} for s in range(3))
    _, report = onnxlr.optimize(mlp_proto, calib=batches, method="fisher", ranks={"fc1": 4, "fc2": 4},
                                validate=False)
    assert {c.details["method"] for c in report.pass_named("factorize_matmul").rewritten} == {"fisher"}
