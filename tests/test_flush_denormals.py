"""FlushDenormals: subnormal float32 weights become 0 (they slow every CPU kernel that reads them), nothing
else changes, and the optimizer does it for every recipe."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxlr
from onnxlr.passes.flush_denormals import FlushDenormals, subnormal_mask
from onnxlr.pipeline import PassManager
from onnxlr.runtimes.providers import make_session

TINY = np.finfo(np.float32).tiny  # smallest normal float32, 2**-126


def conv_model_with_subnormal_weights() -> onnx.ModelProto:
    """x [1, 4, 8, 8] → Conv 4→8 3×3 (a third of its weights subnormal) → + Cast(float16 constant with
    subnormal halves) → y."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    weight.flat[::3] = (rng.uniform(0.01, 0.99, weight.size)[::3] * TINY * rng.choice([-1, 1], weight.size)[::3]
                        ).astype(np.float32)
    bias = np.array([1e-40, 0.5, -2e-39, 1.0, 0.0, -0.25, 3e-45, 2.0], np.float32)
    half = np.full((1, 8, 1, 1), 3e-6, np.float16)  # subnormal in float16, normal once cast to float32
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT, name="cast"),
         helper.make_node("Add", ["c", "hf"], ["y"], name="add")],
        "subnormal", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"), numpy_helper.from_array(half, "h")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_subnormal_weights_become_zero_and_nothing_else_changes():
    model = conv_model_with_subnormal_weights()
    before = weights(model)
    flushed, [record] = PassManager([FlushDenormals()]).run(model)
    after = weights(flushed)
    for name in ("w", "b"):
        mask = subnormal_mask(before[name])
        assert mask.any()
        assert not subnormal_mask(after[name]).any()
        assert np.all(after[name][mask] == 0)
        np.testing.assert_array_equal(after[name][~mask], before[name][~mask])
    np.testing.assert_array_equal(after["h"], before["h"])  # float16: left alone, and not counted
    assert not subnormal_mask(before["h"]).any() and (before["h"] < np.finfo(np.float16).tiny).all()
    counts = {c.details["tensor"]: c.details["subnormal_zeroed"] for c in record.layers}
    assert counts == {"w": int(subnormal_mask(before["w"]).sum()), "b": 3}
    assert {c.node for c in record.layers} == {"conv"}
    x = {"x": np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)}
    (y0,), (y1,) = (make_session(m.SerializeToString(), "CPUExecutionProvider", 1).run(None, x) for m in (model, flushed))
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-30)


def test_a_model_without_subnormals_is_not_touched():
    model = conv_model_with_subnormal_weights()
    clean, _ = PassManager([FlushDenormals()]).run(model)
    _, [record] = PassManager([FlushDenormals()]).run(clean)
    assert record.layers == []


def test_the_optimizer_flushes_for_every_recipe(tmp_path):
    path = tmp_path / "subnormal.onnx"
    onnx.save(conv_model_with_subnormal_weights(), str(path))
    written = path.read_bytes()
    model, report = onnxlr.optimize(str(path), recipe="int8-weights", validate=False)
    assert path.read_bytes() == written  # the input file is not modified
    record = next(r for r in report.passes if r.name == "flush_denormals")
    assert sum(c.details["subnormal_zeroed"] for c in record.layers) > 0
    assert not any(subnormal_mask(v).any() for v in weights(model).values() if v.dtype == np.float32)


def test_inspect_counts_subnormal_weights(tmp_path, capsys):
    from onnxlr.cli import main

    path = tmp_path / "subnormal.onnx"
    model = conv_model_with_subnormal_weights()
    onnx.save(model, str(path))
    assert main(["inspect", str(path)]) == 0
    count = int(subnormal_mask(weights(model)["w"]).sum())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{count:,} weights of 1 layer are subnormal floats") and last.endswith("(worst: conv)")
    clean, _ = PassManager([FlushDenormals()]).run(model)
    onnx.save(clean, str(path))
    assert main(["inspect", str(path)]) == 0
    assert "subnormal" not in capsys.readouterr().out
