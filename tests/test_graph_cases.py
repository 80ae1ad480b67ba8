"""Issue #8: every graph shape is rewritten correctly, or skipped with the reason — never broken.

Each case builds a small model with onnx.helper and runs ``onnxlr.api.optimize`` on it at full rank
(``rank_ratio=1.0, force=True``: the rewrite must compute the same thing) and at a reduced rank, then
checks: onnx.checker (full check, with shape inference) passes, ONNX Runtime runs the result, at full
rank its outputs equal the original's, and every layer of interest was rewritten or is named in the
report with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.api import optimize
from onnxlr.compare import compare

OPSET = 17
RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, domains=(), ir_version=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def changes(report):
    """node name -> [LayerChange] over every pass of the report."""
    out = {}
    for record in report.passes:
        for change in record.layers:
            out.setdefault(change.node, []).append(change)
    return out


def check(model, feeds, *, full=True, atol=1e-4, rtol=1e-4, **options):
    """optimize ``model``, check it, run it and (at full rank) compare it with the original."""
    options = {**(dict(rank_ratio=1.0, force=True) if full else dict(rank_ratio=0.5)), **options}
    optimized, report = optimize(model, validate=False, **options)
    onnx.checker.check_model(optimized, full_check=True)
    got, ref = run(optimized, feeds), run(model, feeds)
    assert [g.shape for g in got] == [r.shape for r in ref]
    if full:
        for g, r in zip(got, ref):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=rtol, atol=atol)
    return optimized, report


def rewritten(report, node):
    return any(c.action == "rewritten" for c in changes(report).get(node, []))


def skipped(report, node, *words):
    """The reason ``node`` was skipped (asserting it was, and that the reason says ``words``)."""
    found = [c for c in changes(report).get(node, []) if c.action == "skipped"]
    assert found, f"{node} is neither rewritten nor reported: {changes(report)}"
    reason = found[0].reason
    assert reason and all(w in reason for w in words), reason
    return reason


def ops(model):
    return [n.op_type for n in model.graph.node]


BOTH = pytest.mark.parametrize("full", [True, False], ids=["full_rank", "half_rank"])


# ----------------------------------------------------------------------------- shared weights


@BOTH
def test_weight_shared_by_several_matmuls(full):
    W = rand(32, 16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["z", "W"], ["b"], name="mm2"),
             helper.make_node("MatMul", ["a", "V"], ["y"], name="mm3")]
    model = make_model(nodes, [vi("x", [4, 32]), vi("z", [4, 32])], [vi("y", [4, 8]), vi("b", [4, 16])],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(rand(16, 8), "V")])
    optimized, report = check(model, {"x": rand(4, 32), "z": rand(4, 32)}, full=full, force=True)
    assert rewritten(report, "mm1") and rewritten(report, "mm2")
    # factorized once, the factors shared: no dense copy of W stays
    names = {t.name for t in optimized.graph.initializer}
    assert "W" not in names and sum(n.startswith("W/lr_") for n in names) == 2


@BOTH
def test_weight_shared_by_matmul_and_gemm(full):
    W = rand(32, 16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("Gemm", ["z", "W", "c"], ["b"], name="gemm", beta=0.5)]
    model = make_model(nodes, [vi("x", [4, 32]), vi("z", [4, 32])], [vi("a", [4, 16]), vi("b", [4, 16])],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(rand(16), "c")])
    optimized, report = check(model, {"x": rand(4, 32), "z": rand(4, 32)}, full=full, force=True)
    assert rewritten(report, "mm") and rewritten(report, "gemm")
    assert "W" not in {t.name for t in optimized.graph.initializer}


def test_weight_shared_by_matmul_and_transposed_gemm_is_rewritten_twice():
    """The Gemm reads W as Wᵀ (transB=1): two different logical weights, each factorized."""
    W = rand(16, 16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("Gemm", ["x", "W"], ["b"], name="gemm", transB=1)]
    model = make_model(nodes, [vi("x", [4, 16])], [vi("a", [4, 16]), vi("b", [4, 16])],
                       [numpy_helper.from_array(W, "W")])
    _, report = check(model, {"x": rand(4, 16)})
    assert rewritten(report, "mm") and rewritten(report, "gemm")


@BOTH
def test_weight_also_read_by_another_op_is_skipped(full):
    W = rand(32, 16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("Add", ["W", "z"], ["s"], name="add")]
    model = make_model(nodes, [vi("x", [4, 32]), vi("z", [32, 16])], [vi("a", [4, 16]), vi("s", [32, 16])],
                       [numpy_helper.from_array(W, "W")])
    _, report = check(model, {"x": rand(4, 32), "z": rand(32, 16)}, full=full)
    skipped(report, "mm", "also read by Add")


# ----------------------------------------------------------------------------- weight as graph input


@BOTH
def test_weight_that_is_a_graph_input_is_skipped(full):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 32]), vi("W", [32, 16])], [vi("y", [4, 16])])
    _, report = check(model, {"x": rand(4, 32), "W": rand(32, 16)}, full=full)
    skipped(report, "mm", "not a constant")


@BOTH
def test_initializer_also_listed_as_graph_input_is_not_a_constant(full):
    """IR >= 4: an initializer that is also a graph input is only a default — the caller may feed
    another value — so it is not a constant, and the layer is skipped (rewriting it would silently
    drop the override)."""
    W = rand(32, 16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 32]), vi("W", [32, 16])], [vi("y", [4, 16])],
                       [numpy_helper.from_array(W, "W")])
    optimized, report = check(model, {"x": rand(4, 32)}, full=full)
    skipped(report, "mm", "graph input")
    assert "W" in {i.name for i in optimized.graph.input}
    # the override still works on the result
    x, W2 = rand(4, 32), rand(32, 16)
    np.testing.assert_allclose(run(optimized, {"x": x, "W": W2})[0], x @ W2, rtol=1e-4, atol=1e-4)


@BOTH
def test_old_ir_initializers_listed_as_inputs_are_constants(full):
    """IR < 4 (opset <= 8 era) requires every initializer to be listed as a graph input: there the
    listing means nothing, the weight is a constant and is factorized."""
    W = rand(32, 16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 32]), vi("W", [32, 16])], [vi("y", [4, 16])],
                       [numpy_helper.from_array(W, "W")], opset=8, ir_version=3)
    optimized, report = check(model, {"x": rand(4, 32)}, full=full)
    assert rewritten(report, "mm")
    listed = {i.name for i in optimized.graph.input}
    assert {t.name for t in optimized.graph.initializer} <= listed


# ----------------------------------------------------------------------------- MatMul shapes


@BOTH
def test_matmul_with_broadcast_batch_dims_on_the_activation(full):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [2, 3, 5, 32])], [vi("y", [2, 3, 5, 16])],
                       [numpy_helper.from_array(rand(32, 16), "W")])
    _, report = check(model, {"x": rand(2, 3, 5, 32)}, full=full)
    assert rewritten(report, "mm")


@BOTH
def test_matmul_with_3d_weight_is_skipped(full):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 5, 32])], [vi("y", [4, 5, 16])],
                       [numpy_helper.from_array(rand(4, 32, 16), "W")])
    _, report = check(model, {"x": rand(4, 5, 32)}, full=full)
    skipped(report, "mm", "3-D")


@BOTH
def test_matmul_with_1d_activation(full):
    """x[32] @ W[32, 16] -> y[16]: numpy-style 1-D promotion; the rewrite keeps it."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [32])], [vi("y", [16])], [numpy_helper.from_array(rand(32, 16), "W")])
    _, report = check(model, {"x": rand(32)}, full=full)
    assert rewritten(report, "mm")


# ----------------------------------------------------------------------------- Gemm forms


GEMM_BIAS = {"none": None, "n": (1,), "1n": (1, 1), "mn": (1, 1), "scalar": ()}


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 1.0), (1.0, 2.5), (-1.5, 0.0)])
@pytest.mark.parametrize("bias", ["none", "n", "1n", "mn", "scalar"])
def test_gemm_every_form(trans_a, trans_b, alpha, beta, bias):
    m, k, n = 6, 24, 20
    B = rand(n, k) if trans_b else rand(k, n)
    inits, inputs = [numpy_helper.from_array(B, "B")], ["x", "B"]
    if bias != "none":
        shape = {"n": (n,), "1n": (1, n), "mn": (m, n), "scalar": ()}[bias]
        inits.append(numpy_helper.from_array(rand(*shape), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a,
                            transB=trans_b)
    x_shape = [k, m] if trans_a else [m, k]
    model = make_model([node], [vi("x", x_shape)], [vi("y", [m, n])], inits)
    feeds = {"x": rand(*x_shape)}
    _, report = check(model, feeds)
    assert rewritten(report, "gemm")
    _, report = check(model, feeds, full=False)
    assert rewritten(report, "gemm")


def test_gemm_with_calibration_and_bias_correction_keeps_beta_forms():
    """Data-aware methods fold a bias correction into C: with beta=0 / absent C / a [m, n] C too."""
    m, k, n = 6, 24, 20
    for beta, shape in [(0.0, (n,)), (1.0, None), (2.0, (m, n)), (0.5, (1, n))]:
        inits, inputs = [numpy_helper.from_array(rand(k, n), "B")], ["x", "B"]
        if shape is not None:
            inits.append(numpy_helper.from_array(rand(*shape), "C"))
            inputs.append("C")
        node = helper.make_node("Gemm", inputs, ["y"], name="gemm", beta=beta)
        model = make_model([node], [vi("x", [m, k])], [vi("y", [m, n])], inits)
        calib = [{"x": rand(m, k) + 1.0} for _ in range(4)]
        _, report = check(model, {"x": rand(m, k)}, calib=calib, atol=1e-3, rtol=1e-3)
        assert rewritten(report, "gemm")
        check(model, {"x": rand(m, k)}, full=False, calib=calib)


# ----------------------------------------------------------------------------- Conv geometry


def conv_model(cin, cout, kernel, spatial, group=1, bias=True, **attrs):
    W = rand(cout, cin // group, *kernel)
    inits, inputs = [numpy_helper.from_array(W, "W")], ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rand(cout), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, **attrs)
    model = make_model([node], [vi("x", [2, cin, *spatial])], [vi("y", [None] * (2 + len(spatial)))], inits)
    return model, {"x": rand(2, cin, *spatial)}, W


def full_conv_rank(W, decomposition):
    cout, cin = W.shape[:2]
    K = int(np.prod(W.shape[2:]))
    if decomposition == "channel":
        return min(cin * K, cout)
    if decomposition == "spatial":
        return min(cin * W.shape[2], cout * W.shape[3])
    return max(cin, cout)


CONV_GEOMETRY = {
    "plain": {},
    "strided": {"strides": [2, 2]},
    "dilated": {"dilations": [2, 2]},
    "padded": {"pads": [1, 0, 2, 1]},
    "strided_dilated_padded": {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 0, 1]},
    "same_upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same_lower": {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    "valid": {"auto_pad": "VALID"},
}


@pytest.mark.parametrize("decomposition", ["channel", "spatial", "tucker2"])
@pytest.mark.parametrize("geometry", list(CONV_GEOMETRY))
def test_conv_geometry(geometry, decomposition):
    model, feeds, W = conv_model(8, 12, (3, 3), (9, 10), **CONV_GEOMETRY[geometry])
    _, report = check(model, feeds, conv=decomposition, ranks={"conv": full_conv_rank(W, decomposition)},
                      rank_multiple=1)
    assert rewritten(report, "conv")
    _, report = check(model, feeds, full=False, conv=decomposition, conv_ratio=0.5)
    assert rewritten(report, "conv") or skipped(report, "conv")


@pytest.mark.parametrize("geometry", ["plain", "strided", "same_lower"])
def test_conv_1d(geometry):
    attrs = {k: v[:1] if k != "pads" else v[:1] + v[2:3] for k, v in CONV_GEOMETRY[geometry].items()
             if k != "auto_pad"}
    if "auto_pad" in CONV_GEOMETRY[geometry]:
        attrs["auto_pad"] = CONV_GEOMETRY[geometry]["auto_pad"]
    model, feeds, W = conv_model(8, 12, (3,), (11,), **attrs)
    _, report = check(model, feeds, conv="channel", ranks={"conv": full_conv_rank(W, "channel")}, rank_multiple=1)
    assert rewritten(report, "conv")
    check(model, feeds, full=False, conv="auto")


def with_plain_conv(model, feeds):
    """``model`` plus an unrelated factorizable conv on its own input (so the skip is checked next to a rewrite)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    g.initializer.append(numpy_helper.from_array(rand(6, 3, 3, 3), "W_plain"))
    g.input.append(vi("x_plain", [1, 3, 8, 8]))
    g.output.append(vi("y_plain", [1, 6, 6, 6]))
    g.node.append(helper.make_node("Conv", ["x_plain", "W_plain"], ["y_plain"], name="plain"))
    return model, {**feeds, "x_plain": rand(1, 3, 8, 8)}


ODD_CONVS = {  # (cin, cout, kernel, spatial, attrs) -> words of the reason
    "3d": ((4, 6, (3, 3, 3), (5, 6, 7), {"pads": [1] * 6}), "3-D convolution"),
    "grouped": ((8, 12, (3, 3), (7, 7), {"group": 2, "pads": [1] * 4}), "grouped conv (group=2)"),
    "depthwise": ((8, 8, (3, 3), (7, 7), {"group": 8, "pads": [1] * 4}), "depthwise"),
    "depthwise_x2": ((8, 16, (3, 3), (7, 7), {"group": 8, "strides": [2, 2]}), "depthwise"),
}


@BOTH
@pytest.mark.parametrize("case", list(ODD_CONVS))
def test_3d_grouped_and_depthwise_convs_are_skipped(case, full):
    (cin, cout, kernel, spatial, attrs), words = ODD_CONVS[case]
    model, feeds = with_plain_conv(*conv_model(cin, cout, kernel, spatial, **attrs)[:2])
    optimized, report = check(model, feeds, full=full, rank_multiple=1,
                              **({"ranks": {"plain": 6}} if full else {}))
    skipped(report, "conv", words)
    assert rewritten(report, "plain")
    assert next(n for n in optimized.graph.node if n.name == "conv").input[1] == "W"  # the odd conv untouched


def test_lone_unfactorizable_conv_is_reported():
    model, feeds, _ = conv_model(8, 8, (3, 3), (7, 7), group=8, pads=[1] * 4)
    _, report = check(model, feeds)
    skipped(report, "conv", "depthwise")


@BOTH
def test_conv_without_bias(full):
    model, feeds, W = conv_model(8, 12, (3, 3), (7, 7), bias=False, auto_pad="SAME_UPPER")
    options = {"ranks": {"conv": full_conv_rank(W, "channel")}, "rank_multiple": 1} if full else {}
    _, report = check(model, feeds, full=full, conv="channel", **options)
    assert rewritten(report, "conv")


# ----------------------------------------------------------------------------- compare()


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0,), (2, 0, 4)])
def test_compare_zero_size_outputs(shape):
    a = np.zeros(shape, np.float32)
    c = compare("y", a, a.copy())
    assert c.shape == list(shape)
    assert c.max_abs == 0.0 and c.rel_l2 == 0.0 and c.cosine == 1.0 and c.cosine_min == 1.0
    assert c.kl == 0.0 and c.top1 == 1.0


def test_compare_zero_size_output_of_a_model_validates():
    """An optimized model with an empty output validates end to end."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Slice", ["y", "s", "e"], ["empty"], name="cut")]
    inits = [numpy_helper.from_array(rand(32, 16), "W"), numpy_helper.from_array(np.array([0], np.int64), "s"),
             numpy_helper.from_array(np.array([0], np.int64), "e")]
    model = make_model(nodes, [vi("x", [3, 32])], [vi("y", [3, 16]), vi("empty", [0, 16])], inits)
    _, report = optimize(model, rank_ratio=1.0, force=True, repeats=1, batch_size=3)
    cpu = report.validation.providers[0]
    assert not cpu.reason, cpu.reason
    assert [o.shape for o in cpu.outputs] == [[3, 16], [0, 16]]


# ----------------------------------------------------------------------------- subgraphs


def if_model(*, outer_reader: bool, inner_initializer: bool = False):
    """y = If(cond, then: x @ W, else: x @ (W * 2)); W from the outer scope (or the branch's own
    initializer), optionally also read by a top-level MatMul."""
    W = rand(32, 16)
    then_inits = [numpy_helper.from_array(W, "W_in")] if inner_initializer else []
    w = "W_in" if inner_initializer else "W"
    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", w], ["t"], name="then_mm")], "then",
                                    [], [vi("t", [4, 16])], then_inits)
    else_branch = helper.make_graph([helper.make_node("Mul", ["W", "two"], ["W2"], name="else_scale"),
                                     helper.make_node("MatMul", ["x", "W2"], ["e"], name="else_mm")], "else",
                                    [], [vi("e", [4, 16])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)]
    outputs = [vi("y", [4, 16])]
    if outer_reader:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["z"], name="outer_mm"))
        outputs.append(vi("z", [4, 16]))
    model = make_model(nodes, [vi("x", [4, 32]), vi("cond", [], TensorProto.BOOL)], outputs,
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.float32(2.0), "two")])
    return model


@BOTH
@pytest.mark.parametrize("cond", [True, False])
@pytest.mark.parametrize("outer_reader,inner_initializer", [(False, False), (True, False), (True, True)],
                         ids=["only_inside", "inside_and_outside", "branch_initializer"])
def test_weights_inside_if_branches(outer_reader, inner_initializer, cond, full):
    """Layers inside If branches are rewritten like any other (exact at full rank, whichever branch
    runs). The else branch computes W * 2 from the outer W: folding it would store a second copy of
    the weight (the file grows), so it is not folded, and W — read by that Mul — is not factorized
    where the Mul reads it; the then branch's own initializer is."""
    model = if_model(outer_reader=outer_reader, inner_initializer=inner_initializer)
    optimized, report = check(model, {"x": rand(4, 32), "cond": np.array(cond)}, full=full)
    skipped(report, "else_mm", "not a constant")
    if inner_initializer:
        assert rewritten(report, "then_mm")
    else:
        skipped(report, "then_mm", "also read by Mul node 'else_scale'")
    if outer_reader:
        skipped(report, "outer_mm", "also read by Mul node 'else_scale'")


def test_a_subgraph_transforming_a_weight_it_alone_reads_is_folded():
    """A Transpose of an outer weight inside a branch, read nowhere else: folding moves the weight into
    the branch without a copy, and the MatMul behind it becomes a layer."""
    W = rand(16, 32)
    then_branch = helper.make_graph([helper.make_node("Transpose", ["W"], ["Wt"], name="t"),
                                     helper.make_node("MatMul", ["x", "Wt"], ["o"], name="then_mm")], "then",
                                    [], [vi("o", [4, 16])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["zero"], ["z"], name="else_id")], "else",
                                    [], [vi("z", [4, 16])])
    model = make_model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch,
                                         else_branch=else_branch)],
                       [vi("x", [4, 32]), vi("cond", [], TensorProto.BOOL)], [vi("y", [4, 16])],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.zeros((4, 16), np.float32), "zero")])
    _, report = check(model, {"x": rand(4, 32), "cond": np.array(True)}, full=True)
    assert rewritten(report, "then_mm")


def loop_model():
    """h = x; repeat trip times: h = tanh(h @ W) with W[32, 32] from the outer scope."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="body_mm"),
         helper.make_node("Tanh", ["hw"], ["h_out"], name="body_tanh"),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond")],
        "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("h_in", [4, 32])],
        [vi("c_out", [], TensorProto.BOOL), vi("h_out", [4, 32])])
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["h"], name="loop", body=body),
             helper.make_node("MatMul", ["h", "V"], ["y"], name="head")]
    return make_model(nodes, [vi("x", [4, 32]), vi("trip", [], TensorProto.INT64)], [vi("y", [4, 16])],
                      [numpy_helper.from_array(0.2 * rand(32, 32), "W"), numpy_helper.from_array(rand(32, 16), "V")])


@BOTH
def test_weights_inside_a_loop_body(full):
    model = loop_model()
    _, report = check(model, {"x": rand(4, 32), "trip": np.array(3, np.int64)}, full=full)
    if full:  # forced: exact at full rank inside the loop body
        assert rewritten(report, "body_mm")
    else:  # half of a square 32x32 weight's rank is its break-even rank: nothing to save
        skipped(report, "body_mm", "would not save parameters")
    assert rewritten(report, "head")


def scan_model():
    """Scan over the sequence axis of x[5, 4, 32]: state s = s + x_t @ W, scan output x_t @ W."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "W"], ["xw"], name="scan_mm"),
         helper.make_node("Add", ["s_in", "xw"], ["s_out"], name="scan_add"),
         helper.make_node("Identity", ["xw"], ["y_t"], name="scan_out")],
        "body", [vi("s_in", [4, 16]), vi("x_t", [4, 32])], [vi("s_out", [4, 16]), vi("y_t", [4, 16])])
    nodes = [helper.make_node("Scan", ["s0", "x"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1),
             helper.make_node("MatMul", ["x", "W"], ["direct"], name="direct_mm")]
    return make_model(nodes, [vi("x", [5, 4, 32]), vi("s0", [4, 16])],
                      [vi("s", [4, 16]), vi("ys", [5, 4, 16]), vi("direct", [5, 4, 16])],
                      [numpy_helper.from_array(rand(32, 16), "W")])


@BOTH
def test_weights_inside_a_scan_body_shared_with_the_outer_graph(full):
    model = scan_model()
    _, report = check(model, {"x": rand(5, 4, 32), "s0": rand(4, 16)}, full=full)
    assert rewritten(report, "scan_mm") and rewritten(report, "direct_mm")  # one weight, shared factors


# ----------------------------------------------------------------------------- custom and contrib ops


def custom_op_model():
    """x @ W1 -> com.example.Swish -> @ W2: a custom op ONNX Runtime cannot run, between two layers."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Swish", ["h"], ["a"], name="swish", domain="com.example"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("x", ["batch", 32])], [vi("y", ["batch", 16])],
                      [numpy_helper.from_array(rand(32, 48), "W1"), numpy_helper.from_array(rand(48, 16), "W2")],
                      domains=["com.example"])


@BOTH
def test_custom_domain_op_layers_around_it_are_rewritten(full):
    """ORT cannot run the model: optimize(validate=False) still rewrites both layers and the result
    passes the checker; the custom node is kept as it is."""
    model = custom_op_model()
    options = dict(rank_ratio=1.0, force=True) if full else dict(rank_ratio=0.5)
    optimized, report = optimize(model, validate=False, **options)
    onnx.checker.check_model(optimized, full_check=True)
    assert rewritten(report, "fc1") and rewritten(report, "fc2")
    custom = [n for n in optimized.graph.node if n.domain == "com.example"]
    assert [n.op_type for n in custom] == ["Swish"]
    assert any(o.domain == "com.example" for o in optimized.opset_import)


def test_custom_domain_op_validation_is_a_clear_error():
    """With validation on, the original model cannot run in ONNX Runtime: a clear OnnxlrError that says
    so (and how to go on), not a crash."""
    from onnxlr.errors import OnnxlrError

    with pytest.raises(OnnxlrError, match="cannot run in ONNX Runtime"):
        optimize(custom_op_model(), rank_ratio=1.0, force=True, repeats=1)


@BOTH
def test_contrib_ops_around_a_matmul(full):
    """com.microsoft ops ORT runs (Gelu, FusedMatMul) around a factorizable MatMul: the MatMul is
    rewritten, FusedMatMul (not an ai.onnx MatMul) is left as it is."""
    nodes = [helper.make_node("FusedMatMul", ["x", "W0"], ["f"], name="fused", domain="com.microsoft",
                              alpha=0.5, transB=1),
             helper.make_node("Gelu", ["f"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", ["batch", 32])], [vi("y", ["batch", 16])],
                       [numpy_helper.from_array(rand(24, 32), "W0"), numpy_helper.from_array(rand(24, 16), "W")],
                       domains=["com.microsoft"])
    optimized, report = check(model, {"x": rand(3, 32)}, full=full)
    assert rewritten(report, "mm")
    assert [n.op_type for n in optimized.graph.node if n.domain == "com.microsoft"] == ["FusedMatMul", "Gelu"]


# ----------------------------------------------------------------------------- fp16 / bf16


@BOTH
def test_fp16_matmul_is_factorized_in_fp32_and_stored_in_fp16(full):
    W = rand(32, 16).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "V", "c"], ["y"], name="gemm", transB=1)]
    model = make_model(nodes, [vi("x", [4, 32], TensorProto.FLOAT16)], [vi("y", [4, 8], TensorProto.FLOAT16)],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(rand(8, 16).astype(np.float16), "V"),
                        numpy_helper.from_array(rand(8).astype(np.float16), "c")])
    optimized, report = check(model, {"x": rand(4, 32).astype(np.float16)}, full=full, atol=5e-2, rtol=2e-2)
    assert rewritten(report, "mm") and rewritten(report, "gemm")
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.FLOAT16}


def bf16_tensor(values, name):
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape,
                              (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes(),
                              raw=True)


@BOTH
def test_bf16_matmul(full):
    """bf16 weights: skipped with a reason naming the dtype (NumPy has no native bfloat16 type for
    onnx-graphsurgeon to store factors in) — the weight is kept bf16, never cast."""
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16, name="to_bf16"),
             helper.make_node("MatMul", ["xb", "W"], ["yb"], name="mm"),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT, name="to_fp32")]
    model = make_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 16])], [bf16_tensor(rand(32, 16), "W")])
    try:
        run(model, {"x": rand(4, 32)})
    except Exception:  # noqa: BLE001 - ORT's CPU provider has no bf16 MatMul: check the model only
        optimized, report = optimize(model, validate=False, **(dict(rank_ratio=1.0, force=True) if full
                                                               else dict(rank_ratio=0.5)))
        onnx.checker.check_model(optimized, full_check=True)
    else:
        optimized, report = check(model, {"x": rand(4, 32)}, full=full, atol=0.1, rtol=0.05)
    skipped(report, "mm", "bfloat16 is not factorized")
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.BFLOAT16}  # W kept as it came


# ----------------------------------------------------------------------------- dynamic dimensions


@BOTH
def test_symbolic_batch_and_sequence(full):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h2", "V"], ["y"], name="gemm"),
             helper.make_node("Reshape", ["h", "flat"], ["h2"], name="flatten")]
    model = make_model(nodes, [vi("x", ["batch", "seq", 32])], [vi("y", [None, 8])],
                       [numpy_helper.from_array(rand(32, 16), "W"), numpy_helper.from_array(rand(16, 8), "V"),
                        numpy_helper.from_array(np.array([-1, 16], np.int64), "flat")])
    optimized, report = check(model, {"x": rand(2, 5, 32)}, full=full)
    assert rewritten(report, "mm") and rewritten(report, "gemm")
    dims = optimized.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "seq"]
    run(optimized, {"x": rand(3, 1, 32)})


def unknown_rank_model():
    """Reshape(x, shape) with the shape a runtime input: the MatMul's activation has unknown rank.
    (A graph input of unknown rank itself is refused by onnx.checker, so it cannot come in.)"""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "W"], ["h"], name="mm"),
             helper.make_node("Flatten", ["h"], ["y"], name="flatten", axis=1)]
    return make_model(nodes, [vi("x", ["batch", 96]), vi("shape", [None], TensorProto.INT64)], [vi("y", [None, None])],
                      [numpy_helper.from_array(rand(32, 16), "W")])


@BOTH
def test_unknown_rank_activation(full):
    model = unknown_rank_model()
    feeds = {"x": rand(2, 96), "shape": np.array([2, 3, 32], np.int64)}
    optimized, report = check(model, feeds, full=full)
    assert rewritten(report, "mm")
    run(optimized, {"x": rand(4, 96), "shape": np.array([12, 32], np.int64)})


def test_unknown_rank_activation_validates_with_given_inputs():
    feeds = {"x": rand(2, 96), "shape": np.array([2, 3, 32], np.int64)}
    _, report = optimize(unknown_rank_model(), rank_ratio=1.0, force=True, inputs=feeds, repeats=1, batch_size=2,
                         max_error=1e-4)
    assert report.passed, report.format()


# ----------------------------------------------------------------------------- already quantized


def qdq_weight(name, W, axis=None):
    """Initializers for an int8 QDQ weight: (int8 values, scale, zero point) dequantizing to ~W."""
    if axis is None:
        scale = np.float32(np.abs(W).max() / 127)
    else:
        scale = (np.abs(W).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.round(W / scale), -127, 127).astype(np.int8)
    zero = np.zeros_like(np.asarray(scale), dtype=np.int8)
    return [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(np.asarray(scale), f"{name}_scale"),
            numpy_helper.from_array(zero, f"{name}_zero")]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@BOTH
@pytest.mark.parametrize("axis", [None, 1], ids=["per_tensor", "per_channel"])
def test_qdq_weights_are_factorized_and_stored_int8_again(axis, full):
    """DequantizeLinear(int8 W) -> MatMul, with the activation in a QuantizeLinear -> DequantizeLinear
    pair: FoldConstants makes W a float weight, it is factorized and its factors are stored as int8
    (weight-only QDQ) again; the activation pair stays."""
    W = rand(32, 16)
    dq = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W_dq"], name="dq_w", **dq),
             helper.make_node("MatMul", ["xd", "W_dq"], ["y"], name="mm")]
    inits = [*qdq_weight("W", W, axis), numpy_helper.from_array(np.float32(0.05), "x_scale"),
             numpy_helper.from_array(np.int8(0), "x_zero")]
    model = make_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 16])], inits)
    options = dict(rank_ratio=1.0, force=True) if full else dict(rank_ratio=0.5)
    optimized, report = optimize(model, validate=False, **options)
    onnx.checker.check_model(optimized, full_check=True)
    assert rewritten(report, "mm")
    assert "QuantizeLinear" in ops(optimized)  # the activation pair is kept
    assert TensorProto.INT8 in {t.data_type for t in optimized.graph.initializer}
    x = rand(4, 32)
    got, ref = run(optimized, {"x": x})[0], run(model, {"x": x})[0]
    if full:  # exact factors, re-quantized to int8: a quantization error, no more
        assert rel_l2(got, ref) < 0.05


def test_qoperator_ops_are_skipped_with_the_reason():
    """QLinearMatMul, MatMulInteger and QLinearConv are integer ops with their own scales: left as
    they are and listed in the report; a float MatMul next to them is still rewritten."""
    u8 = TensorProto.UINT8
    s = lambda name, v: numpy_helper.from_array(np.float32(v), name)  # noqa: E731
    z = lambda name, dtype=np.uint8: numpy_helper.from_array(np.zeros((), dtype), name)  # noqa: E731
    Wq = np.clip(np.round(rand(32, 16) * 40), -127, 127).astype(np.int8)
    Kq = np.clip(np.round(rand(4, 3, 3, 3) * 40), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "Wq", "ws", "wz", "ys", "yz"], ["yq"], name="qlinear_mm"),
        helper.make_node("MatMulInteger", ["xq", "Wq2", "xz", "wz2"], ["acc"], name="mm_integer"),
        helper.make_node("QLinearConv", ["iq", "xs", "xz", "Kq", "ws", "wz", "ys", "yz"], ["cq"], name="qlinear_conv"),
        helper.make_node("MatMul", ["f", "Wf"], ["fy"], name="float_mm"),
    ]
    inits = [s("xs", 0.05), z("xz"), numpy_helper.from_array(Wq, "Wq"), s("ws", 0.02), z("wz", np.int8),
             s("ys", 0.1), z("yz"), numpy_helper.from_array(Wq.copy(), "Wq2"), z("wz2", np.int8),
             numpy_helper.from_array(Kq, "Kq"), numpy_helper.from_array(rand(32, 16), "Wf")]
    model = make_model(nodes, [vi("xq", [4, 32], u8), vi("iq", [1, 3, 6, 6], u8), vi("f", [4, 32])],
                       [vi("yq", [4, 16], u8), vi("acc", [4, 16], TensorProto.INT32), vi("cq", [1, 4, 4, 4], u8),
                        vi("fy", [4, 16])], inits)
    feeds = {"xq": RNG.integers(0, 255, (4, 32)).astype(np.uint8),
             "iq": RNG.integers(0, 255, (1, 3, 6, 6)).astype(np.uint8), "f": rand(4, 32)}
    optimized, report = check(model, feeds)
    for node in ("qlinear_mm", "mm_integer", "qlinear_conv"):
        skipped(report, node, "QOperator")
    assert rewritten(report, "float_mm")
    assert {"QLinearMatMul", "MatMulInteger", "QLinearConv"} <= set(ops(optimized))


@BOTH
def test_qdq_weight_read_inside_a_subgraph_keeps_its_outer_scope_reference(full):
    """The dequantized weight is read by a top-level MatMul and by one in an If branch: folding it to a
    constant must not leave the branch's outer-scope reference dangling."""
    W = rand(32, 16)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", "W_dq"], ["t"], name="then_mm")], "then",
                                    [], [vi("t", [4, 16])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x16"], ["e"], name="else_neg")], "else",
                                    [], [vi("e", [4, 16])])
    nodes = [helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W_dq"], name="dq_w"),
             helper.make_node("MatMul", ["x", "W_dq"], ["x16"], name="outer_mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("x", [4, 32]), vi("cond", [], TensorProto.BOOL)], [vi("y", [4, 16])],
                       qdq_weight("W", W))
    for cond in (True, False):
        _, report = check(model, {"x": rand(4, 32), "cond": np.array(cond)}, full=full)
        assert rewritten(report, "then_mm") and rewritten(report, "outer_mm")


# ----------------------------------------------------------------------------- data-aware methods


def shared_model():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
             helper.make_node("Gemm", ["x2", "W", "c"], ["b"], name="gemm", alpha=0.5, beta=2.0)]
    return make_model(nodes, [vi("x", [2, 3, 32]), vi("x2", [4, 32])], [vi("a", [2, 3, 16]), vi("b", [4, 16])],
                      [numpy_helper.from_array(rand(32, 16), "W"), numpy_helper.from_array(rand(1, 16), "c")])


def fp16_model():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm1")]
    return make_model(nodes, [vi("x", ["batch", 32], TensorProto.FLOAT16)], [vi("y", ["batch", 16], TensorProto.FLOAT16)],
                      [numpy_helper.from_array(rand(32, 16).astype(np.float16), "W")])


@pytest.mark.parametrize("method", ["whitened", "asvd"])
@pytest.mark.parametrize("build", [shared_model, fp16_model], ids=["shared_broadcast", "fp16"])
def test_data_aware_methods_on_odd_graphs(build, method):
    model = build()
    names = [i.name for i in model.graph.input]
    dtype = np.float16 if build is fp16_model else np.float32
    shapes = {i.name: [d.dim_value or 4 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    calib = [{n: rand(*shapes[n]).astype(dtype) for n in names} for _ in range(6)]
    feeds = {n: rand(*shapes[n]).astype(dtype) for n in names}
    tol = 5e-2 if dtype == np.float16 else 1e-3
    _, report = check(model, feeds, calib=calib, method=method, atol=tol, rtol=tol)
    assert rewritten(report, "mm1")
    check(model, feeds, full=False, calib=calib, method=method)


@BOTH
def test_conv_weight_read_inside_a_subgraph(full):
    K = rand(6, 4, 3, 3)
    then_branch = helper.make_graph([helper.make_node("Conv", ["x", "K"], ["t"], name="then_conv")], "then",
                                    [], [vi("t", [1, 6, 5, 5])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["c"], ["e"], name="else_neg")], "else",
                                    [], [vi("e", [1, 6, 5, 5])])
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("x", [1, 4, 7, 7]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 6, 5, 5])],
                       [numpy_helper.from_array(K, "K")])
    model, feeds = with_plain_conv(model, {"x": rand(1, 4, 7, 7), "cond": np.array(True)})
    _, report = check(model, feeds, full=full, rank_multiple=1, **({"ranks": {"plain": 6}} if full else {}))
    skipped(report, "conv", "shared with another node")
    skipped(report, "then_conv", "shared with another node")


def test_overridable_initializer_is_not_folded():
    """Transpose(W) with W an overridable initializer: not a constant, so not folded into one."""
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t"),
             helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [4, 32]), vi("W", [16, 32])], [vi("y", [4, 16])],
                       [numpy_helper.from_array(rand(16, 32), "W")])
    optimized, report = check(model, {"x": rand(4, 32)})
    skipped(report, "mm", "not a constant")
    x, W2 = rand(4, 32), rand(16, 32)
    np.testing.assert_allclose(run(optimized, {"x": x, "W": W2})[0], x @ W2.T, rtol=1e-4, atol=1e-4)
