"""One budget over rank and bits: the formats' bytes and errors (onnxlr.weight_formats), the allocation
against every single-format allocation at the same budget, and the ``mixed`` recipe end to end."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxlr.runtimes.calibration import StatisticsService

import onnxlr
from onnxlr import allocation, blockwise, linalg, quantization, weight_formats
from onnxlr.calibration import CalibrationSet
from onnxlr.cli import main as cli_main
from onnxlr.planning.factorize import RunSetting
from onnxlr.planning.mixed_precision import MixedPlanner
from onnxlr.planning.targets import PROVENANCE_BYTES, Target
from onnxlr.weight_formats import WeightFormat

VOCAB, WIDTH, HIDDEN = 300, 64, 256


def transformer_like(seed=0):
    """ids -> embedding table -> two residual MLP blocks. Block 0's first weight is nearly low-rank
    (low rank pays there), block 1's are full-rank; the table sees Zipf-distributed tokens."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((VOCAB, WIDTH)) * 0.5).astype(np.float32), "table")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x0"], name="embed")]
    for b in range(2):
        W1 = rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)
        if b == 0:
            W1 = rng.standard_normal((WIDTH, 6)) @ rng.standard_normal((6, HIDDEN)) / np.sqrt(6 * WIDTH) + 0.01 * W1
        W2 = rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)
        inits += [numpy_helper.from_array(W1.astype(np.float32), f"W1_{b}"),
                  numpy_helper.from_array(np.full(HIDDEN, 0.1, np.float32), f"b1_{b}"),
                  numpy_helper.from_array(W2.astype(np.float32), f"W2_{b}")]
        nodes += [helper.make_node("MatMul", [f"x{b}", f"W1_{b}"], [f"h{b}"], name=f"fc1_{b}"),
                  helper.make_node("Add", [f"h{b}", f"b1_{b}"], [f"hb{b}"], name=f"add1_{b}"),
                  helper.make_node("Relu", [f"hb{b}"], [f"r{b}"], name=f"relu_{b}"),
                  helper.make_node("MatMul", [f"r{b}", f"W2_{b}"], [f"o{b}"], name=f"fc2_{b}"),
                  helper.make_node("Add", [f"o{b}", f"x{b}"], [f"x{b + 1}"], name=f"res_{b}")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 16])],
                              [helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 16, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def token_ids(samples=64, seed=1):
    p = 1.0 / np.arange(1, VOCAB + 1)
    return {"ids": np.random.default_rng(seed).choice(VOCAB, size=(samples, 16), p=p / p.sum()).astype(np.int64)}


@pytest.fixture(scope="module")
def planned():
    model = transformer_like()
    service = StatisticsService(CalibrationSet(token_ids(), model, batch_size=16))
    planner = MixedPlanner(model, None, None, service, RunSetting(), end_to_end=False)
    planner.space()
    return model, planner


# ------------------------------------------------------------------------------------- bytes, errors


def test_format_bytes_match_what_the_passes_store():
    k, n = 64, 96
    assert weight_formats.format_bytes(k, n, WeightFormat("float")) == 4 * k * n
    assert weight_formats.format_bytes(k, n, WeightFormat("int4", 0, 32)) == \
        n * 2 * 16 + n * 2 * 4 + n * 1  # packed levels, float32 scales, packed zero points
    assert weight_formats.format_bytes(k, n, WeightFormat("int8"), int8_scale_itemsize=2) == k * n + 2 * n + 4 * k + 5
    r = 8
    assert weight_formats.format_bytes(k, n, WeightFormat("float", r)) == 4 * r * (k + n) + 4 * n
    assert weight_formats.table_format_bytes(300, 64, WeightFormat("int4", 0, 64)) == \
        blockwise.table_bytes(300, 64, 4, 64, 2) == 300 * 32 + 300 * 2 + 300


def test_layer_errors_are_the_whitened_objective():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    W = rng.standard_normal((32, 48)).astype(np.float32)
    G = X.T @ X
    U, s, Vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    formats = [WeightFormat("float"), WeightFormat("int8"), WeightFormat("int4", 0, 16), WeightFormat("float", 4)]
    options = weight_formats.layer_options("w", W, G, formats, factors=lambda r: (U[:, :r] * s[:r], Vt[:r]))
    assert options.errors[0] == 0.0
    int8 = quantization.dequantize(*quantization.gptq_per_channel(W, G))
    assert options.errors[1] == pytest.approx(linalg.output_error(W, int8, G) ** 2, rel=1e-6)
    q, scales, zps = blockwise.gptq_blockwise(W, G, 4, 16)
    assert options.errors[2] == pytest.approx(linalg.output_error(W, blockwise.dequantize_blockwise(q, scales, zps, 32), G) ** 2,
                                              rel=1e-6)
    assert options.errors[3] == pytest.approx(linalg.output_error(W, (U[:, :4] * s[:4]) @ Vt[:4], G) ** 2, rel=1e-6)


def test_pareto_front_keeps_only_options_worth_their_bytes():
    keep = allocation.pareto_front(np.array([10, 5, 7, 7, 12]), np.array([0.1, 0.5, 0.6, 0.3, 0.1]))
    assert keep.tolist() == [1, 3, 0]


# ------------------------------------------------------------------------------------- the allocation

SINGLE_FORMATS = {
    "int8 (with ranks)": lambda f: f.precision == "int8",
    "int4": lambda f: f.precision == "int4" and f.rank == 0,
    "float ranks": lambda f: f.precision == "float",
}


def test_mixed_allocation_meets_its_budget_and_beats_every_single_format(planned):
    _, planner = planned
    space = planner.space()
    int4_bytes = weight_formats.summed(space.options, weight_formats.allocate(
        space.options, 0, allowed=SINGLE_FORMATS["int4"]))[0]
    target = Target("bytes", space.fixed_bytes + PROVENANCE_BYTES + int4_bytes * 1.25)
    built, records = planner.build(target)
    assert built.ByteSize() + PROVENANCE_BYTES <= target.value  # the serialized model fits
    budget = target.value - PROVENANCE_BYTES - space.fixed_bytes
    picks = weight_formats.allocate(space.options, budget)
    mixed_bytes, mixed_error = weight_formats.summed(space.options, picks)
    assert mixed_bytes <= budget
    assert len({space.options[i].formats[j].label.split()[0] for i, j in enumerate(picks)} |
               {space.options[i].formats[j].precision for i, j in enumerate(picks)}) > 2  # a real mix
    for name, allowed in SINGLE_FORMATS.items():
        single = weight_formats.allocate(space.options, budget, allowed=allowed)
        size, error = weight_formats.summed(space.options, single)
        assert size > budget or error > mixed_error * 1.05, name
    record = records[0]
    assert record.name == "mixed_precision" and len(record.layers) == len(space.options)
    assert all({"format", "format_bytes", "predicted_error"} <= set(c.details) for c in record.layers)


def test_mixed_model_runs_and_tracks_its_prediction(planned):
    model, planner = planned
    ids = token_ids(8, seed=7)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    errors = []
    for share in (0.3, 0.5):
        built, _ = planner.build(Target("bytes", model.ByteSize() * share))
        got = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
        errors.append(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    assert errors[1] < errors[0] < 0.2  # more bytes, less error


# ------------------------------------------------------------------------------------- the recipe


def test_mixed_recipe_end_to_end(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    model = transformer_like(seed=3)
    onnx.save(model, path)
    size = int(model.ByteSize() * 0.3)
    out, report = onnxlr.optimize(path, recipe="mixed", calib=token_ids(), target=f"bytes={size}", validate=False)
    assert out.ByteSize() <= size
    record = next(p for p in report.passes if p.name == "mixed_precision")
    assert "predicted output error" in report.format()
    assert {c.details["precision"] for c in record.layers} <= {"float", "int8", "int4", "int2"}
    ids = token_ids(4, seed=5)
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)
    assert cli_main(["recipes"]) == 0
    assert "mixed" in capsys.readouterr().out


def test_mixed_recipe_needs_a_bytes_target(planned, tmp_path):
    _, planner = planned
    with pytest.raises(onnxlr.OnnxlrError, match="bytes"):
        planner.build(Target("params", 0.5))
    onnx.save(transformer_like(), tmp_path / "model.onnx")
    with pytest.raises(onnxlr.OnnxlrError, match="give --target bytes=SIZE"):  # said before any work is done
        onnxlr.optimize(tmp_path / "model.onnx", recipe="mixed", calib=token_ids(), target="params=0.5")
