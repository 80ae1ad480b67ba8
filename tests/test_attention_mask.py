"""SoftenAttentionMask and the planner's check that keeps it only where it is exact (issue #22)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.calibration import CalibrationSet
from onnxlr.passes.soften_attention_mask import SoftenAttentionMask, SoftenAttentionMaskConfig
from onnxlr.pipeline import PassManager
from onnxlr.planning.attention_masks import soften_masks

D, HEADS, SEQ = 16, 2, 6
FLT_MAX = float(np.finfo(np.float32).max)


def attention_model(form: str, scale: float = 1.0) -> onnx.ModelProto:
    """One attention block over x [B, SEQ, D] with a 0/1 ``attention_mask`` [B, SEQ]:
    ``softmax(q kᵀ / √d + mask) v``. ``form``: ``eager`` (mask = (1 - m) · -FLT_MAX, built once, as the
    transformers eager export), ``sdpa`` (Where(m, 0, -inf) and Softmax's NaN guard, as torch's SDPA
    export), ``older`` ((1 - m) · -10000). ``scale`` multiplies the scores (a wide spread of scores)."""
    rng = np.random.default_rng(0)
    head = D // HEADS
    inits = [numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), n)
             for n in ("Wq", "Wk", "Wv")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("one", 1.0), ("scale", scale / np.sqrt(head)), ("zero", 0.0), ("neg", -FLT_MAX),
               ("neg_inf", -np.inf), ("minus_1e4", -10000.0))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("heads_shape", [0, 0, HEADS, head]), ("merged", [0, 0, D]), ("axes12", [1, 2]))]
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_flat"], name=f"{name}_proj"),
                  helper.make_node("Reshape", [f"{name}_flat", "heads_shape"], [f"{name}_split"], name=f"{name}_reshape"),
                  helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], name=f"{name}_t",
                                   perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["q_heads", "k_heads"], ["raw"], name="scores"),
              helper.make_node("Mul", ["raw", "scale"], ["scaled"], name="scale_scores")]
    if form == "sdpa":
        nodes += [helper.make_node("Cast", ["attention_mask"], ["keep"], name="to_bool", to=TensorProto.BOOL),
                  helper.make_node("Unsqueeze", ["keep", "axes12"], ["keep4"], name="unsq"),
                  helper.make_node("Where", ["keep4", "zero", "neg_inf"], ["bias"], name="mask_where")]
    else:
        nodes += [helper.make_node("Cast", ["attention_mask"], ["m"], name="to_float", to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "m"], ["pad"], name="invert"),
                  helper.make_node("Unsqueeze", ["pad", "axes12"], ["pad4"], name="unsq"),
                  helper.make_node("Mul", ["pad4", "neg" if form == "eager" else "minus_1e4"], ["bias"],
                                   name="mask_scale")]
    nodes += [helper.make_node("Add", ["scaled", "bias"], ["logits"], name="add_mask"),
              helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1)]
    probs = "p"
    if form == "sdpa":
        nodes += [helper.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
                  helper.make_node("Where", ["nan", "zero", "p"], ["p_safe"], name="nan_guard")]
        probs = "p_safe"
    nodes += [helper.make_node("MatMul", [probs, "v_heads"], ["ctx"], name="context"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merged"], ["y"], name="merge")]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, D]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", SEQ])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((n, SEQ, D)).astype(np.float32), "attention_mask": mask}


def run(model: onnx.ModelProto, inputs: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


@pytest.mark.parametrize("form", ["eager", "sdpa", "older"])
def test_each_export_form_is_found_and_softened_exactly(form):
    model = attention_model(form)
    softened, (record,) = PassManager([SoftenAttentionMask()]).run(model)
    [change] = record.rewritten
    assert change.node == ("mask_where" if form == "sdpa" else "mask_scale")
    assert change.details["value"] == -30.0
    values = [numpy_helper.to_array(t) for t in softened.graph.initializer]
    assert not any(v.size and v.dtype.kind == "f" and v.min() <= -1000 for v in values if v.ndim == 0)
    inputs = feeds(16)
    np.testing.assert_allclose(run(softened, inputs), run(model, inputs), rtol=0, atol=1e-6)


def test_graphs_without_an_additive_mask_are_left_alone():
    """A Softmax over plain scores, and an Add of two score tensors, hold no mask."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    W = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    big = numpy_helper.from_array(np.full((4,), -1e9, np.float32), "big")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="a"),
             helper.make_node("MatMul", ["x", "W"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax"),
             helper.make_node("Add", ["p", "big"], ["y"], name="not_before_a_softmax")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", 1, [2, 4])],
                                                [W, big]), opset_imports=[helper.make_opsetid("", 17)])
    _, (record,) = PassManager([SoftenAttentionMask()]).run(model)
    assert record.layers == []


def test_an_unrecognised_mask_is_skipped_with_the_reason():
    """A mask fed as a model input (computed outside the graph) holds no constant to soften."""
    model = attention_model("eager")
    graph = model.graph
    add = next(n for n in graph.node if n.name == "add_mask")
    add.input[1] = "external_mask"
    graph.input.append(helper.make_tensor_value_info("external_mask", TensorProto.FLOAT, ["batch", 1, 1, SEQ]))
    _, (record,) = PassManager([SoftenAttentionMask()]).run(model)
    [change] = record.skipped
    assert change.node == "add_mask" and "holds no mask constant" in change.reason


def test_a_mask_already_moderate_is_skipped_with_the_reason():
    model = attention_model("older")
    _, (record,) = PassManager([SoftenAttentionMask(SoftenAttentionMaskConfig(value=-20000.0))]).run(model)
    [change] = record.skipped
    assert "already at or above -20000" in change.reason


def test_the_planner_keeps_it_where_exact_and_refuses_it_where_scores_spread_widely():
    """Scores spread over hundreds: a masked logit at -30 (or -60) is no longer negligible against the
    row, the outputs move, and the planner leaves the mask as it was, saying why."""
    exact = attention_model("eager")
    data = CalibrationSet(feeds(32, seed=2), exact)
    kept, record = soften_masks(exact, data, threads=1)
    assert record.rewritten and record.config["largest_output_change"] <= 1e-5
    wide = attention_model("eager", scale=400.0)
    same, record = soften_masks(wide, CalibrationSet(feeds(32, seed=2), wide), threads=1)
    assert same is wide and not record.rewritten
    assert "changes the outputs on the calibration data" in record.skipped[0].reason


def test_the_int8_recipe_softens_the_mask_and_says_so():
    model = attention_model("sdpa")
    optimized, report = onnxlr.optimize(model, recipe="int8", calib=feeds(32, seed=2), inputs=feeds(16, seed=3),
                                        repeats=3)
    record = next(r for r in report.passes if r.name == "soften_attention_mask")
    assert [c.node for c in record.rewritten] == ["mask_where"]
    assert "soften_attention_mask" in report.format()
