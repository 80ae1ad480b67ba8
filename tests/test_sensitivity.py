"""Forward-only output sensitivity: the probe estimate against exact Jacobian diagonals on tiny models.

For out = y1 @ W2 (per row), ∂out/∂y1 is W2ᵀ on every row, so the exact per-unit sensitivity of y1
is ``rows · ‖W2[j, :]‖²``; for x feeding y1 = x @ W1 it is ``rows · ‖(W1 W2)[j, :]‖²``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes.sensitivity import output_sensitivity

K0, K, N, M = 5, 6, 8, 6  # x0 (K0) -> h (K) -> y1 (N) -> out (M)
B, S = 2, 16              # rows per batch = 32


def make_model(W1, W2, *, W0=None, tanh=False, mask=False, extra_outputs=False) -> onnx.ModelProto:
    """[W0:] x0 -> MatMul W0 -> h; x (or h) -> MatMul W1 -> y1 [-> Tanh -> t] -> MatMul W2 -> out.
    ``mask`` adds an int64 input attention_mask (B, S) that the math ignores (only extra outputs read
    it); ``extra_outputs`` adds a float output independent of the probes and an int64 output."""
    inits = [numpy_helper.from_array(np.asarray(W1, np.float32), "W1"),
             numpy_helper.from_array(np.asarray(W2, np.float32), "W2")]
    nodes = []
    first = "x"
    inputs = []
    if W0 is not None:
        inits.append(numpy_helper.from_array(np.asarray(W0, np.float32), "W0"))
        nodes.append(helper.make_node("MatMul", ["x0", "W0"], ["h"]))
        inputs.append(helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["b", "s", K0]))
        first = "h"
    else:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]))
    nodes.append(helper.make_node("MatMul", [first, "W1"], ["y1"]))
    last = "y1"
    if tanh:
        nodes.append(helper.make_node("Tanh", ["y1"], ["t"]))
        last = "t"
    nodes.append(helper.make_node("MatMul", [last, "W2"], ["out"]))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", M])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]))
    if extra_outputs:
        source = "attention_mask" if mask else first
        nodes += [helper.make_node("Cast", [source], ["as_float"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", ["as_float"], ["total"], keepdims=0),
                  helper.make_node("Shape", [first], ["shape"])]
        outputs += [helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
                    helper.make_tensor_value_info("shape", TensorProto.INT64, [3])]
    graph = helper.make_graph(nodes, "sens", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weights(seed=0, norms=None):
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((K, N)).astype(np.float32)
    W2 = rng.standard_normal((N, M))
    W2 /= np.linalg.norm(W2, axis=1, keepdims=True)
    W2 *= rng.uniform(0.7, 1.4, N)[:, None] if norms is None else np.asarray(norms)[:, None]
    return W1, W2.astype(np.float32)


def feeds(seed=0, batch=B, seq=S, name="x", dim=K):
    return {name: np.random.default_rng(100 + seed).standard_normal((batch, seq, dim)).astype(np.float32)}


def exact_y1(W2, rows):
    return rows * (W2.astype(np.float64) ** 2).sum(axis=1)


def rel_err(est, exact):
    return float(np.mean(np.abs(est / exact - 1)))


# ------------------------------------------------------------------------------------- accuracy


def test_linear_matches_exact_diagonal():
    W1, W2 = weights()
    model = make_model(W1, W2)
    batches = [feeds(0), feeds(1)]
    d = output_sensitivity(model, ["y1"], batches, probes=400)["y1"]
    assert d.shape == (N,) and d.dtype == np.float64
    err = rel_err(d, exact_y1(W2, 2 * B * S))
    assert err < 0.15, err  # measured ≈ 0.03


def test_model_input_is_perturbed_in_the_feeds():
    W1, W2 = weights()
    d = output_sensitivity(make_model(W1, W2), ["x"], [feeds(0)], probes=400)["x"]
    exact = B * S * ((W1.astype(np.float64) @ W2) ** 2).sum(axis=1)
    assert rel_err(d, exact) < 0.15  # measured ≈ 0.05


def test_ranking_of_well_separated_units():
    # squared norms 9 … 0.36, each ~1.5x the next. The noise is absolute (a fraction of the mean d),
    # so units far below the mean (e.g. a 2^7 range in squared norm) can swap ranks among themselves.
    norms = np.array([3, 2.5, 2, 1.6, 1.3, 1, 0.8, 0.6])
    W1, W2 = weights(norms=norms)
    d = output_sensitivity(make_model(W1, W2), ["y1"], [feeds(0)], probes=200)["y1"]
    np.testing.assert_array_equal(np.argsort(d), np.argsort(exact_y1(W2, B * S)))


def test_unused_unit_is_near_zero():
    W1, W2 = weights()
    W2[3] = 0.0  # unit 3 of y1 never reaches the output
    d = output_sensitivity(make_model(W1, W2), ["y1"], [feeds(0)], probes=400)["y1"]
    others = np.delete(d, 3)
    assert d[3] >= 0.0
    assert d[3] < 0.05 * others.mean()  # measured ≤ 0.017 over 20 seeds
    assert rel_err(others, np.delete(exact_y1(W2, B * S), 3)) < 0.15


def test_tensors_together_match_each_alone():
    rng = np.random.default_rng(3)
    W0 = (rng.standard_normal((K0, K)) / np.sqrt(K0)).astype(np.float32)
    W1, W2 = weights()
    W1 = (W1 / np.sqrt(K)).astype(np.float32)
    model = make_model(W1, W2, W0=W0)
    batch = [feeds(0, name="x0", dim=K0)]
    together = output_sensitivity(model, ["h", "y1"], batch, probes=400)
    alone = {name: output_sensitivity(model, [name], batch, probes=400)[name] for name in ("h", "y1")}
    exact = {"y1": exact_y1(W2, B * S), "h": B * S * ((W1.astype(np.float64) @ W2) ** 2).sum(axis=1)}
    assert list(together) == ["h", "y1"]
    for name in ("h", "y1"):
        assert rel_err(together[name], exact[name]) < 0.15
        assert rel_err(alone[name], exact[name]) < 0.15
        scale = exact[name].mean()
        assert np.max(np.abs(together[name] - alone[name])) < 0.2 * scale


def test_graph_output_itself_has_unit_sensitivity():
    W1, W2 = weights()
    d = output_sensitivity(make_model(W1, W2), ["out"], [feeds(0)], probes=400)["out"]
    assert rel_err(d, np.full(M, B * S)) < 0.15  # ∂out/∂out = I


def test_nonlinear_model_finite_nonnegative_and_close():
    W1, W2 = weights()
    W1 = (W1 / np.sqrt(K)).astype(np.float32)
    model = make_model(W1, W2, tanh=True)
    batch = feeds(0)
    d = output_sensitivity(model, ["y1", "t"], [batch], probes=400)
    for value in d.values():
        assert value.shape == (N,) and np.all(np.isfinite(value)) and np.all(value >= 0)
    y1 = batch["x"].astype(np.float64).reshape(-1, K) @ W1
    slope = 1 - np.tanh(y1) ** 2  # ∂out/∂y1 on row r = diag(slope_r) W2
    exact = (slope ** 2).sum(axis=0) * (W2.astype(np.float64) ** 2).sum(axis=1)
    assert rel_err(d["y1"], exact) < 0.2
    assert rel_err(d["t"], exact_y1(W2, B * S)) < 0.2


def pooled_model(W1, W2) -> onnx.ModelProto:
    """The linear model with out = mean over the sequence of y1 @ W2: (b, M), every token of a sample
    feeding the same outputs. Exact sensitivity of y1: batch / seq · ‖W2[j, :]‖² per batch."""
    model = make_model(W1, W2)
    graph = model.graph
    graph.node[-1].output[0] = "tokens"
    graph.node.append(helper.make_node("ReduceMean", ["tokens"], ["out"], axes=[1], keepdims=0))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", M]))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("rows, tol", [("independent", 0.12), ("shared", 0.3)])
def test_pooled_output(rows, tol):
    W1, W2 = weights()
    batches = [feeds(i, batch=16, seq=8) for i in range(4)]
    exact = 4 * 16 / 8 * (W2.astype(np.float64) ** 2).sum(axis=1)
    d = output_sensitivity(pooled_model(W1, W2), ["y1"], batches, probes=200, probe_rows=rows)["y1"]
    assert rel_err(d, exact) < tol  # measured over 10 seeds: independent 0.05, shared 0.14 (mean)


def test_shared_rows_unbiased_and_ranked():
    """Shared probes on the token-level model: no sign noise (rows reach disjoint outputs), so the
    mean over seeds converges to the exact value and well-separated units keep their order."""
    W1, W2 = weights(norms=np.array([3, 2.5, 2, 1.6, 1.3, 1, 0.8, 0.6]))
    model = make_model(W1, W2)
    exact = exact_y1(W2, B * S)
    runs = [output_sensitivity(model, ["y1"], [feeds(0)], probes=200, seed=s, probe_rows="shared")["y1"]
            for s in range(16)]
    assert rel_err(np.mean(runs, axis=0), exact) < 0.12  # 0.085 measured; 0.047 with 40 seeds
    np.testing.assert_array_equal(np.argsort(np.mean(runs, axis=0)), np.argsort(exact))


# ---------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("rows", ["independent", "shared"])
def test_deterministic_for_a_seed(rows):
    W1, W2 = weights()
    model = make_model(W1, W2)
    a = output_sensitivity(model, ["y1"], [feeds(0)], probes=16, seed=7, probe_rows=rows)["y1"]
    b = output_sensitivity(model, ["y1"], lambda: iter([feeds(0)]), probes=16, seed=7, probe_rows=rows)["y1"]
    c = output_sensitivity(model, ["y1"], [feeds(0)], probes=16, seed=8, probe_rows=rows)["y1"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("rows, tol", [("independent", 0.15), ("shared", 0.3)])
def test_masked_rows_contribute_nothing(rows, tol):
    W1, W2 = weights()
    model = make_model(W1, W2, mask=True, extra_outputs=True)
    batch = feeds(0)
    mask = np.ones((B, S), np.int64)
    mask[0, 10:] = 0
    mask[1, 4:] = 0
    batch["attention_mask"] = mask
    garbage = dict(batch)
    x = batch["x"].copy()
    x[mask == 0] *= 1000.0  # padding content must not matter (not even through the step size)
    garbage["x"] = x
    options = dict(probes=400, probe_rows=rows)
    d = output_sensitivity(model, ["y1"], [batch], mask_input="attention_mask", **options)["y1"]
    d_garbage = output_sensitivity(model, ["y1"], [garbage], mask_input="attention_mask", **options)["y1"]
    unmasked = int(mask.sum())
    assert rel_err(d, exact_y1(W2, unmasked)) < tol
    np.testing.assert_allclose(d_garbage, d, rtol=1e-3)
    full = output_sensitivity(model, ["y1"], [batch], **options)["y1"]
    assert rel_err(full, exact_y1(W2, B * S)) < tol


def test_input_proto_unchanged():
    W1, W2 = weights()
    model = make_model(W1, W2, W0=np.eye(K0, K, dtype=np.float32), extra_outputs=True)
    before = model.SerializeToString()
    output_sensitivity(model, ["h", "y1", "x0"], [feeds(0, name="x0", dim=K0)], probes=4)
    assert model.SerializeToString() == before


def test_probe_names_do_not_collide():
    W1, W2 = weights()
    model = make_model(W1, W2)
    # an existing tensor already carries the name the probe input would get
    model.graph.node[-1].input[0] = "y1__onnxlr_probe"
    model.graph.node.insert(1, helper.make_node("Identity", ["y1"], ["y1__onnxlr_probe"]))
    d = output_sensitivity(model, ["y1"], [feeds(0)], probes=400)["y1"]
    assert rel_err(d, exact_y1(W2, B * S)) < 0.15


def test_non_float_outputs_ignored_and_needed():
    W1, W2 = weights()
    model = make_model(W1, W2, extra_outputs=True)  # adds a float output independent of y1 and an int64 one
    d = output_sensitivity(model, ["y1"], [feeds(0)], probes=400)["y1"]
    assert rel_err(d, exact_y1(W2, B * S)) < 0.15
    int_only = make_model(W1, W2, extra_outputs=True)
    keep = [o for o in int_only.graph.output if o.name == "shape"]
    del int_only.graph.output[:]
    int_only.graph.output.extend(keep)
    with pytest.raises(OnnxlrError, match="no float output"):
        output_sensitivity(int_only, ["y1"], [feeds(0)], probes=2)


def test_errors():
    W1, W2 = weights()
    model = make_model(W1, W2, mask=True, extra_outputs=True)
    batch = {**feeds(0), "attention_mask": np.ones((B, S), np.int64)}
    with pytest.raises(OnnxlrError, match="not in the model"):
        output_sensitivity(model, ["nope"], [batch])
    with pytest.raises(OnnxlrError, match="weight"):
        output_sensitivity(model, ["W1"], [batch])
    with pytest.raises(OnnxlrError, match="only float"):
        output_sensitivity(model, ["attention_mask"], [batch])
    with pytest.raises(OnnxlrError, match="only float"):
        output_sensitivity(model, ["shape"], [batch])
    with pytest.raises(OnnxlrError, match="probes"):
        output_sensitivity(model, ["y1"], [batch], probes=1)
    with pytest.raises(OnnxlrError, match="probe_rows"):
        output_sensitivity(model, ["y1"], [batch], probe_rows="rows")
    with pytest.raises(OnnxlrError, match="rel_step"):
        output_sensitivity(model, ["y1"], [batch], rel_step=0.0)
    with pytest.raises(OnnxlrError, match="mask input"):
        output_sensitivity(model, ["y1"], [batch], mask_input="x_mask")
    with pytest.raises(OnnxlrError, match="no calibration batches"):
        output_sensitivity(model, ["y1"], [])
    with pytest.raises(OnnxlrError, match="calibration batch 0"):
        output_sensitivity(model, ["y1"], [{"x": batch["x"]}], probes=2)  # attention_mask missing
    assert output_sensitivity(model, [], [batch]) == {}


def test_changing_unit_count_is_an_error():
    # out = sum over the last axis of tanh(x): any last dimension runs
    graph = helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["t"]),
         helper.make_node("ReduceSum", ["t", "axes"], ["out"], keepdims=0)],
        "free_k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", "k"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s"])],
        initializer=[numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    two = [feeds(0), {"x": np.zeros((B, S, K + 1), np.float32)}]
    with pytest.raises(OnnxlrError, match="last dimension"):
        output_sensitivity(model, ["t"], two, probes=2)
    with pytest.raises(OnnxlrError, match="last dimension"):
        output_sensitivity(model, ["x"], two, probes=2)


def test_types_from_onnxruntime_when_inference_fails(monkeypatch):
    W1, W2 = weights()
    model = make_model(W1, W2)

    def fail(*args, **kwargs):
        raise RuntimeError("no inference for this model")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    d = output_sensitivity(model, ["y1"], [feeds(0)], probes=400)["y1"]
    assert rel_err(d, exact_y1(W2, B * S)) < 0.15
