"""Pruning: the numpy math (masks, unit scores, refit) and the graph passes, checked in ONNX Runtime."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import linalg, pruning
from onnxlr.errors import OnnxlrError
from onnxlr.graph import import_graph
from onnxlr.passes.prune_structured import PruneStructured, PruneStructuredConfig
from onnxlr.passes.prune_unstructured import PruneUnstructured, PruneUnstructuredConfig
from onnxlr.pipeline import PassManager
from onnxlr.runtimes.stats import collect_stats, collect_unfolded_stats
from onnxlr.statistics import channel_rows

IN, HIDDEN, OUT = 16, 64, 8


def run(model, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def make_model(nodes, inputs, outputs, arrays):
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in arrays.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def prune(model, pass_):
    out, records = PassManager([pass_]).run(model)
    onnx.checker.check_model(out, full_check=True)
    return out, records[0]


def mlp_arrays(seed=0, dead=0):
    """Weights of the GELU MLP; the last ``dead`` hidden units have zero W2 rows (carry nothing)."""
    rng = np.random.default_rng(seed)
    W2 = rng.standard_normal((HIDDEN, OUT)) / 8
    W2[HIDDEN - dead:] = 0.0
    return {"W1": rng.standard_normal((IN, HIDDEN)) / 4, "b1": 0.1 * rng.standard_normal(HIDDEN),
            "sqrt2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5),
            "W2": W2, "b2": 0.1 * rng.standard_normal(OUT)}


def gelu_mlp(seed=0, dead=0, extra_reader=False):
    """x -> MatMul W1 -> Add b1 (bias first, as torch exports) -> Erf GELU -> MatMul W2 -> Add b2 -> y.
    ``extra_reader``: the hidden tensor is also summed into a second output."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["pre0"], name="fc1"),
        helper.make_node("Add", ["b1", "pre0"], ["pre"], name="fc1_bias"),
        helper.make_node("Div", ["pre", "sqrt2"], ["scaled"], name="gelu_div"),
        helper.make_node("Erf", ["scaled"], ["erf"], name="gelu_erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], name="gelu_add"),
        helper.make_node("Mul", ["pre", "erf1"], ["gx"], name="gelu_mul"),
        helper.make_node("Mul", ["gx", "half"], ["hidden"], name="gelu_half"),
        helper.make_node("MatMul", ["hidden", "W2"], ["out0"], name="fc2"),
        helper.make_node("Add", ["out0", "b2"], ["y"], name="fc2_bias"),
    ]
    outputs = [vi("y", ["batch", OUT])]
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["hidden"], ["total"], name="spy", keepdims=0))
        outputs.append(vi("total", []))
    return make_model(nodes, [vi("x", ["batch", IN])], outputs, mlp_arrays(seed, dead))


def gemm_mlp(seed=0):
    """x -> Gemm(W1ᵀ, c1, transB=1) -> Relu -> Mul(per-unit scale (1, h)) -> Gemm(W2, c2, alpha) -> y."""
    w = mlp_arrays(seed)
    scale = np.random.default_rng(seed + 1).uniform(0.5, 2.0, (1, HIDDEN))
    arrays = {"W1t": w["W1"].T, "c1": w["b1"], "scale": scale, "W2": w["W2"], "c2": w["b2"]}
    nodes = [helper.make_node("Gemm", ["x", "W1t", "c1"], ["pre"], name="g1", transB=1),
             helper.make_node("Relu", ["pre"], ["act"], name="relu"),
             helper.make_node("Mul", ["act", "scale"], ["hidden"], name="unit_scale"),
             helper.make_node("Gemm", ["hidden", "W2", "c2"], ["y"], name="g2", alpha=0.5)]
    return make_model(nodes, [vi("x", ["batch", IN])], [vi("y", ["batch", OUT])], arrays)


def conv_bn_model(seed=0, conv2_bias=False):
    """x[N, 3, 8, 8] -> Conv(16, 3x3, bias) -> BatchNorm -> Relu -> Conv(4, 3x3) -> y."""
    rng = np.random.default_rng(seed)
    arrays = {"K1": rng.standard_normal((16, 3, 3, 3)) / 3, "c1": 0.1 * rng.standard_normal(16),
              "gamma": rng.uniform(0.5, 1.5, 16), "beta": 0.1 * rng.standard_normal(16),
              "mean": 0.1 * rng.standard_normal(16), "var": rng.uniform(0.5, 2.0, 16),
              "K2": rng.standard_normal((4, 16, 3, 3)) / 6}
    second = ["hidden", "K2"]
    if conv2_bias:
        arrays["c2"] = 0.1 * rng.standard_normal(4)
        second.append("c2")
    nodes = [helper.make_node("Conv", ["x", "K1", "c1"], ["c1out"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1out", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["hidden"], name="relu"),
             helper.make_node("Conv", second, ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 4, 8, 8])], arrays)


def sample(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_mask_keeps_exactly_n_of_every_m_highest_scores(n, m):
    scores = np.random.default_rng(0).random((6 * m, 5))
    keep = pruning.nm_mask(scores, n, m)
    groups = keep.reshape(-1, m, 5)
    assert np.all(groups.sum(axis=1) == n)
    kept_min = np.where(groups, scores.reshape(-1, m, 5), np.inf).min(axis=1)
    dropped_max = np.where(groups, -np.inf, scores.reshape(-1, m, 5)).max(axis=1)
    assert np.all(kept_min > dropped_max)


def test_nm_mask_rejects_k_not_divisible_by_m():
    with pytest.raises(ValueError, match="divisible by 4"):
        pruning.nm_mask(np.ones((6, 3)), 2, 4)


def test_wanda_mask_equals_brute_force_per_column_selection():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((20, 7))
    sq_norm = rng.uniform(0.1, 10.0, 20)
    keep = pruning.unstructured_mask(pruning.wanda_scores(W, sq_norm), 0.4)
    for j in range(7):
        metric = [abs(W[i, j]) * np.sqrt(sq_norm[i]) for i in range(20)]
        dropped = sorted(range(20), key=lambda i: metric[i])[:8]
        assert set(np.flatnonzero(~keep[:, j])) == set(dropped)


def hidden_data(seed=0, rows=400, h=12, n=5):
    """Correlated hidden activations with a non-zero mean, and a second layer."""
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((rows, 4)) @ rng.standard_normal((4, h)) + 0.3 * rng.standard_normal((rows, h)) + 1.0
    return H, rng.standard_normal((h, n)), rng.standard_normal(n)


def test_refit_with_mean_equals_affine_least_squares():
    H, W2, b2 = hidden_data()
    keep = np.array([0, 2, 3, 5, 8, 9, 11])
    W1 = np.random.default_rng(1).standard_normal((3, 12))
    design = np.hstack([H[:, keep], np.ones((len(H), 1))])
    solution = np.linalg.lstsq(design, H @ W2 + b2, rcond=None)[0]
    for ridge, tolerance in ((0.0, 1e-8), (1e-6, 1e-3)):  # the default stabilising ridge moves it little
        _, _, W2_new, b2_new = pruning.prune_hidden_units(W1, None, W2, b2, keep, H.T @ H, H.mean(axis=0), len(H),
                                                          ridge=ridge)
        np.testing.assert_allclose(W2_new, solution[:-1], rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(b2_new, solution[-1], rtol=tolerance, atol=tolerance)


def test_refit_without_mean_equals_linear_least_squares():
    H, W2, b2 = hidden_data(seed=2)
    keep = np.array([1, 4, 5, 6, 10])
    W2_new, shift = pruning.refit_second_layer(W2, keep, H.T @ H, ridge=0.0)
    np.testing.assert_allclose(W2_new, np.linalg.lstsq(H[:, keep], H @ W2, rcond=None)[0], rtol=1e-5, atol=1e-6)
    assert np.all(shift == 0.0)


def test_refit_lowers_the_calibrated_error_and_the_recorded_error_is_the_true_one():
    H, W2, _ = hidden_data(seed=4)
    keep = np.arange(0, 12, 2)
    G, mu, count = H.T @ H, H.mean(axis=0), len(H)
    centered = G - count * np.outer(mu, mu)
    errors = {}
    for refit in (False, True):
        W2_kept, shift = pruning.refit_second_layer(W2, keep, G if refit else None, mu, count)
        W2_after = np.zeros_like(W2)
        W2_after[keep] = W2_kept
        errors[refit] = linalg.output_error(W2, W2_after, centered)
        Y, Y_new = H @ W2, H[:, keep] @ W2_kept + shift
        true = np.linalg.norm(Y - Y_new) / np.linalg.norm(Y - Y.mean(axis=0))
        assert errors[refit] == pytest.approx(true, rel=1e-6)
    assert errors[True] < 0.9 * errors[False]


def test_no_refit_folds_the_removed_mean_into_the_bias():
    H, W2, b2 = hidden_data(seed=5)
    keep = np.array([0, 1, 2, 3])
    _, _, _, b2_new = pruning.prune_hidden_units(np.ones((2, 12)), np.zeros(12), W2, b2, keep,
                                                 hidden_mean=H.mean(axis=0))
    np.testing.assert_allclose(b2_new, b2 + H.mean(axis=0)[4:] @ W2[4:])


def test_removing_no_unit_is_exact():
    H, W2, b2 = hidden_data(seed=6)
    rng = np.random.default_rng(0)
    W1, b1 = rng.standard_normal((3, 12)), rng.standard_normal(12)
    out = pruning.prune_hidden_units(W1, b1, W2, b2, np.arange(12), H.T @ H, H.mean(axis=0), len(H))
    for got, want in zip(out, (W1, b1, W2, b2)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_hidden_unit_scores_and_kept_count():
    W2 = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(pruning.hidden_unit_scores(W2, np.array([4.0, 9.0, 1.0])), [10.0, 3.0, 0.0])
    assert pruning.kept_count(1536, 0.25, 8) == 1152
    assert pruning.kept_count(50, 0.0, 8) == 50  # ratio 0 never rounds units away
    assert pruning.kept_count(50, 0.5, 8) == 32  # rounded up: at most the asked share goes
    assert pruning.kept_count(5, 0.9, 8) == 5


# ------------------------------------------------------------------------------- structured pass


def test_structured_shrinks_the_gelu_mlp_and_still_runs():
    model = gelu_mlp()
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.25)))
    [change] = record.layers
    assert change.action == "rewritten" and change.details["hidden"] == [64, 48]
    assert sorted(change.details["chain"]) == ["Add", "Add", "Div", "Erf", "Mul", "Mul"]
    weights = initializers(out)
    assert weights["W1"].shape == (IN, 48) and weights["b1"].shape == (48,) and weights["W2"].shape == (48, OUT)
    assert change.details["params_removed"] == 16 * (IN + 1 + OUT)
    x = sample((5, IN))
    assert run(out, {"x": x})[0].shape == (5, OUT)


def test_structured_removing_dead_units_or_nothing_is_exact():
    x = sample((6, IN))
    model = gelu_mlp(dead=16)
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.25)))
    assert record.layers[0].details["hidden"] == [64, 48]
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)

    model = gelu_mlp()
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.0)))
    assert record.layers[0].action == "skipped" and "keeps all 64" in record.layers[0].reason
    np.testing.assert_array_equal(run(out, {"x": x})[0], run(model, {"x": x})[0])


def test_structured_gemm_layers_with_transB_and_alpha():
    model = gemm_mlp()
    calib = {"x": sample((300, IN), seed=2)}
    names = [r.tensor for r in PruneStructured(PruneStructuredConfig()).needs(import_graph(model))]
    assert names == ["hidden"]
    stats, _ = collect_stats(model, names, [calib], threads=1)
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5), stats))
    weights = initializers(out)
    assert weights["W1t"].shape == (32, IN) and weights["c1"].shape == (32,) and weights["W2"].shape == (32, OUT)
    assert weights["scale"].shape == (1, 32)
    # The recorded error is the true one on the calibration data: the bias fold (scaled by alpha)
    # zeroes the mean error, what is left is measured against the output's variation.
    y, y_new = run(model, calib)[0], run(out, calib)[0]
    true = np.linalg.norm(y - y_new) / np.linalg.norm(y - y.mean(axis=0))
    assert record.layers[0].details["calib_error"] == pytest.approx(true, rel=1e-3)
    np.testing.assert_allclose(y_new.mean(axis=0), y.mean(axis=0), atol=1e-4)


def test_structured_refit_beats_plain_slicing_on_calibration_data():
    model = gelu_mlp(seed=3)
    calib = {"x": sample((500, IN), seed=4)}
    stats, _ = collect_stats(model, ["hidden"], [calib], threads=1)
    y = run(model, calib)[0]
    errors = {}
    for refit in (False, True):
        out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5, refit=refit), stats))
        assert record.layers[0].details["score"] == "calibrated output energy"
        errors[refit] = np.linalg.norm(run(out, calib)[0] - y)
        assert record.layers[0].details["calib_error"] == pytest.approx(
            errors[refit] / np.linalg.norm(y - y.mean(axis=0)), rel=1e-3)
    assert errors[True] < errors[False]


def test_structured_skips_a_hidden_tensor_with_a_second_consumer():
    model = gelu_mlp(extra_reader=True)
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5)))
    [change] = record.layers
    assert change.action == "skipped" and change.node == "fc1"
    assert "'hidden' is also read by ReduceSum node 'spy'" in change.reason
    assert initializers(out)["W1"].shape == (IN, HIDDEN)


def test_structured_skips_hidden_units_read_by_two_layers():
    model = gelu_mlp()
    model.graph.node.append(helper.make_node("MatMul", ["hidden", "W2"], ["y2"], name="fc2_copy"))
    model.graph.output.append(vi("y2", ["batch", OUT]))
    _, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5)))
    assert record.layers[0].action == "skipped"
    assert "reach two layers, 'fc2' and 'fc2_copy'" in record.layers[0].reason


def test_structured_skips_a_second_weight_shared_with_another_node():
    model = gelu_mlp()
    model.graph.input.append(vi("z", ["batch", HIDDEN]))
    model.graph.node.append(helper.make_node("MatMul", ["z", "W2"], ["y2"], name="other"))
    model.graph.output.append(vi("y2", ["batch", OUT]))
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5)))
    assert [(c.action, c.reason) for c in record.layers] == [
        ("skipped", "constant 'W2' is also read by MatMul node 'other'")]
    assert initializers(out)["W2"].shape == (HIDDEN, OUT)


def test_structured_conv_bn_relu_conv():
    model = conv_bn_model()
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5, multiple=4)))
    [change] = record.layers
    assert change.action == "rewritten" and change.details["hidden"] == [16, 8]
    weights = initializers(out)
    assert weights["K1"].shape == (8, 3, 3, 3) and weights["K2"].shape == (4, 8, 3, 3)
    assert all(weights[name].shape == (8,) for name in ("c1", "gamma", "beta", "mean", "var"))
    x = sample((2, 3, 8, 8))
    assert run(out, {"x": x})[0].shape == (2, 4, 8, 8)

    _, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.0)))
    assert record.layers[0].action == "skipped"


@pytest.mark.parametrize("conv2_bias", [False, True])
def test_structured_conv_with_channel_statistics_folds_the_bias(conv2_bias):
    model = conv_bn_model(seed=1, conv2_bias=conv2_bias)
    calib = {"x": sample((8, 3, 8, 8), seed=5)}
    [name] = [r.tensor for r in PruneStructured(PruneStructuredConfig()).needs(import_graph(model))]
    stats = collect_unfolded_stats(model, {name: (name, channel_rows)}, [calib], threads=1)
    assert stats[name].k == 16
    y = run(model, calib)[0]
    errors = {}
    for refit in (False, True):
        out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5, multiple=4, refit=refit), stats))
        bias = initializers(out)["c2" if conv2_bias else "conv2/prune_bias"]  # takes the removed channels' mean
        assert bias.shape == (4,) and not np.allclose(bias, initializers(model).get("c2", 0.0))
        errors[refit] = np.linalg.norm(run(out, calib)[0] - y)
        assert 0.0 < record.layers[0].details["calib_error"] < 1.0
    assert errors[True] < errors[False]


def test_structured_rejects_statistics_of_the_wrong_width():
    model = conv_bn_model()
    stats, _ = collect_stats(model, ["hidden"], [{"x": sample((1, 3, 8, 8))}], threads=1)  # rows along W
    with pytest.raises(OnnxlrError, match="rows must be channel vectors"):
        PassManager([PruneStructured(PruneStructuredConfig(ratio=0.5), stats)]).run(model)


def test_structured_only_and_unknown_names():
    model = gelu_mlp()
    _, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.5, exclude=("fc2",))))
    assert record.layers == []
    with pytest.raises(OnnxlrError, match="no MatMul/Gemm/Conv node named 'nope'"):
        PassManager([PruneStructured(PruneStructuredConfig(only=("nope",)))]).run(model)


@pytest.mark.slow
def test_minilm_all_six_ffn_blocks_shrink(minilm_path):
    model = onnx.load(str(minilm_path))
    out, record = prune(model, PruneStructured(PruneStructuredConfig(ratio=0.25)))
    assert [c.details["hidden"] for c in record.rewritten] == [[1536, 1152]] * 6
    shapes = [list(t.dims) for t in out.graph.initializer]
    assert shapes.count([384, 1152]) == 6 and shapes.count([1152, 384]) == 6 and shapes.count([1152]) == 6
    ids = np.random.default_rng(0).integers(1000, 5000, (2, 12))
    [emb] = run(out, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert emb.shape == (2, 384) and np.all(np.isfinite(emb))


# ----------------------------------------------------------------------------- unstructured pass


def test_unstructured_magnitude_zeroes_half_of_each_column_and_says_it_saves_nothing_on_ort():
    model = gelu_mlp()
    out, record = prune(model, PruneUnstructured(PruneUnstructuredConfig(sparsity=0.5)))
    assert [c.node for c in record.rewritten] == ["fc1", "fc2"]
    weights = initializers(out)
    assert weights["W1"].shape == (IN, HIDDEN)
    assert np.all((weights["W1"] == 0).sum(axis=0) == IN // 2)
    assert np.all((weights["W2"] == 0).sum(axis=0) == HIDDEN // 2)
    for change in record.rewritten:
        assert "no sparse kernels" in change.details["note"]
        assert "neither bytes nor time" in change.details["note"]
    assert run(out, {"x": sample((3, IN))})[0].shape == (3, OUT)


def test_unstructured_2_4_along_the_input_axis_of_a_transposed_gemm():
    model = gemm_mlp()
    out, record = prune(model, PruneUnstructured(PruneUnstructuredConfig(pattern="2:4", score="wanda")))
    W1 = initializers(out)["W1t"].T  # logical (k, n) weight of a transB Gemm
    assert np.all((W1.reshape(IN // 4, 4, HIDDEN) != 0).sum(axis=1) == 2)
    assert all("wanda needs statistics" in c.details["score"] for c in record.rewritten)


def test_unstructured_wanda_uses_input_statistics_and_skips_indivisible_layers():
    model = gemm_mlp()
    calib = {"x": sample((200, IN), seed=7)}
    names = [r.tensor for r in PruneUnstructured(PruneUnstructuredConfig(sparsity=0.5)).needs(import_graph(model))]
    assert names == ["x", "hidden"]
    stats, _ = collect_stats(model, names, [calib], threads=1)
    out, record = prune(model, PruneUnstructured(PruneUnstructuredConfig(sparsity=0.5, score="wanda"), stats))
    W1 = initializers(model)["W1t"].T.astype(np.float64)
    expected = pruning.unstructured_mask(pruning.wanda_scores(W1, np.diag(stats["x"].gram)), 0.5)
    np.testing.assert_array_equal(initializers(out)["W1t"].T != 0, expected)
    assert record.layers[0].details["score"] == "wanda" and record.layers[0].details["calib_error"] > 0

    odd = conv_free_odd_model()
    _, record = prune(odd, PruneUnstructured(PruneUnstructuredConfig(pattern="2:4")))
    assert record.layers[0].action == "skipped" and "divisible by 4" in record.layers[0].reason


def conv_free_odd_model():
    W = np.random.default_rng(0).standard_normal((6, 3))
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                      [vi("x", [2, 6])], [vi("y", [2, 3])], {"W": W})


def test_unstructured_config_errors():
    with pytest.raises(OnnxlrError, match="either a sparsity"):
        PruneUnstructuredConfig()
    with pytest.raises(OnnxlrError, match="N:M"):
        PruneUnstructuredConfig(pattern="4:2")
    with pytest.raises(OnnxlrError, match="unknown pruning score"):
        PruneUnstructuredConfig(sparsity=0.5, score="taylor")
