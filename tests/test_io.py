"""onnxlr.io: loading (external data confined to the model's folder), atomic checked saving."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import onnxlr
from onnxlr import io
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.graph import hoist_constant_nodes


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders save_model may have left behind."""
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def _set_location(model_path: Path, location: str) -> None:
    """Rewrite the external data "location" of every external tensor, by hand."""
    model = onnx.load_model(str(model_path), load_external_data=False)
    changed = 0
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
                changed += 1
    assert changed >= 2  # W1 and W2 are external
    model_path.write_bytes(model.SerializeToString())


def _external_names(path: Path) -> set[str]:
    model = onnx.load_model(str(path), load_external_data=False)
    return {t.name for t in model.graph.initializer if external_data_helper.uses_external_data(t)}


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_embedded_model_has_the_built_weights(mlp_path, mlp_proto, initializers):
    model = io.load_model(mlp_path)
    got, want = initializers(model), initializers(mlp_proto)
    assert set(got) == {"W1", "b1", "W2", "b2"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_load_with_external_data_matches_embedded(tmp_path, tiny_mlp_external, mlp_proto, initializers):
    path = tiny_mlp_external(tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").is_file()
    assert _external_names(path) == {"W1", "W2"}  # the fixture really stored them outside
    model = io.load_model(path)
    for tensor in model.graph.initializer:
        assert not external_data_helper.uses_external_data(tensor), tensor.name
    got, want = initializers(model), initializers(mlp_proto)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_load_external_data_in_subfolder_is_allowed(tmp_path, tiny_mlp_external, mlp_proto, initializers):
    (tmp_path / "weights").mkdir()
    path = tiny_mlp_external(tmp_path / "m.onnx", location="weights/m.bin")
    assert (tmp_path / "weights" / "m.bin").is_file()
    got = initializers(io.load_model(path))
    np.testing.assert_array_equal(got["W1"], initializers(mlp_proto)["W1"])


def test_symlink_that_stays_inside_folder_loads_or_is_a_user_error(tmp_path, tiny_mlp_external, mlp_proto,
                                                                   initializers):
    """io's contract: only symlinks resolving *outside* the folder are refused. Loading through an
    in-folder symlink must either work or fail as an OnnxlrError (one line in the CLI), never raw."""
    path = tiny_mlp_external(tmp_path / "m.onnx")
    os.symlink(tmp_path / "m.onnx.data", tmp_path / "alias.data")
    _set_location(path, "alias.data")
    try:
        model = io.load_model(path)
    except OnnxlrError:
        return
    np.testing.assert_array_equal(initializers(model)["W2"], initializers(mlp_proto)["W2"])


def test_external_length_past_end_of_file_is_a_user_error(tmp_path, tiny_mlp_external):
    path = tiny_mlp_external(tmp_path / "m.onnx")
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "length":
                entry.value = str(10**8)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxlrError):
        io.load_model(path)


def test_load_refuses_absolute_external_location(tmp_path, tiny_mlp_external):
    path = tiny_mlp_external(tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx.data").resolve()  # exists: only the absolute form is wrong
    _set_location(path, str(data))
    with pytest.raises(OnnxlrError, match="absolute path"):
        io.load_model(path)


def test_load_refuses_parent_relative_location(tmp_path, tiny_mlp_external):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = tiny_mlp_external(model_dir / "m.onnx")
    shutil.copy(model_dir / "m.onnx.data", tmp_path / "x.data")  # the escaped-to file exists
    _set_location(path, "../x.data")
    with pytest.raises(OnnxlrError, match=r"\.\./x\.data.*leaves the model's folder"):
        io.load_model(path)


def test_load_refuses_symlink_pointing_outside_folder(tmp_path, tiny_mlp_external):
    model_dir, outside = tmp_path / "model", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    path = tiny_mlp_external(model_dir / "m.onnx")
    shutil.move(model_dir / "m.onnx.data", outside / "real.data")
    os.symlink(outside / "real.data", model_dir / "link.data")
    _set_location(path, "link.data")
    with pytest.raises(OnnxlrError, match="resolves outside"):
        io.load_model(path)


def test_load_refuses_symlinked_subfolder_pointing_outside(tmp_path, tiny_mlp_external):
    model_dir, outside = tmp_path / "model", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    path = tiny_mlp_external(model_dir / "m.onnx")
    shutil.move(model_dir / "m.onnx.data", outside / "m.onnx.data")
    os.symlink(outside, model_dir / "sub")
    _set_location(path, "sub/m.onnx.data")
    with pytest.raises(OnnxlrError, match="resolves outside"):
        io.load_model(path)


def test_load_missing_external_data_names_the_file(tmp_path, tiny_mlp_external):
    path = tiny_mlp_external(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(OnnxlrError, match=r"m\.onnx\.data.*missing"):
        io.load_model(path)


def test_load_external_tensor_without_location(tmp_path, tiny_mlp_external):
    path = tiny_mlp_external(tmp_path / "m.onnx")
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        entries = [e for e in tensor.external_data if e.key != "location"]
        del tensor.external_data[:]
        tensor.external_data.extend(entries)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxlrError, match="names no file"):
        io.load_model(path)


@pytest.mark.parametrize("cut", ["head", "half", "tail"])
def test_load_truncated_protobuf(tmp_path, mlp_path, cut):
    data = mlp_path.read_bytes()
    size = {"head": 7, "half": len(data) // 2, "tail": len(data) - 3}[cut]
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[:size])
    with pytest.raises(OnnxlrError, match="truncated.onnx"):
        io.load_model(bad)


def test_load_corrupt_bytes(tmp_path, mlp_path):
    data = bytearray(mlp_path.read_bytes())
    data[:16] = b"\xff" * 16
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(bytes(data))
    with pytest.raises(OnnxlrError, match="corrupt.onnx"):
        io.load_model(bad)


def test_load_text_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not an ONNX model\njust some text\n")
    with pytest.raises(OnnxlrError, match="notes.onnx"):
        io.load_model(text)


def test_load_empty_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxlrError, match="empty.onnx"):
        io.load_model(empty)


def test_load_missing_path(tmp_path):
    with pytest.raises(OnnxlrError, match="not found.*nope.onnx"):
        io.load_model(tmp_path / "nope.onnx")


def test_load_directory_is_refused(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OnnxlrError, match="not a file"):
        io.load_model(tmp_path / "dir.onnx")


# --------------------------------------------------------------------------------------------------
# Constant-node weights


def test_hoist_constant_nodes_makes_initializer(build_mlp, initializers):
    model = build_mlp(weight_in_constant=True)
    hoisted = hoist_constant_nodes(model)
    assert [n.op_type for n in hoisted.graph.node] == ["MatMul", "Add", "Relu", "Gemm"]
    np.testing.assert_array_equal(initializers(hoisted)["W1"], initializers(build_mlp())["W1"])
    assert model.graph.node[0].op_type == "Constant"  # the input model is not modified
    assert "W1" not in initializers(model)


def test_constant_node_weight_is_factorized_exactly(tmp_path, tiny_mlp_constant, ort_run, sample_x):
    path = tiny_mlp_constant(tmp_path / "const.onnx")
    model = io.load_model(path)
    assert any(n.op_type == "Constant" for n in model.graph.node)
    optimized, report = onnxlr.optimize(model, rank_ratio=1.0, force=True, repeats=2)
    rewritten = {c.node for c in report.pass_named("factorize_matmul").rewritten}
    assert rewritten == {"fc1", "fc2"}
    names = {t.name for t in optimized.graph.initializer}
    assert {"W1/lr_A", "W1/lr_B", "W2/lr_A", "W2/lr_B"} <= names
    assert "W1" not in names and not any(n.op_type == "Constant" for n in optimized.graph.node)
    onnx.checker.check_model(optimized)
    x = sample_x(16)
    (ref,), (out,) = ort_run(model, {"x": x}), ort_run(optimized, {"x": x})
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # same parameters count for Constant-node and initializer weights
    assert report.original.params == 32 * 48 + 48 + 24 * 48 + 24


# --------------------------------------------------------------------------------------------------
# Saving


def test_save_model_writes_output_and_no_temp_files(tmp_path, mlp_proto, initializers):
    out = tmp_path / "out" / "saved.onnx"
    out.parent.mkdir()
    assert io.save_model(mlp_proto, out) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["saved.onnx"]
    reloaded = io.load_model(out)
    for name, value in initializers(mlp_proto).items():
        np.testing.assert_array_equal(initializers(reloaded)[name], value)


def test_save_model_replaces_existing_file(build_mlp, tmp_path, mlp_proto, initializers):
    out = tmp_path / "saved.onnx"
    io.save_model(build_mlp(seed=5), out)
    io.save_model(mlp_proto, out)
    np.testing.assert_array_equal(initializers(io.load_model(out))["W1"], initializers(mlp_proto)["W1"])
    assert _leftovers(tmp_path) == []


def test_save_model_external_data(tmp_path, mlp_proto, initializers):
    out = tmp_path / "big.onnx"
    io.save_model(mlp_proto, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert _external_names(out) == {"W1", "W2"}  # tensors >= 1 KiB go outside
    assert (tmp_path / "big.onnx.data").stat().st_size >= (32 * 48 + 24 * 48) * 4
    reloaded = io.load_model(out)
    for name, value in initializers(mlp_proto).items():
        np.testing.assert_array_equal(initializers(reloaded)[name], value)
    # the caller's model is not turned into an external-data model
    assert not any(external_data_helper.uses_external_data(t) for t in mlp_proto.graph.initializer)


def test_save_model_external_data_on_model_without_large_tensors(tmp_path):
    """A model whose tensors are all under the 1 KiB external threshold, saved with external_data=True.

    Known library bug: io.save_model moves ``<tmp>/<name>.data`` unconditionally, but
    convert_model_to_external_data(size_threshold=1024) writes no data file when no tensor reaches
    1 KiB, so os.replace raises a raw FileNotFoundError.
    """
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "small.onnx"
    io.save_model(model, out, external_data=True)
    assert out.is_file()
    assert _leftovers(tmp_path) == []
    np.testing.assert_array_equal(numpy_helper.to_array(io.load_model(out).graph.initializer[0]), np.eye(4))


def test_automatic_external_data_above_threshold(tmp_path, mlp_proto, initializers, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    assert io.tensor_bytes(mlp_proto) > 1024
    out = tmp_path / "auto.onnx"
    io.save_model(mlp_proto, out)  # external_data=None: decided by size
    assert (tmp_path / "auto.onnx.data").is_file()
    assert _external_names(out) == {"W1", "W2"}
    reloaded = io.load_model(out)
    np.testing.assert_array_equal(initializers(reloaded)["W2"], initializers(mlp_proto)["W2"])


def test_no_external_data_below_threshold(tmp_path, mlp_proto):
    out = tmp_path / "small.onnx"
    io.save_model(mlp_proto, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    assert _external_names(out) == set()


def test_cli_automatic_external_data_threshold(tmp_path, mlp_path, monkeypatch, capsys):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--no-validate"]) == 0
    assert (tmp_path / "opt.onnx.data").is_file()
    # rank ratio 0.5: factors W1 -> 32x16 and 16x48, W2 -> 48x12 and 12x24, all >= 1 KiB
    assert _external_names(out) == {"W1/lr_A", "W1/lr_B", "W2/lr_A", "W2/lr_B"}
    io.load_model(out)


def test_tensor_bytes_counts_initializers_and_constants(build_mlp):
    expected = (32 * 48 + 48 + 24 * 48 + 24) * 4
    assert io.tensor_bytes(build_mlp()) == expected
    assert io.tensor_bytes(build_mlp(weight_in_constant=True)) == expected


def test_optimize_leaves_input_file_unchanged(tmp_path, mlp_path, capsys):
    before = _sha256(mlp_path)
    mtime = mlp_path.stat().st_mtime_ns
    assert main(["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--rank-ratio", "0.5",
                 "--repeats", "2"]) == 0
    assert _sha256(mlp_path) == before
    assert mlp_path.stat().st_mtime_ns == mtime
    assert (tmp_path / "o.onnx").is_file()


def test_optimize_leaves_external_data_input_unchanged(tmp_path, tiny_mlp_external, capsys):
    path = tiny_mlp_external(tmp_path / "ext.onnx")
    hashes = {p: _sha256(p) for p in (path, tmp_path / "ext.onnx.data")}
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--repeats", "2"]) == 0
    assert {p: _sha256(p) for p in hashes} == hashes


@pytest.mark.parametrize("external_data", [False, True])
def test_failing_check_leaves_no_output_and_no_temp_file(build_mlp, tmp_path, external_data):
    invalid = build_mlp(bad_input=True)  # Relu reads a tensor nothing defines
    out = tmp_path / "invalid.onnx"
    with pytest.raises(onnx.checker.ValidationError):
        io.save_model(invalid, out, external_data=external_data)
    assert list(tmp_path.iterdir()) == []


def test_failing_check_keeps_previous_output(build_mlp, tmp_path, mlp_proto):
    out = tmp_path / "m.onnx"
    io.save_model(mlp_proto, out)
    before = _sha256(out)
    with pytest.raises(onnx.checker.ValidationError):
        io.save_model(build_mlp(bad_input=True), out)
    assert _sha256(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_into_missing_folder(tmp_path, mlp_proto):
    with pytest.raises(OnnxlrError, match="does not exist"):
        io.save_model(mlp_proto, tmp_path / "no" / "such" / "m.onnx")


def test_save_onto_a_folder(tmp_path, mlp_proto):
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(OnnxlrError, match="is a folder"):
        io.save_model(mlp_proto, tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_write_refuses_to_overwrite_source(mlp_path, mlp_proto):
    before = _sha256(mlp_path)
    with pytest.raises(OnnxlrError, match="is the input model"):
        onnxlr.write(mlp_proto, mlp_path, source=mlp_path)
    assert _sha256(mlp_path) == before


def test_models_above_the_protobuf_limit_take_the_external_data_path(tmp_path, tiny_mlp_external, monkeypatch,
                                                                     capsys):
    """Above 2 GB (the limit lowered here to a few bytes, so the path runs on a tiny model) the input
    is checked by path, not in memory, and the output is written with external data unasked."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 64)
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: (checked.append(type(m)), real(m, *a, **k))[1])
    (tmp_path / "in").mkdir()
    src = tiny_mlp_external(tmp_path / "in" / "big.onnx")
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    out = tmp_path / "small.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--rank-ratio", "0.5", "--repeats", "1"]) == 0
    assert str in checked  # the input was checked by path
    assert (tmp_path / "small.onnx.data").is_file() and _external_names(out)
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    assert io.load_model(out).graph.node
