"""Block-wise n-bit quantization (onnxlr.blockwise) and the QuantizeMatMulNBits pass, checked against
ONNX Runtime's MatMulNBits kernel and its own quantizer."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlr.io
from onnxlr import blockwise, linalg
from onnxlr.errors import OnnxlrError
from onnxlr.graph import import_graph
from onnxlr.passes.quantize_nbits import QuantizeMatMulNBits, QuantizeMatMulNBitsConfig
from onnxlr.pipeline import PassManager
from onnxlr.statistics import TensorStats

# (K, N, block_size): K a multiple of the block, K with a partial last block, K below one block
SHAPES = [(64, 12, 32), (70, 5, 16), (20, 6, 32), (256, 9, 128)]
FORMATS = [(bits, symmetric) for bits in (4, 8) for symmetric in (False, True)]


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def correlated_inputs(rng, rows, K):
    """Rows whose channels are strongly correlated, with decaying variance (like real activations)."""
    mixing = rng.standard_normal((K, K)) * 0.9 ** np.arange(K)
    return rng.standard_normal((rows, K)) @ mixing.T


def matmul_model(W, *, name="fc", elem=TensorProto.FLOAT):
    K, N = W.shape
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name=name)
    graph = helper.make_graph([node], "g", [vi("x", ["batch", K], elem)], [vi("y", ["batch", N], elem)],
                              [numpy_helper.from_array(W, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantize(model, config=None, stats=None):
    out, records = PassManager([QuantizeMatMulNBits(config or QuantizeMatMulNBitsConfig(), stats)]).run(model)
    onnxlr.io.check_model(out)
    return out, records[0]


def relative_error(produced, reference):
    return float(np.linalg.norm(produced - reference) / np.linalg.norm(reference))


# ------------------------------------------------------------------------------------- the math

@pytest.mark.parametrize("bits,symmetric", FORMATS)
@pytest.mark.parametrize("K,N,block_size", SHAPES)
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, K, N, block_size):
    rng = np.random.default_rng(K + N)
    W = rng.standard_normal((K, N)).astype(np.float32)
    W[:, 0] = np.abs(W[:, 0])  # a one-sided column: the asymmetric range must still hold 0
    q, scales, zero_points = blockwise.quantize_blockwise(W, bits, block_size, symmetric)
    blocks = blockwise.n_blocks(K, block_size)
    assert q.shape == (N, blocks, block_size) and q.dtype == np.uint8 and q.max() <= 2 ** bits - 1
    assert scales.shape == (N, blocks) and scales.dtype == np.float32
    assert (zero_points is None) == symmetric
    W_hat = blockwise.dequantize_blockwise(q, scales, zero_points, K, bits)
    step = np.abs(np.repeat(scales.T, block_size, axis=0)[:K])
    error = np.abs(W - W_hat)
    if symmetric:
        # The block's largest magnitude sits on level -2^(bits-1); an opposite-signed value of about
        # the same size lies beyond the top level 2^(bits-1) - 1 and is clipped, by up to one step.
        levels = W / np.repeat(scales.T, block_size, axis=0)[:K]
        clipped = levels > 2 ** (bits - 1) - 0.5
        assert np.all(error[clipped] <= step[clipped] * (1 + 1e-5))
        error, step = error[~clipped], step[~clipped]
    assert np.all(error <= step * (0.5 + 1e-5))
    # padding rows encode exactly 0
    padded = blockwise.dequantize_blockwise(q, scales, zero_points, blocks * block_size, bits)
    assert np.all(padded[K:] == 0)


@pytest.mark.parametrize("bits,symmetric", FORMATS)
@pytest.mark.parametrize("K,N,block_size", SHAPES)
def test_packed_weights_run_in_ort_matmulnbits(bits, symmetric, K, N, block_size):
    rng = np.random.default_rng(7)
    W = rng.standard_normal((K, N)).astype(np.float32)
    q, scales, zero_points = blockwise.quantize_blockwise(W, bits, block_size, symmetric)
    B, packed_zero_points = blockwise.pack_matmulnbits(q, zero_points, bits)
    assert B.shape == (N, blockwise.n_blocks(K, block_size), block_size * bits // 8)
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "scales")]
    if symmetric:
        assert packed_zero_points is None  # the kernel must assume 2^(bits-1) by itself
    else:
        assert packed_zero_points.shape == (N, -(-blockwise.n_blocks(K, block_size) * bits // 8))
        inits.append(numpy_helper.from_array(packed_zero_points, "zero_points"))
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "" if symmetric else "zero_points"], ["y"],
                            domain="com.microsoft", K=K, N=N, bits=bits, block_size=block_size)
    graph = helper.make_graph([node], "g", [vi("x", [None, K])], [vi("y", [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((5, K)).astype(np.float32)
    expected = x.astype(np.float64) @ blockwise.dequantize_blockwise(q, scales, zero_points, K, bits)
    assert relative_error(session(model).run(None, {"x": x})[0], expected) < 1e-5


def test_four_bit_values_pack_low_nibble_first():
    q = (np.arange(96, dtype=np.uint8) % 16).reshape(1, 3, 32)
    B, zero_points = blockwise.pack_matmulnbits(q, np.array([[3, 5, 9]], np.uint8), 4)
    assert B.shape == (1, 3, 16)
    assert B[0, 0, 0] == 0x10 and B[0, 0, 1] == 0x32  # k=0 low nibble, k=1 high nibble
    assert zero_points.tolist() == [[0x53, 0x89]]  # odd block count: ORT fills the last nibble with 8


@pytest.mark.parametrize("bits,symmetric", FORMATS)
@pytest.mark.parametrize("K,N,block_size", SHAPES)
def test_round_to_nearest_is_byte_identical_to_ort_quantizer(bits, symmetric, K, N, block_size):
    nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    rng = np.random.default_rng(3)
    W = rng.standard_normal((K, N)).astype(np.float32)
    W[:, 0] = np.abs(W[:, 0])
    W[: min(K, block_size), 1] = 0.0  # an all-zero block: scale 0
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    ort_B, ort_scales, ort_zero_points = nbits.DefaultWeightOnlyQuantizer(config).qbits_block_quant(W.copy())
    q, scales, zero_points = blockwise.quantize_blockwise(W, bits, block_size, symmetric)
    B, packed_zero_points = blockwise.pack_matmulnbits(q, zero_points, bits)
    np.testing.assert_array_equal(scales, ort_scales)
    # ORT leaves the bytes of the padding rows beyond K unset (0); we store the level of 0 there.
    real = K * bits // 8
    np.testing.assert_array_equal(B.reshape(N, -1)[:, :real], ort_B.reshape(N, -1)[:, :real])
    if not symmetric:  # ORT's quantizer then writes no zero points into the model
        np.testing.assert_array_equal(packed_zero_points, ort_zero_points)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
def test_pass_writes_the_same_model_tensors_as_ort_matmulnbitsquantizer(bits, symmetric):
    nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    W = np.random.default_rng(4).standard_normal((128, 40)).astype(np.float32)
    model = matmul_model(W)
    quantizer = nbits.MatMulNBitsQuantizer(matmul_model(W), bits=bits, block_size=32, is_symmetric=symmetric)
    quantizer.process()
    theirs = quantizer.model.model
    ours, _ = quantize(model, QuantizeMatMulNBitsConfig(bits=bits, block_size=32, symmetric=symmetric))
    (their_node,), (our_node,) = theirs.graph.node, ours.graph.node
    assert their_node.op_type == our_node.op_type == "MatMulNBits"
    assert {a.name: helper.get_attribute_value(a) for a in their_node.attribute} == \
        {a.name: helper.get_attribute_value(a) for a in our_node.attribute}
    their_values = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    our_values = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert len(their_node.input) == len(our_node.input)
    for theirs_name, ours_name in zip(their_node.input[1:], our_node.input[1:]):
        np.testing.assert_array_equal(their_values[theirs_name], our_values[ours_name])


@pytest.mark.parametrize("bits,symmetric", FORMATS)
def test_gptq_lowers_the_calibrated_output_error(bits, symmetric):
    rng = np.random.default_rng(5)
    K, N = 200, 48  # 200 = 6 blocks of 32 + a partial one
    X = correlated_inputs(rng, 2000, K)
    X[:, 7] = 0.0  # an input the calibration never activates
    G = X.T @ X
    W = rng.standard_normal((K, N)).astype(np.float32)
    nearest = blockwise.dequantize_blockwise(*blockwise.quantize_blockwise(W, bits, 32, symmetric), K, bits)
    q, scales, zero_points = blockwise.gptq_blockwise(W, G, bits, 32, symmetric)
    gptq = blockwise.dequantize_blockwise(q, scales, zero_points, K, bits)
    assert q.max() <= 2 ** bits - 1 and (zero_points is None) == symmetric
    # measured about 5x lower on this data; the Gram identity must agree with the rows themselves
    assert linalg.output_error(W, gptq, G) < 0.5 * linalg.output_error(W, nearest, G)
    assert linalg.output_error(W, gptq, G) == pytest.approx(relative_error(X @ gptq, X @ W), rel=1e-6)
    # the dead input's row is rounded to nearest, not discarded
    np.testing.assert_allclose(gptq[7], nearest[7])


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    W = np.random.default_rng(6).standard_normal((96, 20)).astype(np.float32)
    expected = blockwise.quantize_blockwise(W, 4, 32)
    for got, want in zip(blockwise.gptq_blockwise(W, 3.0 * np.eye(96), 4, 32), expected):
        np.testing.assert_array_equal(got, want)


def test_float16_weights_get_float16_scales_that_ort_accepts():
    rng = np.random.default_rng(8)
    W = rng.standard_normal((64, 24)).astype(np.float16)
    out, record = quantize(matmul_model(W, elem=TensorProto.FLOAT16))
    scales = next(t for t in out.graph.initializer if t.name.endswith("/scales"))
    assert scales.data_type == TensorProto.FLOAT16
    x = rng.standard_normal((4, 64)).astype(np.float16)
    q, s, z = blockwise.quantize_blockwise(W, 4, 32)
    expected = x.astype(np.float64) @ blockwise.dequantize_blockwise(q, s, z, 64)
    assert relative_error(session(out).run(None, {"x": x})[0].astype(np.float64), expected) < 2e-3


# -------------------------------------------------------------------------------------- the pass

@pytest.mark.parametrize("bits", [4, 8])
def test_pass_output_validates_in_ort_and_shrinks_the_file(bits):
    rng = np.random.default_rng(9)
    W = (rng.standard_normal((256, 96)) / 16).astype(np.float32)
    model = matmul_model(W)
    out, record = quantize(model, QuantizeMatMulNBitsConfig(bits=bits))
    (change,) = record.layers
    assert change.action == "rewritten" and change.op == "MatMul"
    assert (out.graph.node[0].op_type, out.graph.node[0].name, out.graph.node[0].output[0]) == \
        ("MatMulNBits", "fc", "y")
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in out.opset_import)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    error = relative_error(session(out).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0])
    assert error < {4: 0.15, 8: 0.01}[bits]  # measured about 0.08 and 0.005
    assert error == pytest.approx(change.details["weight_error"], rel=0.3)
    size = len(out.SerializeToString())
    assert size < len(model.SerializeToString()) * {4: 0.2, 8: 0.35}[bits]
    assert change.details["bytes"] == W.nbytes and change.details["bytes_after"] < size


@pytest.mark.parametrize("symmetric", [False, True])
def test_gemm_with_bias_and_transb_becomes_matmulnbits_with_bias_input(symmetric):
    rng = np.random.default_rng(10)
    B = rng.standard_normal((48, 64)).astype(np.float32)  # transB: (N, K)
    C = rng.standard_normal(48).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", transB=1),
             helper.make_node("Gemm", ["x", "B2"], ["z"], name="scaled", alpha=0.5)]
    graph = helper.make_graph(nodes, "g", [vi("x", [3, 64])], [vi("y", [3, 48]), vi("z", [3, 64])],
                              [numpy_helper.from_array(B, "B"), numpy_helper.from_array(C, "C"),
                               numpy_helper.from_array(np.ones((64, 64), np.float32), "B2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, record = quantize(model, QuantizeMatMulNBitsConfig(symmetric=symmetric))
    status = {c.node: (c.action, c.reason) for c in record.layers}
    assert status["gemm"] == ("rewritten", "")
    assert status["scaled"][0] == "skipped" and "alpha" in status["scaled"][1]
    node = next(n for n in out.graph.node if n.name == "gemm")
    assert node.op_type == "MatMulNBits" and len(node.input) == 6 and node.input[4] == ""
    assert (node.input[3] == "") == symmetric
    x = rng.standard_normal((3, 64)).astype(np.float32)
    q, s, z = blockwise.quantize_blockwise(B.T, 4, 32, symmetric)
    expected = x @ blockwise.dequantize_blockwise(q, s, z, 64) + C
    assert relative_error(session(out).run(["y"], {"x": x})[0], expected) < 1e-5


def test_gptq_pass_records_a_lower_calibrated_error_than_nearest():
    rng = np.random.default_rng(11)
    W1 = (rng.standard_normal((128, 64)) / 8).astype(np.float32)
    W2 = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [vi("x", ["batch", 128])], [vi("y", ["batch", 32])],
                              [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = QuantizeMatMulNBitsConfig(rounding="gptq", min_size=0)
    assert [r.tensor for r in QuantizeMatMulNBits(config, {}).needs(import_graph(model))] == ["h", "x"]
    assert QuantizeMatMulNBits(QuantizeMatMulNBitsConfig()).needs(import_graph(model)) == []
    X = correlated_inputs(rng, 1000, 128).astype(np.float32)
    stats = {"x": TensorStats.zeros(128)}  # no statistics for h: fc2 falls back to nearest
    stats["x"].update(X)
    with pytest.raises(OnnxlrError, match="needs calibration data"):
        QuantizeMatMulNBits(config)
    _, nearest = quantize(model, QuantizeMatMulNBitsConfig(min_size=0), stats)
    out, gptq = quantize(model, config, stats)
    by_node = {c.node: c.details for c in gptq.layers}
    assert by_node["fc1"]["rounding"] == "gptq" and by_node["fc2"]["rounding"] == "nearest"
    assert by_node["fc1"]["calib_error"] < 0.5 * nearest.layers[0].details["calib_error"]
    assert "calib_error" not in by_node["fc2"]
    feeds = {"x": X[:200]}
    first = lambda m: session(m).run(None, feeds)[0]  # noqa: E731
    reference = X[:200] @ W1 @ W2
    assert relative_error(first(out), reference) < relative_error(first(quantize(model)[0]), reference)


def test_pass_skips_what_it_cannot_quantize_and_says_why():
    rng = np.random.default_rng(12)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = {"big": f32(64, 64), "tiny": f32(8, 8), "narrow": f32(2, 4096), "w3d": f32(1, 64, 64),
             "tied": f32(64, 64)}
    nodes = [
        helper.make_node("MatMul", ["x", "big"], ["a"], name="ok"),
        helper.make_node("MatMul", ["x", "w"], ["b"], name="runtime_weight"),
        helper.make_node("MatMul", ["x8", "tiny"], ["c"], name="tiny"),
        helper.make_node("MatMul", ["x2", "narrow"], ["d"], name="small_k"),
        helper.make_node("MatMul", ["x", "w3d"], ["e"], name="three_d"),
        helper.make_node("MatMul", ["x", "tied"], ["f"], name="tied"),
        helper.make_node("Gather", ["tied", "ids"], ["g"], name="embed"),
        helper.make_node("MatMul", ["x", "big"], ["h"], name="excluded_user"),
    ]
    graph = helper.make_graph(
        nodes, "g", [vi("x", [2, 64]), vi("w", [64, 64]), vi("x8", [2, 8]), vi("x2", [2, 2]),
                     vi("ids", [3], TensorProto.INT64)],
        [vi(name, shape) for name, shape in zip("abcdefgh", ([2, 64], [2, 64], [2, 8], [2, 4096], [1, 2, 64],
                                                              [2, 64], [3, 64], [2, 64]))], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, record = quantize(model, QuantizeMatMulNBitsConfig(min_size=100, exclude=["excluded_user"]))
    reasons = {c.node: c.reason for c in record.skipped}
    assert [c.node for c in record.rewritten] == []  # "big" is shared with the excluded node
    assert "not a constant" in reasons["runtime_weight"]
    assert "fewer than the minimum 100" in reasons["tiny"]
    assert "K=2 is too small" in reasons["small_k"]
    assert "3-D" in reasons["three_d"]
    assert "Gather node 'embed'" in reasons["tied"]
    assert "excluded" in reasons["excluded_user"]
    assert "MatMul node 'excluded_user'" in reasons["ok"]
    _, record = quantize(model, QuantizeMatMulNBitsConfig(only=["ok", "excluded_user"]))
    assert sorted(c.node for c in record.rewritten) == ["excluded_user", "ok"]  # the shared weight, once
    with pytest.raises(OnnxlrError, match="no node named 'nope'"):
        quantize(model, QuantizeMatMulNBitsConfig(only=["nope"]))


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "bits must be 4 or 8"), ({"block_size": 48}, "power of two"), ({"block_size": 8}, "power of two"),
    ({"rounding": "awq"}, "unknown rounding"), ({"accuracy_level": 5}, "accuracy level"),
])
def test_bad_config_is_a_one_line_user_error(options, message):
    with pytest.raises(OnnxlrError, match=message):
        QuantizeMatMulNBitsConfig(**options)


@pytest.mark.slow
def test_gptq_on_minilm_layers_beats_nearest_and_keeps_the_embeddings(minilm_path, text_paths):
    from conftest import calibration_stats
    from onnxlr.models import metrics, minilm, text

    model = onnxlr.io.load_model(minilm_path)
    stats, _ = calibration_stats(model, text_paths[0], samples=64)
    _, nearest = quantize(model, QuantizeMatMulNBitsConfig(), stats)
    out, gptq = quantize(model, QuantizeMatMulNBitsConfig(rounding="gptq"), stats)
    assert len(gptq.rewritten) == 36
    before = {c.node: c.details["calib_error"] for c in nearest.rewritten}
    after = {c.node: c.details["calib_error"] for c in gptq.rewritten}
    assert all(after[node] < before[node] for node in before)
    feeds = {k: v[:64] for k, v in text.load(text_paths[1]).items()}
    reference = minilm.embed(minilm_path, feeds)
    assert metrics.cosine_rows(reference, minilm.embed(out, feeds)).mean() > 0.98
