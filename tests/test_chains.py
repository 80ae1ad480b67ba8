"""Linear chains (issue #10): the composition math, the pass on generated and hand-built graphs, the
CLI/API, and the reference model that has chains (PP-OCRv4's detector)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import message_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxlr.passes.compose_chains import ComposeChainsConfig, ComposeLinearChains
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.passes.fold_constants import FoldConstants
from onnxlr.passes.linear_chains import find_chains

from onnxlr import api, chains, cli
from onnxlr.chains import AffineMap
from onnxlr.graph import import_graph
from onnxlr.pipeline import PassManager
from onnxlr.statistics import TensorStats

OPSET = 17
RTOL = 1e-4  # max|y' - y| <= RTOL * (1 + max|y|): float32 round-off through a recomposed chain
CHAINS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ort.set_default_logger_severity(3)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_close(ref, got, what=""):
    for y, y2 in zip(ref, got):
        assert y.shape == y2.shape, f"{what}: shape {y2.shape} != {y.shape}"
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        err = float(np.max(np.abs(y2.astype(np.float64) - y))) if y.size else 0.0
        assert err <= RTOL * (1 + scale), f"{what}: max abs error {err:.3g} > {RTOL} * (1 + {scale:.3g})"


def compose_pass(model, max_error=0.0, stats=None):
    return PassManager([ComposeLinearChains(ComposeChainsConfig(max_error=max_error), stats)]).run(model)


def stats_of(rows: np.ndarray) -> TensorStats:
    st_ = TensorStats.zeros(rows.shape[1])
    st_.update(rows)
    return st_


# =============================================================================================== math


@st.composite
def affine_maps(draw):
    """2-5 chained affine maps of widths 1-9, some diagonal (elementwise scale and shift)."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    width = draw(st.integers(1, 9))
    maps = []
    for _ in range(draw(st.integers(2, 5))):
        if draw(st.booleans()):
            n = draw(st.integers(1, 9))
            maps.append(AffineMap.linear(rng.standard_normal((width, n)), rng.standard_normal(n)))
            width = n
        else:
            maps.append(AffineMap.elementwise(rng.standard_normal(width), rng.standard_normal(width)))
    return maps


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(maps=affine_maps(), seed=st.integers(0, 99))
def test_compose_equals_applying_the_maps_in_turn(maps, seed):
    x = np.random.default_rng(seed).standard_normal((7, maps[0].shape[0]))
    y = x
    for m in maps:
        y = y @ m.W + m.b
    composed = chains.compose(maps)
    np.testing.assert_allclose(x @ composed.W + composed.b, y, rtol=1e-10, atol=1e-10)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(maps=affine_maps())
def test_fit_at_zero_error_reproduces_the_composed_map(maps):
    composed = chains.compose(maps)
    fit = chains.fit_chain(composed, max_error=0.0)
    W_hat = fit.A if fit.dense else fit.A @ fit.B
    np.testing.assert_allclose(W_hat, composed.W, atol=1e-6 * (1 + np.abs(composed.W).max()))
    np.testing.assert_allclose(fit.bias, composed.b)
    k, n = composed.shape
    assert fit.params <= k * n + n  # never dearer than the dense map
    if not fit.dense:
        assert fit.width <= np.linalg.matrix_rank(composed.W) and fit.width * (k + n) < k * n


def test_width_is_the_rank_of_the_product_not_the_intermediate_width():
    rng = np.random.default_rng(0)
    maps = [AffineMap.linear(rng.standard_normal((64, 5))), AffineMap.linear(rng.standard_normal((5, 256))),
            AffineMap.linear(rng.standard_normal((256, 64)), rng.standard_normal(64))]
    fit = chains.fit_chain(chains.compose(maps), max_error=0.0)
    assert not fit.dense and fit.width == 5
    assert fit.params == 5 * (64 + 64) + 64 < 64 * 5 + 5 * 256 + 256 * 64 + 64
    assert fit.error < 1e-6


def test_calibrated_width_follows_the_data():
    """Inputs living in a 3-dimensional affine subspace: the calibrated width is 3 where the weights
    alone need their full rank; the fit is exact on such inputs (mean folded into the bias)."""
    rng = np.random.default_rng(1)
    k, n = 32, 24
    X = rng.standard_normal((500, 3)) @ rng.standard_normal((3, k)) + rng.standard_normal(k)
    chain = AffineMap(rng.standard_normal((k, n)), rng.standard_normal(n))
    st_ = stats_of(X)
    free = chains.fit_chain(chain, max_error=1e-3)
    calibrated = chains.fit_chain(chain, max_error=1e-3, gram=st_.gram, total=st_.sum, count=st_.count)
    assert free.dense and not free.calibrated
    assert calibrated.calibrated and not calibrated.dense and calibrated.width == 3
    y, y_hat = X @ chain.W + chain.b, X @ calibrated.A @ calibrated.B + calibrated.bias
    direct = np.linalg.norm(y - y_hat) / np.linalg.norm(y)
    assert direct < 1e-5 and calibrated.error == pytest.approx(direct, abs=1e-7)


def test_calibrated_width_meets_the_error_it_was_given():
    rng = np.random.default_rng(2)
    k, n = 48, 40
    X = rng.standard_normal((800, k)) * np.geomspace(1.0, 1e-3, k)  # decaying input spectrum
    chain = AffineMap(rng.standard_normal((k, n)), np.zeros(n))
    st_ = stats_of(X)
    for max_error in (1e-1, 1e-2, 1e-3):
        fit = chains.fit_chain(chain, max_error=max_error, gram=st_.gram, total=st_.sum, count=st_.count)
        if fit.dense:
            continue
        y = X @ chain.W
        direct = np.linalg.norm(y - (X @ fit.A @ fit.B + fit.bias)) / np.linalg.norm(y)
        assert direct <= max_error and fit.error == pytest.approx(direct, rel=1e-6, abs=1e-9)
        smaller = chains.fit_chain(chain, max_error=max_error * 10, gram=st_.gram, total=st_.sum, count=st_.count)
        assert smaller.dense or smaller.width <= fit.width


def test_the_width_is_the_smallest_meeting_the_error():
    """Against brute force over every width: data-free (weight spectrum) and calibrated (the error on
    the calibration rows of the whitened factors, mean folded into the bias)."""
    rng = np.random.default_rng(9)
    k, n = 40, 30
    W = rng.standard_normal((k, n)) * np.geomspace(1.0, 1e-4, n)
    b = rng.standard_normal(n)
    X = rng.standard_normal((300, k)) * np.geomspace(1.0, 1e-2, k) + 0.5
    st_ = stats_of(X)
    s = np.linalg.svd(W, compute_uv=False)
    mean = st_.mean
    eig = chains.linalg.clamped_eigh(st_.gram - st_.count * np.outer(mean, mean))
    whitened = chains.linalg.WhitenedSVD.fit(W, eig, solver="exact")

    def calibrated_error(r):
        A, B = whitened.factors(r)
        return chains.affine_error(W, b, A @ B, b + mean @ (W - A @ B), st_.gram, st_.sum, st_.count)

    for max_error in (1e-1, 1e-2, 1e-3, 1e-4):
        for data, error_at in ((False, lambda r: chains.linalg.relative_error_at_rank(s, r)), (True, calibrated_error)):
            fit = chains.fit_chain(AffineMap(W, b), max_error=max_error,
                                   **({"gram": st_.gram, "total": st_.sum, "count": st_.count} if data else {}))
            widths = [r for r in range(1, (k * n - 1) // (k + n) + 1) if error_at(r) <= max_error]
            if not widths:
                assert fit.dense
            else:
                assert not fit.dense and fit.width == widths[0], (max_error, data)
                assert fit.error == pytest.approx(error_at(widths[0]), rel=1e-9, abs=1e-12)


def test_affine_error_from_statistics_matches_the_direct_computation():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 6)) + 2.0
    W, b = rng.standard_normal((6, 4)), rng.standard_normal(4)
    W2, b2 = W + 0.1 * rng.standard_normal((6, 4)), b + 0.1
    direct = np.linalg.norm((X @ W + b) - (X @ W2 + b2)) / np.linalg.norm(X @ W + b)
    st_ = stats_of(X)
    assert chains.affine_error(W, b, W2, b2, st_.gram, st_.sum, st_.count) == pytest.approx(direct, rel=1e-9)


# ============================================================================================ graphs


@dataclasses.dataclass
class Built:
    model: onnx.ModelProto
    input_shape: list[int]
    kinds: list[str]  # "linear", "affine" or "layout", per node

    def feeds(self, seed=0):
        return {"x": np.random.default_rng(seed).standard_normal(self.input_shape).astype(np.float32)}


@st.composite
def chain_models(draw) -> Built:
    """A model that is one linear chain by construction: 2-4 linear layers — MatMul, Gemm, 1×1 Conv
    (1-D or 2-D; the first may stride and pad), with or without bias — each followed by 0-3 ops drawn
    from per-feature Add/Sub/Mul/Div (constant on either side, scalar or per-feature, leading 1s or
    not), BatchNormalization, Identity, Transposes that move the feature axis (NCHW ↔ NHWC, NCL ↔ NLC,
    swapped leading axes) and Reshapes that regroup rows (explicit width, 0 or -1 as the last entry).
    Shapes are tracked so every op is valid; where no layer fits the current layout a Transpose puts
    the features back on an axis one does."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    layout = draw(st.sampled_from(["rows", "seq", "conv"]))
    batch = draw(st.integers(1, 3))
    width = draw(st.integers(1, 12))
    if layout == "rows":
        shape, axis = [batch, width], 1
    elif layout == "seq":
        shape, axis = [batch, draw(st.integers(1, 4)), width], 2
    else:
        shape, axis = [batch, width, draw(st.integers(1, 5)), draw(st.integers(1, 5))], 1
    input_shape = list(shape)
    nodes, inits, kinds = [], [], []
    state = {"current": "x", "i": 0}

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def add(op, inputs, kind, **attrs):
        i = state["i"]
        out = f"t{i}"
        nodes.append(helper.make_node(op, [state["current"] if x is None else x for x in inputs], [out],
                                      name=f"n{i}_{op.lower()}", **attrs))
        kinds.append(kind)
        state["current"], state["i"] = out, i + 1

    def transpose(perm):
        nonlocal shape, axis
        add("Transpose", [None], "layout", perm=perm)
        shape, axis = [shape[p] for p in perm], perm.index(axis)

    layers = draw(st.integers(2, 4))
    for layer in range(layers):
        rank = len(shape)
        options = (["MatMul"] + (["Gemm"] if rank == 2 else [])) if axis == rank - 1 else []
        options += ["Conv"] if axis == 1 and rank >= 3 else []
        if not options:  # features on a middle axis: move them last
            perm = list(range(rank))
            perm.append(perm.pop(axis))
            transpose(perm)
            options = ["MatMul"]
        op = draw(st.sampled_from(options))
        n = draw(st.integers(1, 12))
        i = state["i"]
        if op == "MatMul":
            add("MatMul", [None, const(f"W{i}", rng.standard_normal((width, n)).astype(np.float32))], "linear")
            shape = shape[:-1] + [n]
        elif op == "Gemm":
            trans_b = draw(st.booleans())
            w = rng.standard_normal((n, width) if trans_b else (width, n)).astype(np.float32)
            inputs = [None, const(f"W{i}", w)]
            c_shape = draw(st.sampled_from([None, (n,), (1, n), (1,)]))
            if c_shape is not None:
                inputs.append(const(f"C{i}", rng.standard_normal(c_shape).astype(np.float32)))
            add("Gemm", inputs, "linear", transB=int(trans_b), alpha=draw(st.sampled_from([1.0, 0.5])),
                beta=draw(st.sampled_from([1.0, -2.0])))
            shape = [shape[0], n]
        else:
            spatial = rank - 2
            attrs = {"kernel_shape": [1] * spatial}
            if layer == 0 and draw(st.booleans()):  # only the first layer may stride and pad
                attrs["strides"] = [draw(st.integers(1, 2)) for _ in range(spatial)]
                attrs["pads"] = [draw(st.integers(0, 1)) for _ in range(2 * spatial)]
            inputs = [None, const(f"W{i}", rng.standard_normal((n, width, *[1] * spatial)).astype(np.float32))]
            if draw(st.booleans()):
                inputs.append(const(f"B{i}", rng.standard_normal(n).astype(np.float32)))
            add("Conv", inputs, "linear", **attrs)
            strides, pads = attrs.get("strides", [1] * spatial), attrs.get("pads", [0] * 2 * spatial)
            shape = [shape[0], n, *[(d + pads[j] + pads[j + spatial] - 1) // strides[j] + 1
                                    for j, d in enumerate(shape[2:])]]
        width = n
        for _ in range(draw(st.integers(0, 3))):
            rank = len(shape)
            fillers = ["Add", "Sub", "Mul", "Div", "Identity", "Transpose", "Transpose"]
            if axis == 1 and rank >= 3:
                fillers.append("BatchNormalization")
            if axis == rank - 1 and rank in (2, 3):
                fillers += ["Reshape", "Reshape"]
            filler = draw(st.sampled_from(fillers))
            i = state["i"]
            if filler == "BatchNormalization":
                params = [const(f"bn{i}_{p}", v.astype(np.float32)) for p, v in (
                    ("scale", rng.standard_normal(width)), ("bias", rng.standard_normal(width)),
                    ("mean", rng.standard_normal(width)), ("var", rng.uniform(0.5, 2.0, width)))]
                add("BatchNormalization", [None, *params], "affine", epsilon=1e-5)
            elif filler in ("Add", "Sub", "Mul", "Div"):
                full = [1] * rank
                full[axis] = draw(st.sampled_from([1, width]))
                c = rng.standard_normal(full[draw(st.integers(0, axis)):])  # leading 1s may be dropped
                if filler == "Div":
                    c = np.sign(c) * (np.abs(c) + 0.5)
                c = const(f"c{i}", c.astype(np.float32))
                swap = filler != "Div" and draw(st.booleans())
                add(filler, [c, None] if swap else [None, c], "affine")
            elif filler == "Identity":
                add("Identity", [None], "layout")
            elif filler == "Transpose":
                if rank == 2:
                    continue
                perm = {4: {1: [0, 2, 3, 1], 3: [0, 3, 1, 2]}, 3: {1: [0, 2, 1], 2: [0, 2, 1]}}[rank].get(axis)
                transpose(perm if perm and draw(st.booleans()) else [1, 0, *range(2, rank)] if axis >= 2 else perm)
            else:  # Reshape: regroup the rows, the features stay last
                rows = int(np.prod(shape[:-1]))
                entry = draw(st.sampled_from(["width", "zero", "minus"]))
                if rank == 2:
                    target, new = ([1, -1, width], [1, rows, width]) if entry != "zero" else ([0, 0], shape)
                else:
                    target, new = {"width": ([-1, width], [rows, width]), "minus": ([rows, -1], [rows, width]),
                                   "zero": ([0, 0, 0], shape)}[entry]
                add("Reshape", [None, const(f"s{i}", np.array(target, np.int64))], "layout")
                shape, axis = list(new), len(new) - 1
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(state["current"], TensorProto.FLOAT, shape)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return Built(model, input_shape, kinds)


def expected_chain(kinds: list[str]) -> tuple[int, int] | None:
    """(first, end) node indices of the chain a generated model holds: from the first linear layer to
    the last one plus the affine ops right after it; None with fewer than two linear layers."""
    linear = [i for i, k in enumerate(kinds) if k == "linear"]
    if len(linear) < 2:
        return None
    end = linear[-1] + 1
    while end < len(kinds) and kinds[end] == "affine":
        end += 1
    return linear[0], end


@CHAINS
@given(built=chain_models())
def test_generated_chains_are_found_and_exact_at_full_width(built):
    model = built.model
    found = find_chains(import_graph(model))
    span = expected_chain(built.kinds)
    if span is None:
        assert found == []
        return
    assert len(found) == 1
    assert [s.node.name for s in found[0].steps] == [n.name for n in model.graph.node[span[0]:span[1]]]
    optimized, [record] = compose_pass(model)
    onnx.checker.check_model(optimized, full_check=True)
    [change] = record.layers
    if change.action == "rewritten":
        assert change.details["params_after"] < change.details["params"]
        assert sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in optimized.graph.node) <= 2
    else:
        assert "saves no parameters" in change.reason
    feeds = built.feeds()
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds), "composed chain")


@CHAINS
@given(built=chain_models())
def test_generated_chains_calibrated_are_exact_on_the_calibration_data(built):
    model = built.model
    found = find_chains(import_graph(model))
    if not found:
        return
    feeds = [built.feeds(seed) for seed in range(24)]
    optimized, report = api.optimize(model, recipe="chains", chains=0.0, calib=feeds, validate=False)
    [record] = [r for r in report.passes if r.name == "compose_chains"]
    details = record.layers[0].details
    assert details["calibrated"] or "too few to trust" in details["note"]
    for f in feeds:
        assert_close(ort_run(model, f), ort_run(optimized, f), "calibrated chain")


def _model(nodes, inits, input_shape, output_shapes, opset=OPSET):
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in output_shapes.items()]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)], outputs,
                              initializer=[numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                                           for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(widths, between=None, rng=None, bias=True):
    """x → MatMul(+Add) → [between] → MatMul(+Add) … with the given widths; ``between``: node kinds
    inserted after the first layer's output (e.g. ["Relu"])."""
    rng = rng or np.random.default_rng(0)
    nodes, inits, current = [], {}, "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        inits[f"W{i}"] = rng.standard_normal((k, n)) / np.sqrt(k)
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        current = f"h{i}"
        if bias:
            inits[f"b{i}"] = rng.standard_normal(n)
            nodes.append(helper.make_node("Add", [current, f"b{i}"], [f"y{i}"], name=f"fc{i}_bias"))
            current = f"y{i}"
        if i == 0 and between:
            for j, op in enumerate(between):
                nodes.append(helper.make_node(op, [current], [f"m{j}"], name=f"mid{j}"))
                current = f"m{j}"
    return _model(nodes, inits, ["N", widths[0]], {current: ["N", widths[-1]]})


def test_too_few_calibration_rows_fall_back_to_the_weights():
    """A chain fed by a pooled vector sees one row per sample: 3 rows cannot pin down 64 inputs, so
    the width is not cut to the rank of those rows (it would be wrong on any other input)."""
    model = mlp([64, 8, 64])
    rows = np.random.default_rng(2).standard_normal((3, 64))
    _, [record] = compose_pass(model, max_error=1e-3, stats={"x": stats_of(rows)})
    [change] = record.layers
    assert not change.details["calibrated"] and "3 calibration rows for 64 inputs" in change.details["note"]
    assert change.details["new_widths"] == [64, 8, 64]  # the weights' rank, not the 3 rows'
    _, [record] = compose_pass(model, max_error=1e-3, stats={"x": stats_of(np.repeat(rows, 100, axis=0))})
    assert record.layers[0].details["calibrated"] and record.layers[0].details["new_widths"] == [64, 2, 64]


def test_dense_when_the_composed_map_is_cheaper():
    model = mlp([16, 64, 16])
    optimized, [record] = compose_pass(model)
    [change] = record.rewritten
    assert change.details["form"] == "dense" and change.details["new_widths"] == [16, 16]
    assert change.details["widths"] == [16, 64, 16]
    assert [n.op_type for n in optimized.graph.node] == ["MatMul", "Add"]
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)}
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds))


def test_pair_at_the_rank_of_a_bottleneck():
    model = mlp([64, 4, 96, 64])
    optimized, [record] = compose_pass(model)
    [change] = record.rewritten
    assert change.details["form"] == "pair" and change.details["new_widths"] == [64, 4, 64]
    assert change.details["params_after"] == 4 * 128 + 64
    assert [n.op_type for n in optimized.graph.node] == ["MatMul", "MatMul", "Add"]
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)}
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds))


def test_branch_in_the_middle_is_left_alone():
    """The first layer's output is also read by a second branch: no chain, nothing rewritten."""
    rng = np.random.default_rng(0)
    inits = {"W0": rng.standard_normal((8, 32)), "W1": rng.standard_normal((32, 8)), "W2": rng.standard_normal((32, 4))}
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
             helper.make_node("MatMul", ["h", "W1"], ["y"], name="fc1"),
             helper.make_node("MatMul", ["h", "W2"], ["z"], name="side")]
    model = _model(nodes, inits, ["N", 8], {"y": ["N", 8], "z": ["N", 4]})
    assert find_chains(import_graph(model)) == []
    optimized, [record] = compose_pass(model)
    assert record.layers == []
    assert [n.name for n in optimized.graph.node] == [n.name for n in model.graph.node]
    # the branch after the second layer instead: fc0 → fc1 is a chain, side keeps reading its output
    nodes[2] = helper.make_node("Relu", ["y"], ["z"], name="side")
    model = _model(nodes, inits, ["N", 8], {"y": ["N", 8], "z": ["N", 8]})
    [chain] = find_chains(import_graph(model))
    assert [s.node.name for s in chain.steps] == ["fc0", "fc1"]
    optimized, _ = compose_pass(model)
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds))


@pytest.mark.parametrize("case", ["relu", "graph_output", "split_heads", "feature_axis_moved", "padded_second_conv",
                                  "varying_constant", "side_output"])
def test_what_ends_a_chain(case):
    rng = np.random.default_rng(0)
    W0, W1 = rng.standard_normal((8, 16)), rng.standard_normal((16, 8))
    if case == "relu":
        model = mlp([8, 16, 8], between=["Relu"])
    elif case == "graph_output":  # the intermediate is a graph output itself
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
                 helper.make_node("MatMul", ["h", "W1"], ["y"], name="fc1")]
        model = _model(nodes, {"W0": W0, "W1": W1}, ["N", 8], {"y": ["N", 8], "h": ["N", 16]})
    elif case == "split_heads":  # (N, S, 16) -> (N, S, 4, 4): the features are split, not moved
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
                 helper.make_node("Reshape", ["h", "s"], ["r"], name="split"),
                 helper.make_node("MatMul", ["r", "W1s"], ["y"], name="fc1")]
        model = _model(nodes, {"W0": W0, "s": np.array([0, 0, 4, 4], np.int64), "W1s": rng.standard_normal((4, 8))},
                       ["N", 3, 8], {"y": ["N", 3, 4, 8]})
    elif case == "feature_axis_moved":  # a Transpose puts the features on axis 1: the next MatMul mixes sequence
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
                 helper.make_node("Transpose", ["h"], ["t"], name="swap", perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["t", "W1s"], ["y"], name="fc1")]
        model = _model(nodes, {"W0": W0, "W1s": rng.standard_normal((3, 5))}, ["N", 3, 8], {"y": ["N", 16, 5]})
    elif case == "padded_second_conv":
        nodes = [helper.make_node("Conv", ["x", "C0", "B0"], ["h"], name="c0", kernel_shape=[1, 1]),
                 helper.make_node("Conv", ["h", "C1"], ["y"], name="c1", kernel_shape=[1, 1], pads=[1, 1, 1, 1])]
        model = _model(nodes, {"C0": rng.standard_normal((16, 8, 1, 1)), "B0": rng.standard_normal(16),
                               "C1": rng.standard_normal((8, 16, 1, 1))}, [1, 8, 4, 4], {"y": [1, 8, 6, 6]})
    elif case == "varying_constant":  # a positional table added: not a per-feature bias
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
                 helper.make_node("Add", ["h", "P"], ["p"], name="pos"),
                 helper.make_node("MatMul", ["p", "W1"], ["y"], name="fc1")]
        model = _model(nodes, {"W0": W0, "P": rng.standard_normal((3, 16)), "W1": W1}, ["N", 3, 8], {"y": ["N", 3, 8]})
    else:  # Dropout with its mask as a graph output
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
                 helper.make_node("Dropout", ["h"], ["d", "mask"], name="drop"),
                 helper.make_node("MatMul", ["d", "W1"], ["y"], name="fc1")]
        model = _model(nodes, {"W0": W0, "W1": W1}, ["N", 8], {"y": ["N", 8]})
        model.graph.output.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 16]))
    assert find_chains(import_graph(model)) == []
    optimized, [record] = compose_pass(model)
    assert record.layers == []
    assert len(optimized.graph.node) == len(model.graph.node)


def test_conv_chain_with_batchnorm_strides_and_a_transpose_to_a_matmul():
    """Conv 1×1 (stride 2, padded) → BN → Conv 1×1 → Transpose to NHWC → MatMul: one chain, composed
    to a strided, padded 1×1 conv pair or dense conv followed by the Transpose."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "C0", "B0"], ["h"], name="c0", kernel_shape=[1, 1], strides=[2, 2],
                              pads=[1, 0, 1, 0]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Conv", ["n", "C1"], ["c"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "W"], ["y"], name="fc")]
    inits = {"C0": rng.standard_normal((48, 6, 1, 1)), "B0": rng.standard_normal(48), "g": rng.standard_normal(48),
             "b": rng.standard_normal(48), "m": rng.standard_normal(48), "v": rng.uniform(0.5, 2, 48),
             "C1": rng.standard_normal((32, 48, 1, 1)), "W": rng.standard_normal((32, 10))}
    model = _model(nodes, inits, [2, 6, 7, 7], {"y": [2, 5, 4, 10]})
    [chain] = find_chains(import_graph(model))
    assert chain.widths() == [6, 48, 32, 10]
    optimized, [record] = compose_pass(model)
    [change] = record.rewritten
    assert change.details["new_widths"] == [6, 10] and change.details["form"] == "dense"
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Transpose"]
    feeds = {"x": rng.standard_normal((2, 6, 7, 7)).astype(np.float32)}
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds))


def test_after_factorization_a_pair_and_the_next_layer_become_one_pair():
    """``A·B`` (a factorized layer) followed by ``C``: composed and re-factorized as one pair at the
    factor's rank, exact, with fewer parameters than the factorized chain."""
    rng = np.random.default_rng(5)
    model = mlp([64, 96, 64], rng=rng)
    factorized, _ = PassManager([FactorizeMatMul(FactorizeMatMulConfig(ranks={"fc0": 8}))]).run(model)
    assert sum(n.op_type == "MatMul" for n in factorized.graph.node) == 3
    optimized, [record] = compose_pass(factorized)
    [change] = record.rewritten
    assert change.details["widths"] == [64, 8, 96, 64] and change.details["new_widths"] == [64, 8, 64]
    assert change.details["params_after"] == 8 * 128 + 64 < change.details["params"]
    assert sum(n.op_type == "MatMul" for n in optimized.graph.node) == 2
    feeds = {"x": rng.standard_normal((5, 64)).astype(np.float32)}
    assert_close(ort_run(factorized, feeds), ort_run(optimized, feeds))


def test_reshapes_keep_their_shape_constants_consistent():
    """(N, S, 16) → MatMul → Reshape(-1, 64) → MatMul(64 → 4) → Reshape(0-copied) keeps working at the
    new width: the explicit 64 becomes the pair's width."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
             helper.make_node("Reshape", ["h", "s"], ["r"], name="rows"),
             helper.make_node("MatMul", ["r", "W1"], ["y"], name="fc1")]
    model = _model(nodes, {"W0": rng.standard_normal((16, 3)) @ rng.standard_normal((3, 64)),
                           "s": np.array([-1, 64], np.int64), "W1": rng.standard_normal((64, 40))},
                   [2, 5, 16], {"y": [10, 40]})
    optimized, [record] = compose_pass(model)
    [change] = record.rewritten
    assert change.details["new_widths"] == [16, 3, 40]
    shapes = [numpy_helper.to_array(t) for t in optimized.graph.initializer if t.data_type == TensorProto.INT64]
    assert [list(s) for s in shapes] == [[-1, 3]]
    feeds = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32)}
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds))


def test_a_weight_read_elsewhere_is_not_counted_as_saved():
    rng = np.random.default_rng(7)
    inits = {"W0": rng.standard_normal((8, 32)), "W1": rng.standard_normal((32, 8))}
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
             helper.make_node("MatMul", ["h", "W1"], ["y"], name="fc1"),
             helper.make_node("MatMul", ["x", "W0"], ["z"], name="again")]
    model = _model(nodes, inits, ["N", 8], {"y": ["N", 8], "z": ["N", 32]})
    _, [record] = compose_pass(model)
    [change] = record.rewritten
    assert change.details["params"] == 32 * 8  # W0 stays for the other reader
    assert change.details["params_after"] == 8 * 8


def test_stats_tensors_are_the_chain_inputs_and_float16_stays_float16():
    model = mlp([16, 64, 16])
    assert [r.tensor for r in ComposeLinearChains(ComposeChainsConfig()).needs(import_graph(model))] == ["x"]
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for t in half.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*half.graph.input, *half.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    optimized, [record] = compose_pass(half)
    assert record.rewritten and all(t.data_type == TensorProto.FLOAT16 for t in optimized.graph.initializer)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float16)
    ref, got = ort_run(half, {"x": x})[0].astype(np.float64), ort_run(optimized, {"x": x})[0].astype(np.float64)
    assert np.max(np.abs(ref - got)) <= 2e-2 * (1 + np.max(np.abs(ref)))


def test_config_rejects_a_bad_error():
    with pytest.raises(Exception, match="chain max error"):
        ComposeChainsConfig(max_error=1.5)


# ========================================================================================== CLI, API


def test_cli_recipe_chains_writes_the_composed_model(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "m.chains.onnx"
    onnx.save(mlp([16, 64, 16]), path)
    before = path.read_bytes()
    assert cli.main(["optimize", str(path), "-o", str(out), "--recipe", "chains", "--dim", "N=4"]) == 0
    text = capsys.readouterr().out
    assert "pass compose_chains: 1 rewritten" in text
    assert "chain MatMul→Add→MatMul→Add  widths 16→64→16 -> 16→16 (dense)" in text
    assert path.read_bytes() == before
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Add"]


def test_cli_chains_after_factorization_on_calibration_data(tmp_path, capsys):
    rng = np.random.default_rng(8)
    path, out, calib = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz"
    onnx.save(mlp([32, 96, 32], rng=rng), path)
    np.savez(calib, x=rng.standard_normal((256, 32)).astype(np.float32))
    code = cli.main(["optimize", str(path), "-o", str(out), "--calib", str(calib), "--rank", "fc0=6", "--rank", "fc1=0",
                     "--chains", "--report", str(tmp_path / "r.json")])
    assert code == 0
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names.index("factorize_matmul") < names.index("compose_chains")
    [chain] = [c for p in report["passes"] if p["name"] == "compose_chains" for c in p["layers"]]
    assert chain["action"] == "rewritten" and chain["details"]["widths"] == [32, 6, 96, 32]
    assert chain["details"]["new_widths"] == [32, 6, 32] and chain["details"]["calibrated"]
    assert chain["details"]["calib_error"] < 1e-3


def test_cli_chains_with_quantization_composes_first(tmp_path):
    model = mlp([16, 64, 16])
    _, report = api.optimize(model, recipe="int8-weights", chains=1e-3, validate=False)
    names = [p.name for p in report.passes]
    assert names.index("compose_chains") < names.index("quantize_int8")


def test_cli_bad_chain_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(mlp([16, 64, 16]), path)
    assert cli.main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--chains", "1.5"]) == 2
    err = message_lines(capsys.readouterr().err)
    assert len(err) == 1 and "chain max error must be in [0, 1)" in err[0]
    assert not (tmp_path / "o.onnx").exists()


# ================================================================================= reference model


def test_ppocr_v4_detector_chains():
    """PP-OCRv4's detector (rapidocr-onnxruntime wheel) has four 1×1 conv → 1×1 conv chains in its
    neck; the 384→360→96 one composes to a dense 384→96 conv (173,160 → 36,960 parameters), exactly."""
    from onnxlr.models import ppocr, pypi_models  # noqa: F401  (ppocr: the real page images)
    path = pypi_models.locate("ppocrv4_det")
    if path is None:
        pytest.skip("rapidocr-onnxruntime is not installed (ships ch_PP-OCRv4_det_infer.onnx)")
    model = PassManager([FoldConstants()]).run(onnx.load(path))[0]
    found = find_chains(import_graph(model))
    assert [c.widths() for c in found] == [[48, 12, 96], [96, 18, 96], [192, 42, 96], [384, 360, 96]]
    optimized, [record] = compose_pass(model)
    [change] = record.rewritten
    assert change.details["widths"] == [384, 360, 96] and change.details["new_widths"] == [384, 96]
    assert (change.details["params"], change.details["params_after"]) == (173_160, 36_960)
    assert len(record.skipped) == 3
    feeds = pypi_models.sample_inputs("ppocrv4_det")
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds), "PP-OCRv4 det")
