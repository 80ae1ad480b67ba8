"""4-bit (and 2-/8-bit) embedding tables: onnxlr.blockwise's table layout and the QuantizeTableBlocks pass,
checked against ONNX Runtime's GatherBlockQuantized."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr import blockwise
from onnxlr.pipeline import PassManager
from onnxlr.passes.quantize_table_blocks import QuantizeTableBlocks, QuantizeTableBlocksConfig


def embedding_model(V=300, d=64, seed=0):
    rng = np.random.default_rng(seed)
    T = (rng.standard_normal((V, d)) * 0.05 + rng.standard_normal((1, d)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed"),
         helper.make_node("Relu", ["rows"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7, d])], [numpy_helper.from_array(T, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, T


def run(model, ids):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


@pytest.mark.parametrize("bits,block,scale_type", [(4, 64, "float16"), (4, 32, "float32"), (2, 32, "float16"),
                                                   (8, 16, "float32"), (4, 16, "float16")])
def test_gather_block_quantized_equals_numpy_reference(bits, block, scale_type):
    model, T = embedding_model()
    ids = np.random.default_rng(1).integers(0, T.shape[0], (3, 7)).astype(np.int64)
    out, [record] = PassManager([QuantizeTableBlocks(QuantizeTableBlocksConfig(bits, block, scale_type))]).run(model)
    [change] = record.rewritten
    scale_dtype = np.float16 if scale_type == "float16" else np.float32
    levels, scales, zero_points = blockwise.quantize_table(T, bits, block, scale_dtype)
    # the op returns rows in the scales' dtype (then cast back to float32 for float16 scales)
    expected = np.maximum(blockwise.dequantize_table(levels, scales, zero_points)[ids].astype(scale_dtype), 0)
    np.testing.assert_array_equal(run(out, ids), expected.astype(np.float32))
    ops = [n.op_type for n in out.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert ("Cast" in ops) == (scale_type == "float16")
    assert change.details["bytes_after"] == blockwise.table_bytes(*T.shape, bits, block, np.dtype(scale_dtype).itemsize)
    bound = {2: 0.6, 4: 0.12, 8: 0.01}[bits]
    assert change.details["weight_error"] < bound


def test_pack_table_layout_low_bits_first():
    levels = np.array([[1, 2, 3, 4] * 8], np.uint8)  # one row, 32 values: one block of 32
    data, zp = blockwise.pack_table(levels, np.array([[5]], np.uint8), 4)
    assert data[0, 0] == 1 | (2 << 4) and data[0, 1] == 3 | (4 << 4)
    assert zp.shape == (1, 1) and zp[0, 0] == 5 | (8 << 4)  # the missing second zero point: 2^(bits-1)


def test_rows_that_do_not_split_into_blocks_are_skipped():
    model, _ = embedding_model(d=48)
    out, [record] = PassManager([QuantizeTableBlocks(QuantizeTableBlocksConfig(bits=4, block_size=32))]).run(model)
    assert not record.rewritten and "blocks of 32" in record.skipped[0].reason
    assert [n.op_type for n in out.graph.node][0] == "Gather"


def test_calibrated_error_uses_token_counts():
    model, T = embedding_model()
    counts = np.zeros(T.shape[0], np.int64)
    counts[:10] = 5
    rewrite = QuantizeTableBlocks(QuantizeTableBlocksConfig(), {"ids": counts})
    _, [record] = PassManager([rewrite]).run(model)
    d = record.rewritten[0].details
    levels, scales, zps = blockwise.quantize_table(T, 4, 64, np.float16)
    E = T[:10].astype(np.float64) - blockwise.dequantize_table(levels, scales, zps)[:10]
    assert d["calib_error"] == pytest.approx(np.linalg.norm(E) / np.linalg.norm(T[:10].astype(np.float64)), rel=1e-9)


def test_int4_recipe_writes_4bit_tables(tmp_path):
    model, T = embedding_model(V=400, d=64)
    path = tmp_path / "emb.onnx"
    onnx.save(model, path)
    out, report = onnxlr.optimize(path, recipe="int4", validate=False)
    assert "GatherBlockQuantized" in [n.op_type for n in out.graph.node]
    assert out.ByteSize() < T.nbytes / 6
    ids = np.arange(21, dtype=np.int64).reshape(3, 7)
    ref = run(model, ids)
    assert np.linalg.norm(run(out, ids) - ref) / np.linalg.norm(ref) < 0.15
