"""Activation statistics: ORT-collected Gram/sum/abs_sum/count against an independent numpy forward pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr import statistics
from onnxlr.runtimes import stats as stats_mod
from onnxlr.runtimes.stats import collect_stats
from onnxlr.statistics import TensorStats

VOCAB, EMB, HID = 10, 16, 8
MLP_TENSORS = ["x", "h0", "h1", "h2", "y"]
TOKEN_TENSORS = ["emb_sum", "h", "r", "pooled", "flat"]


# -------------------------------------------------------------------------------------- models


def token_weights(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"E": rng.standard_normal((VOCAB, EMB)).astype(np.float32),
            "E2": rng.standard_normal((VOCAB + 1, EMB)).astype(np.float32),
            "W": rng.standard_normal((EMB, HID)).astype(np.float32)}


def build_token_model() -> onnx.ModelProto:
    """input_ids, attention_mask [batch, seq] int64 ->
    emb_sum = E[ids] + E2[ids + 1] (b, s, 16); h = emb_sum @ W (b, s, 8); r = relu(h);
    outputs pooled = sum_s r * mask (b, 8) and flat = r.reshape(-1, 8) (b*s, 8). No value_info."""
    w = token_weights()
    inits = [numpy_helper.from_array(w[n], n) for n in ("E", "E2", "W")]
    inits += [numpy_helper.from_array(np.array(1, np.int64), "one"),
              numpy_helper.from_array(np.array([-1], np.int64), "last"),
              numpy_helper.from_array(np.array([-1, HID], np.int64), "flat_shape")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Add", ["input_ids", "one"], ["ids_next"]),
        helper.make_node("Gather", ["E2", "ids_next"], ["emb2"]),
        helper.make_node("Add", ["emb", "emb2"], ["emb_sum"]),
        helper.make_node("MatMul", ["emb_sum", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask_3d"]),
        helper.make_node("Mul", ["r", "mask_3d"], ["r_masked"]),
        helper.make_node("ReduceSum", ["r_masked", "one_axis"], ["pooled"], keepdims=0),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one_axis"))
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HID]),
         helper.make_tensor_value_info("flat", TensorProto.FLOAT, [None, HID])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def token_forward(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The token model in numpy, float32 like ORT."""
    w = token_weights()
    emb_sum = w["E"][ids] + w["E2"][ids + 1]
    h = emb_sum @ w["W"]
    r = np.maximum(h, 0)
    return {"ids_next": ids + 1, "emb_sum": emb_sum, "h": h, "r": r,
            "pooled": (r * mask[..., None].astype(np.float32)).sum(axis=1), "flat": r.reshape(-1, HID)}


def mlp_forward(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The tiny MLP of tests/conftest.py in numpy, with the model's own weights."""
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h0 = x @ w["W1"]
    h1 = h0 + w["b1"]
    h2 = np.maximum(h1, 0)
    return {"x": x, "h0": h0, "h1": h1, "h2": h2, "y": h2 @ w["W2"].T + w["b2"]}


def mlp_batches(sizes=(4, 4, 3)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((n, 32)).astype(np.float32)} for n in sizes]


def token_batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    batches = []
    for n, seq in [(4, 6), (4, 6), (3, 9)]:
        mask = (rng.random((n, seq)) < 0.6).astype(np.int64)
        mask[0, :] = 0  # one sequence entirely padding
        mask[1, 0] = 1
        batches.append({"input_ids": rng.integers(0, VOCAB, (n, seq)).astype(np.int64), "attention_mask": mask})
    return batches


# ------------------------------------------------------------------------------------ reference


def reference(rows_per_batch: list[np.ndarray]) -> dict:
    rows = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows_per_batch]).astype(np.float64)
    return {"gram": rows.T @ rows, "sum": rows.sum(0), "abs_sum": np.abs(rows).sum(0), "count": rows.shape[0]}


def assert_matches(got: TensorStats, want: dict) -> None:
    assert got.count == want["count"]
    for field in ("gram", "sum", "abs_sum"):
        value, expected = getattr(got, field), want[field]
        assert value.dtype == np.float64 and value.shape == expected.shape
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()))


def assert_same(a: dict[str, TensorStats], b: dict[str, TensorStats]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].count == b[name].count
        for field in ("gram", "sum", "abs_sum"):
            np.testing.assert_array_equal(getattr(a[name], field), getattr(b[name], field))


@pytest.fixture
def sessions(monkeypatch):
    """Records the model bytes of every ORT session collect_stats opens."""
    opened = []
    real = stats_mod.make_session

    def spy(model, provider, threads):
        opened.append(onnx.load_from_string(model))
        assert provider == "CPUExecutionProvider"
        return real(model, provider, threads)

    monkeypatch.setattr(stats_mod, "make_session", spy)
    return opened


# ------------------------------------------------------------------------------------- TensorStats


def test_tensor_stats_update_and_properties(monkeypatch):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((50, 6)) + 2).astype(np.float32)
    stats = TensorStats.zeros(6)
    stats.update(rows[:20])
    stats.update(rows[20:20])  # no rows: no change
    monkeypatch.setattr(statistics, "_CHUNK_ELEMENTS", 7)  # one row at a time
    stats.update(rows[20:])
    want = reference([rows])
    assert_matches(stats, want)
    r64 = rows.astype(np.float64)
    np.testing.assert_allclose(stats.mean, r64.mean(0))
    np.testing.assert_allclose(stats.mean_abs, np.abs(r64).mean(0))
    np.testing.assert_allclose(stats.covariance, np.cov(r64, rowvar=False, bias=True), atol=1e-12)
    with pytest.raises(ValueError):
        stats.update(rows[:, :5])
    empty = TensorStats.zeros(3)
    assert empty.count == 0 and not empty.mean.any() and not empty.covariance.any()


# -------------------------------------------------------------------------------------------- MLP


def test_mlp_stats_match_numpy(mlp_proto):
    batches = mlp_batches()
    stats, hists = collect_stats(mlp_proto, MLP_TENSORS, batches)
    assert list(stats) == MLP_TENSORS and hists == {}
    forward = [mlp_forward(mlp_proto, b["x"]) for b in batches]
    for name in MLP_TENSORS:
        assert stats[name].k == forward[0][name].shape[-1]
        assert_matches(stats[name], reference([f[name] for f in forward]))
    assert stats["h0"].count == 11


def test_one_tensor_per_pass_equals_one_pass(mlp_proto, sessions):
    batches = mlp_batches()
    together, _ = collect_stats(mlp_proto, MLP_TENSORS, batches)
    assert len(sessions) == 1
    apart, _ = collect_stats(mlp_proto, MLP_TENSORS, batches, memory_budget=1)
    assert len(sessions) == 1 + 4  # x is a model input: read from the feeds, no session
    assert_same(together, apart)
    exposed = [[o.name for o in m.graph.output] for m in sessions[1:]]
    assert sorted(names[-1] for names in exposed if len(names) > 1) == ["h0", "h1", "h2"]


def test_existing_outputs_are_not_duplicated(mlp_proto, sessions):
    collect_stats(mlp_proto, ["y", "h1", "y"], mlp_batches())
    (model,) = sessions
    assert [o.name for o in model.graph.output] == ["y", "h1"]
    assert model.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT


def test_model_inputs_alone_need_no_session(mlp_proto, sessions):
    stats, _ = collect_stats(mlp_proto, ["x"], mlp_batches())
    assert sessions == [] and stats["x"].count == 11


def test_original_model_is_not_modified(mlp_proto):
    before = mlp_proto.SerializeToString()
    collect_stats(mlp_proto, MLP_TENSORS, mlp_batches(), memory_budget=1)
    assert mlp_proto.SerializeToString() == before
    token = build_token_model()
    before = token.SerializeToString()
    collect_stats(token, TOKEN_TENSORS, token_batches(), mask_input="attention_mask",
                  counts={"ids_next": VOCAB + 1}, memory_budget=1)
    assert token.SerializeToString() == before
    assert len(token.graph.value_info) == 0


# ---------------------------------------------------------------------------- several passes


def test_one_shot_generator_is_replayed_across_passes(mlp_proto):
    batches = mlp_batches()
    want, _ = collect_stats(mlp_proto, MLP_TENSORS, batches)
    got, _ = collect_stats(mlp_proto, MLP_TENSORS, (b for b in batches), memory_budget=1)
    assert_same(want, got)


def test_callable_is_called_once_per_pass(mlp_proto):
    batches = mlp_batches()
    calls = []

    def fresh():
        calls.append(1)
        return iter(batches)

    want, _ = collect_stats(mlp_proto, MLP_TENSORS, batches)
    got, _ = collect_stats(mlp_proto, MLP_TENSORS, fresh, memory_budget=1)
    assert_same(want, got)
    assert len(calls) == 4  # pass 1: x and one of h0/h1/h2/y; then the other three, one each
    calls.clear()
    collect_stats(mlp_proto, MLP_TENSORS, fresh)
    assert len(calls) == 1


def test_batches_changing_between_passes_is_an_error(mlp_proto):
    sizes = iter([(4, 4), (4,), (4, 4, 4), (4,)])
    with pytest.raises(OnnxlrError, match="changed between passes"):
        collect_stats(mlp_proto, MLP_TENSORS, lambda: mlp_batches(next(sizes)), memory_budget=1)


def test_plan_respects_the_budget_and_packs_small_tensors():
    items = [("a", False), ("b", False), ("c", False), ("d", False), ("in", False)]
    costs = dict(zip(items, [60, 50, 40, 30, 10]))
    passes = stats_mod._plan(items, costs, ["in"], budget=100)
    assert passes[0][0] == ("in", False)  # model inputs join the first pass without counting
    assert all(sum(costs[i] for i in group if i[0] != "in") <= 100 for group in passes)
    assert len(passes) == 2 and sorted(i for group in passes for i in group) == sorted(items)
    assert stats_mod._plan(items, costs, [], budget=1) == [[i] for i in items]
    assert stats_mod._plan(items, costs, [], budget=10**6) == [sorted(items, key=lambda i: -costs[i])]
    assert stats_mod._plan(items[-1:], costs, ["in"], budget=1) == [[("in", False)]]


def test_cost_resolves_symbolic_dims_from_the_first_batch():
    info = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", "seq", 8])
    gram = (8 * 8 + 2 * 8) * 8
    assert stats_mod._cost(info.type, {"batch": 2, "seq": 5}, None) == gram + 2 * 5 * 8 * 4
    # an unresolved leading dimension: the leading product is the first batch's row guess
    assert stats_mod._cost(info.type, {"batch": 2}, None, rows_guess=40) == gram + 40 * 8 * 4
    assert stats_mod._cost(info.type, {"batch": 2, "seq": 5}, 100) == 800 + 2 * 5 * 8 * 4
    unknown = stats_mod._cost(None, {}, None)
    assert unknown >= stats_mod.UNKNOWN_K ** 2 * 8


def test_free_spatial_dims_are_sized_from_the_first_batch(monkeypatch):
    """A detector taking any image size (input [N, 3, H, W], every intermediate dim free): the passes are
    planned from the shapes the first batch gives (one pass here, not one per tensor as with unknown
    dims assumed huge), and a later batch of another size is still collected."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 3 if i == 0 else 16, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        x = f"c{i}"
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    passes = []
    real = stats_mod._run_pass
    monkeypatch.setattr(stats_mod, "_run_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    batches = [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)},
               {"x": rng.standard_normal((1, 3, 24, 32)).astype(np.float32)}]
    found, _ = collect_stats(model, [f"c{i}" for i in range(5)], batches, memory_budget=2**23)
    assert len(passes) == 1  # 5 activations of 64 KB each fit 8 MB; unknown dims would cost ~25 MB each
    assert all(found[f"c{i}"].count == 16 * 32 + 16 * 24 for i in range(5))  # rows (N·C·H, W) of both batches


# -------------------------------------------------------------------------------- masks and counts


def test_masking_removes_exactly_the_masked_rows():
    model, batches = build_token_model(), token_batches()
    stats, _ = collect_stats(model, TOKEN_TENSORS, batches, mask_input="attention_mask")
    forward = [token_forward(b["input_ids"], b["attention_mask"]) for b in batches]
    keep = [b["attention_mask"].reshape(-1) != 0 for b in batches]
    kept_rows = sum(int(k.sum()) for k in keep)
    assert 0 < kept_rows < sum(k.size for k in keep)
    for name in ("emb_sum", "h", "r", "flat"):  # (batch, seq, k) or flattened (batch*seq, k)
        rows = [f[name].reshape(-1, f[name].shape[-1])[k] for f, k in zip(forward, keep)]
        assert stats[name].count == kept_rows
        assert_matches(stats[name], reference(rows))
    assert_matches(stats["pooled"], reference([f["pooled"] for f in forward]))  # (batch, k): every row
    assert stats["pooled"].count == 11


def test_without_a_mask_every_row_counts():
    model, batches = build_token_model(), token_batches()
    stats, _ = collect_stats(model, TOKEN_TENSORS, batches)
    forward = [token_forward(b["input_ids"], b["attention_mask"]) for b in batches]
    for name in TOKEN_TENSORS:
        assert_matches(stats[name], reference([f[name] for f in forward]))
    assert stats["r"].count == 4 * 6 * 2 + 3 * 9


def test_index_counts_equal_bincount():
    model, batches = build_token_model(), token_batches()
    counts = {"input_ids": VOCAB, "ids_next": VOCAB + 1}
    stats, hists = collect_stats(model, ["h"], batches, mask_input="attention_mask", counts=counts)
    ids = np.concatenate([b["input_ids"].reshape(-1) for b in batches])
    mask = np.concatenate([b["attention_mask"].reshape(-1) for b in batches]) != 0
    assert list(hists) == ["input_ids", "ids_next"] and list(stats) == ["h"]
    np.testing.assert_array_equal(hists["input_ids"], np.bincount(ids[mask], minlength=VOCAB))
    np.testing.assert_array_equal(hists["ids_next"], np.bincount(ids[mask] + 1, minlength=VOCAB + 1))
    assert hists["ids_next"][0] == 0 and hists["input_ids"].dtype == np.int64
    _, unmasked = collect_stats(model, [], batches, counts={"input_ids": 25})
    np.testing.assert_array_equal(unmasked["input_ids"], np.bincount(ids, minlength=25))


def test_index_counts_same_in_one_or_many_passes(sessions):
    model, batches = build_token_model(), token_batches()
    counts = {"input_ids": VOCAB, "ids_next": VOCAB + 1}
    a, ha = collect_stats(model, TOKEN_TENSORS, batches, mask_input="attention_mask", counts=counts)
    assert len(sessions) == 1
    b, hb = collect_stats(model, TOKEN_TENSORS, batches, mask_input="attention_mask", counts=counts, memory_budget=1)
    assert len(sessions) == 1 + 6
    assert_same(a, b)
    assert all(np.array_equal(ha[n], hb[n]) for n in counts)


def test_negative_and_out_of_range_indices():
    model = build_token_model()
    batch = {"input_ids": np.array([[0, -1, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    _, hists = collect_stats(model, [], [batch], counts={"input_ids": 4})
    np.testing.assert_array_equal(hists["input_ids"], [1, 0, 0, 2])  # -1 is the last row
    with pytest.raises(OnnxlrError, match="index 3 .*outside a table of 3 rows"):
        collect_stats(model, [], [batch], counts={"input_ids": 3})
    with pytest.raises(OnnxlrError, match="integer tensor"):
        collect_stats(model, [], [batch], counts={"emb": 3})


# ------------------------------------------------------------------------------- no value_info


def test_works_without_shape_inference(monkeypatch, sessions):
    """Exposed outputs stay loadable when nothing is known about intermediate types (even int ones)."""
    model, batches = build_token_model(), token_batches()
    counts = {"ids_next": VOCAB + 1}
    want, want_h = collect_stats(model, TOKEN_TENSORS, batches, mask_input="attention_mask", counts=counts)
    typed = {o.name: o.type.tensor_type.elem_type for o in sessions[-1].graph.output}
    assert typed["ids_next"] == TensorProto.INT64 and typed["h"] == TensorProto.FLOAT

    def fail(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("no inference here")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    got, got_h = collect_stats(model, TOKEN_TENSORS, batches, mask_input="attention_mask", counts=counts)
    assert_same(want, got)
    np.testing.assert_array_equal(want_h["ids_next"], got_h["ids_next"])
    untyped = {o.name: o.HasField("type") for o in sessions[-1].graph.output}
    assert untyped["ids_next"] is False and untyped["h"] is False and untyped["pooled"] is True


# ------------------------------------------------------------------------------------------- errors


def test_unknown_tensor_names(mlp_proto):
    with pytest.raises(OnnxlrError, match="'nope' is not in the model"):
        collect_stats(mlp_proto, ["h0", "nope"], mlp_batches())
    with pytest.raises(OnnxlrError, match="'W1' is a weight"):
        collect_stats(mlp_proto, ["W1"], mlp_batches())
    with pytest.raises(OnnxlrError, match="'ghost' is not in the model"):
        collect_stats(mlp_proto, [], mlp_batches(), counts={"ghost": 3})


def test_bad_arguments(mlp_proto):
    with pytest.raises(OnnxlrError, match="mask input 'h0' is not a model input"):
        collect_stats(mlp_proto, ["h0"], mlp_batches(), mask_input="h0")
    with pytest.raises(OnnxlrError, match="memory budget"):
        collect_stats(mlp_proto, ["h0"], mlp_batches(), memory_budget=0)
    with pytest.raises(OnnxlrError, match="table size"):
        collect_stats(mlp_proto, [], mlp_batches(), counts={"x": 0})
    with pytest.raises(OnnxlrError, match="no calibration batches"):
        collect_stats(mlp_proto, ["h0"], [])
    with pytest.raises(OnnxlrError, match="must be an iterable"):
        collect_stats(mlp_proto, ["h0"], 5)


def test_bad_feeds_name_the_batch(mlp_proto):
    batches = mlp_batches() + [{"x": np.zeros((2, 32), np.float64)}]
    with pytest.raises(OnnxlrError, match="calibration batch 3"):
        collect_stats(mlp_proto, ["h0"], batches)


def test_last_dimension_must_not_change():
    with pytest.raises(OnnxlrError, match="'input_ids' has last dimension 9 in calibration batch 2"):
        collect_stats(build_token_model(), ["input_ids"], token_batches())
