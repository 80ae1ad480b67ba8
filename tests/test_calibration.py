"""Calibration readers: every source layout, sample cuts, batch sizes, every data error, mask lookup."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.calibration import calibration_batches, find_mask_input
from onnxlr.errors import OnnxlrError

IN_DIM = 32  # tiny MLP input width (tests/conftest.py)


def token_model(mask_type=TensorProto.INT64, mask_name="attention_mask", extra_inputs=()) -> onnx.ModelProto:
    """input_ids[batch, seq] int64, <mask_name>[batch, seq] -> embeddings * mask, out[batch, seq, 4]."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "E")
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", [mask_name], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis"], ["mask_3d"]),
        helper.make_node("Mul", ["emb", "mask_3d"], ["out"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info(mask_name, mask_type, ["batch", "seq"])]
    inputs += [helper.make_tensor_value_info(name, dtype, ["batch"]) for name, dtype in extra_inputs]
    graph = helper.make_graph(nodes, "tokens", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 4])],
                              initializer=[table, numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def xs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN_DIM)).astype(np.float32)


def tokens(n: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 10, (n, seq)).astype(np.int64),
            "attention_mask": (rng.random((n, seq)) < 0.7).astype(np.int64)}


def sizes(batches) -> list[int]:
    return [b["x"].shape[0] if "x" in b else b["input_ids"].shape[0] for b in batches]


def joined(batches, name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in batches])


# ------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("batch_size, expected", [(8, [8, 8, 4]), (1, [1] * 20), (20, [20]), (64, [20])])
def test_npz_is_sliced_by_batch_size(tmp_path, mlp_proto, batch_size, expected):
    x = xs(20)
    np.savez(tmp_path / "calib.npz", x=x)
    batches = list(calibration_batches(tmp_path / "calib.npz", mlp_proto, batch_size=batch_size))
    assert sizes(batches) == expected
    np.testing.assert_array_equal(joined(batches, "x"), x)
    assert all(set(b) == {"x"} and b["x"].dtype == np.float32 for b in batches)


def test_compressed_npz_with_several_inputs(tmp_path):
    data = tokens(11, 6)
    np.savez_compressed(tmp_path / "t.npz", **data)
    batches = list(calibration_batches(str(tmp_path / "t.npz"), token_model(), batch_size=4))
    assert sizes(batches) == [4, 4, 3]
    for name, array in data.items():
        np.testing.assert_array_equal(joined(batches, name), array)
    batches[0]["input_ids"][0, 0] = 3  # batches are writable arrays of their own


def test_npz_rows_are_streamed_not_loaded_whole(tmp_path, mlp_proto, monkeypatch):
    x = xs(12)
    np.savez(tmp_path / "calib.npz", x=x)

    def refuse(self, key):
        raise AssertionError("an array was loaded whole")

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", refuse)
    batches = list(calibration_batches(tmp_path / "calib.npz", mlp_proto, batch_size=5))
    np.testing.assert_array_equal(joined(batches, "x"), x)


def test_fortran_order_npz_falls_back_to_whole_arrays(tmp_path, mlp_proto):
    x = np.asfortranarray(xs(9))
    np.savez(tmp_path / "calib.npz", x=x)
    batches = list(calibration_batches(tmp_path / "calib.npz", mlp_proto, batch_size=4))
    assert sizes(batches) == [4, 4, 1]
    np.testing.assert_array_equal(joined(batches, "x"), x)


def test_folder_of_npz_in_sorted_order_each_file_sliced(tmp_path):
    model = token_model()
    first, second, third = tokens(5, 3, seed=1), tokens(10, 7, seed=2), tokens(2, 4, seed=3)
    np.savez(tmp_path / "b2.npz", **second)  # written out of order: reading order is by name
    np.savez(tmp_path / "b1.npz", **first)
    np.savez(tmp_path / "b3.npz", **third)
    (tmp_path / "README.txt").write_text("ignored")
    batches = list(calibration_batches(tmp_path, model, batch_size=4))
    assert sizes(batches) == [4, 1, 4, 4, 2, 2]
    assert [b["input_ids"].shape[1] for b in batches] == [3, 3, 7, 7, 7, 4]  # no batch spans two files
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches[:2]]), first["input_ids"])
    np.testing.assert_array_equal(np.concatenate([b["attention_mask"] for b in batches[2:5]]), second["attention_mask"])
    np.testing.assert_array_equal(batches[5]["input_ids"], third["input_ids"])


def test_folder_of_npy_is_one_dataset_read_by_rows(tmp_path):
    data = tokens(10, 5)
    for name, array in data.items():
        np.save(tmp_path / f"{name}.npy", array)
    batches = list(calibration_batches(tmp_path, token_model(), batch_size=4))
    assert sizes(batches) == [4, 4, 2]
    for name, array in data.items():
        np.testing.assert_array_equal(joined(batches, name), array)
    assert all(type(b["input_ids"]) is np.ndarray for b in batches)  # copies, not memory maps


def test_iterable_batches_pass_through_unsliced(mlp_proto):
    given = [{"x": xs(3)}, {"x": xs(5, seed=1)}, {"x": xs(2, seed=2)}]
    batches = list(calibration_batches(given, mlp_proto, batch_size=2))
    assert sizes(batches) == [3, 5, 2]
    for got, want in zip(batches, given):
        np.testing.assert_array_equal(got["x"], want["x"])


def test_generator_is_read_lazily(mlp_proto):
    pulled = []

    def generate():
        for i in range(100):
            pulled.append(i)
            yield {"x": xs(2, seed=i)}

    batches = calibration_batches(generate(), mlp_proto)
    next(batches)
    assert pulled == [0]


def test_dict_of_arrays_is_sliced_like_an_npz(mlp_proto):
    x = xs(7)
    batches = list(calibration_batches({"x": x}, mlp_proto, batch_size=3))
    assert sizes(batches) == [3, 3, 1]
    np.testing.assert_array_equal(joined(batches, "x"), x)


# ---------------------------------------------------------------------------------- sample cuts


def test_samples_cut_the_last_batch_short(tmp_path, mlp_proto):
    x = xs(20)
    np.savez(tmp_path / "calib.npz", x=x)
    batches = list(calibration_batches(tmp_path / "calib.npz", mlp_proto, samples=10, batch_size=8))
    assert sizes(batches) == [8, 2]
    np.testing.assert_array_equal(joined(batches, "x"), x[:10])


def test_samples_on_a_batch_boundary_and_beyond_the_data(tmp_path, mlp_proto):
    np.savez(tmp_path / "calib.npz", x=xs(20))
    assert sizes(calibration_batches(tmp_path / "calib.npz", mlp_proto, samples=16, batch_size=8)) == [8, 8]
    assert sizes(calibration_batches(tmp_path / "calib.npz", mlp_proto, samples=500, batch_size=8)) == [8, 8, 4]


def test_samples_cut_across_files_and_iterables(tmp_path, mlp_proto):
    np.savez(tmp_path / "a.npz", x=xs(3))
    np.savez(tmp_path / "b.npz", x=xs(3, seed=1))
    assert sizes(calibration_batches(tmp_path, mlp_proto, samples=5, batch_size=8)) == [3, 2]
    consumed = []

    def generate():
        for i in range(10):
            consumed.append(i)
            yield {"x": xs(4, seed=i)}

    assert sizes(calibration_batches(generate(), mlp_proto, samples=6)) == [4, 2]
    assert consumed == [0, 1]  # stopped without reading further


def test_nan_after_the_sample_cut_is_never_read(tmp_path, mlp_proto):
    x = xs(12)
    x[10, 0] = np.nan
    np.savez(tmp_path / "calib.npz", x=x)
    assert sizes(calibration_batches(tmp_path / "calib.npz", mlp_proto, samples=8, batch_size=4)) == [4, 4]


# --------------------------------------------------------------------------------------- errors


def error_of(source, model, **options) -> str:
    with pytest.raises(OnnxlrError) as info:
        list(calibration_batches(source, model, **options))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_input_names_file_and_input(tmp_path):
    np.savez(tmp_path / "calib.npz", input_ids=tokens(4, 3)["input_ids"])
    message = error_of(tmp_path / "calib.npz", token_model())
    assert "calib.npz" in message and "'attention_mask'" in message


def test_extra_array_names_it(tmp_path, mlp_proto):
    np.savez(tmp_path / "calib.npz", x=xs(4), labels=np.zeros(4, np.int64))
    message = error_of(tmp_path / "calib.npz", mlp_proto)
    assert "calib.npz" in message and "'labels'" in message and "not a model input" in message


def test_wrong_dtype(tmp_path, mlp_proto):
    np.savez(tmp_path / "calib.npz", x=xs(4).astype(np.float64))
    message = error_of(tmp_path / "calib.npz", mlp_proto)
    assert "'x'" in message and "float64" in message and "float32" in message


@pytest.mark.parametrize("shape, words", [((4, IN_DIM, 1), "rank 2"), ((4, IN_DIM - 1), "expects 32")])
def test_wrong_shape(tmp_path, mlp_proto, shape, words):
    np.savez(tmp_path / "calib.npz", x=np.zeros(shape, np.float32))
    message = error_of(tmp_path / "calib.npz", mlp_proto)
    assert "'x'" in message and words in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_batch(tmp_path, mlp_proto, bad):
    x = xs(12)
    x[9, 3] = bad
    np.savez(tmp_path / "calib.npz", x=x)
    message = error_of(tmp_path / "calib.npz", mlp_proto, batch_size=4)
    assert "calib.npz" in message and "samples 8-11" in message and "'x'" in message and "NaN or Inf" in message


def test_error_in_an_iterable_names_the_batch(mlp_proto):
    given = [{"x": xs(2)}, {"x": xs(2).astype(np.float16)}]
    message = error_of(given, mlp_proto)
    assert "calibration batch 1" in message and "'x'" in message
    assert "calibration batch 0" in error_of(["not a dict"], mlp_proto)


def test_error_in_a_folder_names_the_file(tmp_path, mlp_proto):
    np.savez(tmp_path / "a.npz", x=xs(2))
    np.savez(tmp_path / "b.npz", x=xs(2).astype(np.float64))
    message = error_of(tmp_path, mlp_proto)
    assert "b.npz" in message and "'x'" in message


def test_object_arrays_are_refused(tmp_path, mlp_proto):
    objects = np.empty((2, IN_DIM), dtype=object)
    objects[:] = 1.0
    np.savez(tmp_path / "calib.npz", x=objects)
    assert "object array" in error_of(tmp_path / "calib.npz", mlp_proto)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "x.npy", objects, allow_pickle=True)
    assert "object array" in error_of(folder, mlp_proto)
    assert "object array" in error_of([{"x": objects}], mlp_proto)


def test_empty_sources(tmp_path, mlp_proto):
    (tmp_path / "empty").mkdir()
    assert "no .npz or .npy" in error_of(tmp_path / "empty", mlp_proto)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert "no .npz or .npy" in error_of(tmp_path / "other", mlp_proto)
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, IN_DIM), np.float32))
    assert "no calibration samples" in error_of(tmp_path / "zero.npz", mlp_proto)
    assert "no calibration samples" in error_of([], mlp_proto)
    assert "no calibration samples" in error_of(iter(()), mlp_proto)
    np.savez(tmp_path / "nothing.npz")
    assert "holds no arrays" in error_of(tmp_path / "nothing.npz", mlp_proto)


def test_path_errors_are_raised_before_iterating(tmp_path, mlp_proto):
    with pytest.raises(OnnxlrError, match="not found"):
        calibration_batches(tmp_path / "missing.npz", mlp_proto)
    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(OnnxlrError, match="not an .npz file"):
        calibration_batches(tmp_path / "plain.txt", mlp_proto)
    (tmp_path / "mixed").mkdir()
    np.savez(tmp_path / "mixed" / "a.npz", x=xs(2))
    np.save(tmp_path / "mixed" / "x.npy", xs(2))
    with pytest.raises(OnnxlrError, match="mixes"):
        calibration_batches(tmp_path / "mixed", mlp_proto)


@pytest.mark.parametrize("source", [42, None, b"calib.npz", 3.5])
def test_not_a_path_or_iterable(mlp_proto, source):
    with pytest.raises(OnnxlrError, match="must be a path"):
        calibration_batches(source, mlp_proto)


@pytest.mark.parametrize("options", [{"batch_size": 0}, {"batch_size": 2.5}, {"samples": 0}, {"samples": -3},
                                     {"samples": True}])
def test_bad_counts(mlp_proto, options):
    with pytest.raises(OnnxlrError, match="positive integer"):
        calibration_batches([{"x": xs(2)}], mlp_proto, **options)


def test_arrays_without_a_shared_sample_axis(tmp_path):
    data = tokens(6, 3)
    data["attention_mask"] = data["attention_mask"][:5]
    np.savez(tmp_path / "t.npz", **data)
    assert "different numbers of samples" in error_of(tmp_path / "t.npz", token_model())


# ------------------------------------------------------------------------------------ mask input


def test_mask_input_found_automatically():
    assert find_mask_input(token_model()) == "attention_mask"
    assert find_mask_input(token_model(mask_type=TensorProto.BOOL)) == "attention_mask"
    assert find_mask_input(token_model(mask_name="input_mask")) == "input_mask"
    # attention_mask wins over other masks; several plain masks are ambiguous
    model = token_model(mask_name="pad_mask", extra_inputs=[("Attention_Mask_2", TensorProto.INT32)])
    assert find_mask_input(model) == "Attention_Mask_2"
    model = token_model(mask_name="pad_mask", extra_inputs=[("seg_mask", TensorProto.INT32)])
    assert find_mask_input(model) is None


def test_no_mask_input(mlp_proto):
    assert find_mask_input(mlp_proto) is None
    assert find_mask_input(token_model(mask_type=TensorProto.FLOAT)) is None  # float masks are not guessed


def test_mask_input_named_explicitly():
    model = token_model(mask_name="keep")
    assert find_mask_input(model) is None
    assert find_mask_input(model, "keep") == "keep"
    assert find_mask_input(model, "input_ids") == "input_ids"


def test_bad_explicit_mask_input():
    with pytest.raises(OnnxlrError, match="'nope' is not a model input"):
        find_mask_input(token_model(), "nope")
    with pytest.raises(OnnxlrError, match="'E' is not a model input"):
        find_mask_input(token_model(), "E")  # an initializer
    with pytest.raises(OnnxlrError, match="integer or bool"):
        find_mask_input(token_model(mask_type=TensorProto.FLOAT), "attention_mask")
