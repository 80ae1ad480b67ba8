"""Conv factorization: exactness against ONNX Runtime, data-aware fits, skips, the latency guard, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr import conv_factors as cf
from onnxlr.errors import OnnxlrError
from onnxlr.conv_factors import candidates
from onnxlr.passes.factorize_conv import FactorizeConv, FactorizeConvConfig, rewrite
from onnxlr.pipeline import PassManager
from onnxlr.runtimes import latency_guard as lg


def conv_model(W, b=None, *, op="Conv", size=(9, 9), batch="N", **attrs):
    inputs = ["x", "W"] + (["b"] if b is not None else [])
    inits = [numpy_helper.from_array(W.astype(np.float32), "W")]
    if b is not None:
        inits.append(numpy_helper.from_array(b.astype(np.float32), "b"))
    cin = W.shape[1] * int(attrs.get("group", 1)) if op == "Conv" else W.shape[0]
    node = helper.make_node(op, inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:  # give the output its inferred shape, as exporters do
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
    except Exception:  # noqa: BLE001 - e.g. 3-D convs ORT rejects anyway
        pass
    return model


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def factorize(model, **config):
    optimized, records = PassManager([FactorizeConv(FactorizeConvConfig(**config))]).run(model)
    return optimized, records[0]


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    strides = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilations = [draw(st.integers(1, 2)) for _ in range(dims)]
    attrs = {"kernel_shape": list(kernel), "strides": strides, "dilations": dilations}
    padding = draw(st.sampled_from(["pads", "SAME_UPPER", "SAME_LOWER", "VALID", "none"]))
    if padding == "pads":
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel] * 2
    elif padding != "none":
        attrs["auto_pad"] = padding
        if padding.startswith("SAME"):
            attrs.pop("dilations")  # ORT supports SAME_* only without dilation
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**16))
    return dims, kernel, attrs, cin, cout, seed, draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_every_decomposition_is_exact_at_full_rank(case):
    dims, kernel, attrs, cin, cout, seed, bias = case
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((cout, cin, *kernel))
    model = conv_model(W, rng.standard_normal(cout) if bias else None, size=(10,) * dims, **attrs)
    x = rng.standard_normal((2, cin, *(10,) * dims)).astype(np.float32)
    reference = run(model, x)
    for decomposition in ("channel", "spatial", "tucker2"):
        optimized, record = factorize(model, decomposition=decomposition, ranks={"conv": 10**6}, force=True,
                                      rank_multiple=1)
        if decomposition == "spatial" and dims == 1:
            assert record.skipped  # spatial SVD needs two spatial axes: no candidate
            continue
        assert record.rewritten and record.rewritten[0].details["decomposition"] == decomposition
        np.testing.assert_allclose(run(optimized, x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
def test_im2col_rows_times_the_channel_matrix_is_the_conv(auto_pad):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 3, 3, 2))
    attrs = {"strides": [2, 1]}
    if auto_pad == "NOTSET":
        attrs["pads"] = [1, 0, 0, 1]
    else:
        attrs["auto_pad"] = auto_pad
    model = conv_model(W, size=(7, 6), **attrs)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    y = run(model, x)
    pads = cf.explicit_pads((7, 6), (3, 2), [2, 1], [1, 1], attrs.get("pads"), auto_pad)
    rows = cf.im2col(x, (3, 2), [2, 1], pads, [1, 1])
    expected = y.transpose(0, 2, 3, 1).reshape(-1, 5)
    np.testing.assert_allclose(rows @ cf.channel_matrix(W), expected, rtol=1e-4, atol=1e-4)


def _calib_error(model, optimized, x):
    ref = run(model, x)
    return np.linalg.norm(run(optimized, x) - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("decomposition", ["channel", "spatial", "tucker2"])
def test_data_aware_fits_beat_plain_ones_on_the_calibration_data(decomposition):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((12, 8, 3, 3))
    model = conv_model(W, rng.standard_normal(12), size=(12, 12), pads=[1, 1, 1, 1])
    # Correlated, non-centred channels: where the data-aware fit differs from the plain one.
    mix = rng.standard_normal((8, 8)) * (0.6 ** np.arange(8))[:, None]
    x = (np.einsum("nchw,cd->ndhw", rng.standard_normal((16, 8, 12, 12)), mix) + 0.3).astype(np.float32)
    errors = {}
    for calib in (None, [{"x": x}]):
        optimized, report = onnxlr.optimize(model, calib=calib, conv=decomposition, conv_ratio=0.3, validate=False)
        change = report.pass_named("factorize_conv").rewritten[0]
        assert change.details["data_aware"] is (calib is not None)
        errors[calib is not None] = _calib_error(model, optimized, x)
    assert errors[True] < errors[False]


def test_rank_rounding_keeps_most_of_the_rank():
    from onnxlr.conv_factors import _round

    assert _round(70.4, 8, 100) == 64 and _round(15.2, 8, 100) == 15 and _round(0.4, 8, 100) == 1
    assert _round(70, 8, 50) == 48 and _round(7, 1, 100) == 7


def test_a_layer_error_bound_leaves_hopeless_convs_dense():
    rng = np.random.default_rng(8)
    model = conv_model(rng.standard_normal((16, 16, 1, 1)), size=(6, 6))  # random: no low-rank structure
    _, record = factorize(model, param_ratio=0.5, max_layer_error=0.05)
    assert not record.rewritten and "errs above 0.05" in record.skipped[0].reason
    _, record = factorize(model, param_ratio=0.5, max_layer_error=0.99)
    assert record.rewritten


def test_auto_keeps_the_candidate_with_the_lowest_error_and_rounds_ranks():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((64, 32, 3, 3))
    found = candidates(W, ("channel", "spatial", "tucker2"), 0.4 * W.size, None, 8, None)
    assert {c.decomposition for c in found} == {"channel", "spatial", "tucker2"}
    # aligned to 8 unless that would give up more than 10% of the rank
    assert all(r % 8 == 0 or r - r % 8 < 0.9 * r for c in found for r in c.ranks)
    assert any(r % 8 == 0 for c in found for r in c.ranks)
    assert all(c.params <= 0.4 * W.size for c in found)
    _, record = factorize(conv_model(W, size=(8, 8)), param_ratio=0.4)
    chosen = record.rewritten[0].details
    assert chosen["decomposition"] == min(found, key=lambda c: c.error).decomposition


@pytest.mark.parametrize("kind,needle", [("group", "grouped conv"), ("depthwise", "depthwise"),
                                         ("transpose", "ConvTranspose"), ("3d", "3-D convolution")])
def test_convs_that_are_not_factorized_say_why(kind, needle):
    rng = np.random.default_rng(3)
    if kind == "group":
        model = conv_model(rng.standard_normal((6, 2, 3, 3)), group=2)
    elif kind == "depthwise":
        model = conv_model(rng.standard_normal((4, 1, 3, 3)), group=4)
    elif kind == "transpose":
        model = conv_model(rng.standard_normal((4, 6, 2, 2)), op="ConvTranspose", strides=[2, 2])
    else:
        model = conv_model(rng.standard_normal((4, 3, 2, 2, 2)), size=(5, 5, 5))
    optimized, record = factorize(model, param_ratio=0.3)
    assert not record.rewritten and needle in record.skipped[0].reason
    assert [n.op_type for n in optimized.graph.node] == [model.graph.node[0].op_type]


def test_latency_guard_measures_once_caches_and_falls_back(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    model = conv_model(rng.standard_normal((32, 16, 3, 3)), size=(16, 16), pads=[1, 1, 1, 1])
    calls = []

    def fake(self, original, replaced, shape):  # only tucker2 (three convs) counts as faster
        calls.append(len(replaced.graph.node))
        return (1.0, 0.5) if len(replaced.graph.node) == 3 else (1.0, 1.5)

    monkeypatch.setattr(lg.LatencyGuard, "_measure", fake)
    cache = tmp_path / "latency.json"
    guard = lg.LatencyGuard({"x": [1, 16, 16, 16]}, rewrite, cache=cache)
    _, records = PassManager([FactorizeConv(FactorizeConvConfig(param_ratio=0.4), accept=guard)]).run(model)
    details = records[0].rewritten[0].details
    assert details["decomposition"] == "tucker2" and "0.50x" in details["latency"]["tucker2"]
    measured = len(calls)
    assert measured >= 1 and cache.exists()
    again = lg.LatencyGuard({"x": [1, 16, 16, 16]}, rewrite, cache=cache)
    PassManager([FactorizeConv(FactorizeConvConfig(param_ratio=0.4), accept=again)]).run(model)
    assert len(calls) == measured  # every verdict came from the disk cache

    monkeypatch.setattr(lg.LatencyGuard, "_measure", lambda *a: (1.0, 2.0))
    slow = lg.LatencyGuard({"x": [1, 16, 16, 16]}, rewrite, cache=None)
    _, records = PassManager([FactorizeConv(FactorizeConvConfig(param_ratio=0.4), accept=slow)]).run(model)
    assert not records[0].rewritten and "not faster" in records[0].skipped[0].reason


def test_latency_guard_really_times_onnx_runtime():
    rng = np.random.default_rng(5)
    model = conv_model(rng.standard_normal((16, 8, 3, 3)), size=(12, 12), pads=[1, 1, 1, 1])
    guard = lg.LatencyGuard({"x": [1, 8, 12, 12]}, rewrite, cache=None, repeats=5)
    _, records = PassManager([FactorizeConv(FactorizeConvConfig(decomposition="channel", param_ratio=0.5),
                                            accept=guard)]).run(model)
    change = records[0].layers[0]
    assert " ms -> " in str(change.details["latency"]["channel"])
    unknown = lg.LatencyGuard({}, rewrite, cache=None)
    _, records = PassManager([FactorizeConv(FactorizeConvConfig(param_ratio=0.5), accept=unknown)]).run(model)
    assert "input shape unknown" in records[0].rewritten[0].details["latency"][records[0].rewritten[0].details["decomposition"]]


def test_api_and_cli_options(tmp_path, capsys):
    from onnxlr.cli import main

    rng = np.random.default_rng(6)
    model = conv_model(rng.standard_normal((16, 8, 3, 3)), rng.standard_normal(16), size=(8, 8), pads=[1, 1, 1, 1])
    kept, report = onnxlr.optimize(model, conv="none", validate=False)
    assert report.pass_named("factorize_conv") is None and len(kept.graph.node) == 1
    with pytest.raises(OnnxlrError, match="unknown conv decomposition"):
        onnxlr.optimize(model, conv="cp", validate=False)
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--conv", "spatial", "--conv-ratio", "0.5",
                 "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "spatial rank" in text and out.exists()
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Conv"]


LIGHT_MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                "squeezenet", "vgg19", "zfnet512"]


@pytest.mark.slow
@pytest.mark.parametrize("index,name", list(enumerate(LIGHT_MODELS)))
def test_onnx_backend_light_models_stay_equal_at_full_rank(index, name):
    """Real architectures from onnx's backend test data (opset 9, IR 3, weights computed by
    ConstantOfShape): folded, every conv rewritten at full rank, outputs unchanged."""
    import os

    from onnxlr.graph import import_graph
    from onnxlr.matching import find_convs
    from onnxlr.passes.fold_constants import FoldConstants

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in this onnx build")
    model = onnx.load(path)
    folded, _ = PassManager([FoldConstants()]).run(model)
    convs, _ = find_convs(import_graph(folded))
    decomposition = ("channel", "spatial", "tucker2")[index % 3]  # every decomposition on three graphs
    ranks = {layer.node.name: 10**6 for layer in convs}
    optimized, report = onnxlr.optimize(model, conv=decomposition, ranks=ranks, force=True, repeats=1,
                                        batch_size=1)
    record = report.pass_named("factorize_conv")
    assert len(record.rewritten) == len(convs) > 0
    assert {change.details["decomposition"] for change in record.rewritten} == {decomposition}
    for output in report.validation.providers[0].outputs:
        assert output.rel_l2 < 1e-4, (name, output)


@pytest.mark.parametrize("decomposition", ["channel", "spatial", "tucker2"])
def test_data_aware_full_rank_is_exact_where_calibration_data_never_reach(decomposition):
    # Calibration images use 2 of 6 channels: the patch Gram is rank deficient. The fit must still
    # reproduce the conv on inputs that use every channel (a raw-Gram refit drifts there).
    rng = np.random.default_rng(7)
    W = rng.standard_normal((8, 6, 3, 3))
    model = conv_model(W, rng.standard_normal(8), size=(8, 8), pads=[1, 1, 1, 1])
    calib = np.zeros((4, 6, 8, 8), np.float32)
    calib[:, :2] = rng.standard_normal((4, 2, 8, 8))
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    optimized, _ = onnxlr.optimize(model, calib=[{"x": calib}], conv=decomposition, ranks={"conv": 10**6},
                                   force=True, rank_multiple=1, validate=False)
    np.testing.assert_allclose(run(optimized, x), run(model, x), rtol=1e-3, atol=1e-3)
