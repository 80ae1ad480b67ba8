"""Hostile inputs through the CLI (issue #8): each one gives exit code 2, one ``onnxlr: error:`` line on
stderr, no traceback, no output or temporary file, and leaves the input file byte-identical.

Cases already covered elsewhere are not repeated here; docs/reliability.md lists every case and the
test that covers it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import message_lines, user_error_line
from onnx import helper

from onnxlr.cli import main
from onnxlr.planning.factorize import Factorizer

FAST = ["--repeats", "2"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused(capsys, argv, *needles, folder: Path, keep: tuple[Path, ...] = ()) -> str:
    """Run the CLI; check exit 2, one ``onnxlr: error:`` line holding every needle, no traceback, the
    folder's files unchanged (no output, no temporary file) and every file in ``keep`` byte-identical."""
    before_tree = _tree(folder)
    before = {p: _sha256(p) for p in keep}
    line = user_error_line(capsys, argv)
    for needle in needles:
        assert needle in line, (needle, line)
    assert _tree(folder) == before_tree
    assert {p: _sha256(p) for p in keep} == before
    return line


# --------------------------------------------------------------------------------------------------
# Model files that are not (usable) ONNX


def _zip_bytes(tmp_path: Path) -> bytes:
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("model.onnx", b"not really")
    data = archive.read_bytes()
    archive.unlink()
    return data


@pytest.mark.parametrize("kind", ["truncated_head", "truncated_half", "truncated_tail", "corrupt", "text",
                                  "png", "empty", "zip"])
@pytest.mark.parametrize("command", ["optimize", "validate", "inspect"])
def test_not_an_onnx_model(capsys, tmp_path, mlp_path, kind, command):
    data = mlp_path.read_bytes()
    content = {
        "truncated_head": data[:7],
        "truncated_half": data[: len(data) // 2],
        "truncated_tail": data[:-3],
        "corrupt": b"\xff" * 16 + data[16:],
        "text": b"this is not an ONNX model\njust some text\n",
        "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
        "empty": b"",
        "zip": _zip_bytes(tmp_path),
    }[kind]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    argv = {"optimize": ["optimize", bad, "-o", tmp_path / "out.onnx", *FAST],
            "validate": ["validate", bad, mlp_path, *FAST],
            "inspect": ["inspect", bad]}[command]
    line = _refused(capsys, argv, "bad.onnx", folder=tmp_path, keep=(bad, mlp_path))
    assert ("is empty" if kind == "empty" else "not a valid ONNX model") in line


def _stamped(tmp_path: Path, build_mlp, *, ir_version: int | None = None, opset: int | None = None) -> Path:
    model = build_mlp()
    if ir_version is not None:
        model.ir_version = ir_version
    if opset is not None:
        model.opset_import[0].version = opset
        model.ir_version = 10
    path = tmp_path / "stamped.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("command", ["optimize", "validate", "inspect"])
def test_ir_version_newer_than_onnx(capsys, tmp_path, build_mlp, mlp_path, command):
    path = _stamped(tmp_path, build_mlp, ir_version=onnx.IR_VERSION + 1)
    argv = {"optimize": ["optimize", path, "-o", tmp_path / "out.onnx", *FAST],
            "validate": ["validate", path, mlp_path, *FAST], "inspect": ["inspect", path]}[command]
    _refused(capsys, argv, "stamped.onnx", f"IR version {onnx.IR_VERSION + 1}", f"up to {onnx.IR_VERSION}",
             folder=tmp_path, keep=(path,))


def test_opset_newer_than_onnx(capsys, tmp_path, build_mlp):
    newest = onnx.defs.onnx_opset_version()
    path = _stamped(tmp_path, build_mlp, opset=newest + 1)
    _refused(capsys, ["optimize", path, "-o", tmp_path / "out.onnx", *FAST], f"opset {newest + 1}",
             f"up to {newest}", folder=tmp_path, keep=(path,))


def test_opset_onnx_runtime_cannot_run(capsys, tmp_path, build_mlp, monkeypatch):
    """onnx could take the opset (simulated: a newer onnx), ONNX Runtime cannot: refused before any rewrite."""
    newest = onnx.defs.onnx_opset_version()
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: newest + 5)
    monkeypatch.setattr(Factorizer, "build", _must_not_run)
    path = _stamped(tmp_path, build_mlp, opset=newest + 1)
    _refused(capsys, ["optimize", path, "-o", tmp_path / "out.onnx", *FAST], "cannot run in ONNX Runtime",
             f"Opset {newest + 1}", folder=tmp_path, keep=(path,))


def _must_not_run(*args, **kwargs):
    raise AssertionError("the model was rewritten although its original is unusable")


# --------------------------------------------------------------------------------------------------
# External data


def _set_location(model_path: Path, location: str) -> None:
    model = onnx.load_model(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("case", ["missing", "parent_parent", "absolute", "symlink_file", "symlink_folder"])
def test_external_data_via_cli(capsys, tmp_path, tiny_mlp_external, case):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    path = tiny_mlp_external(work / "ext.onnx")
    data = work / "ext.onnx.data"
    outside = tmp_path / "outside"
    outside.mkdir()
    if case == "missing":
        data.unlink()
        needle = "missing"
    elif case == "parent_parent":
        data.rename(tmp_path / "ext.onnx.data")
        _set_location(path, "../../ext.onnx.data")
        needle = "leaves the model's folder"
    elif case == "absolute":
        data.rename(outside / "ext.onnx.data")
        _set_location(path, str(outside / "ext.onnx.data"))
        needle = "absolute path"
    elif case == "symlink_file":
        data.rename(outside / "ext.onnx.data")
        data.symlink_to(outside / "ext.onnx.data")
        needle = "resolves outside"
    else:
        data.rename(outside / "ext.onnx.data")
        (work / "weights").symlink_to(outside, target_is_directory=True)
        _set_location(path, "weights/ext.onnx.data")
        needle = "resolves outside"
    _refused(capsys, ["optimize", path, "-o", work / "out.onnx", *FAST], needle, folder=tmp_path, keep=(path,))


# --------------------------------------------------------------------------------------------------
# Calibration data (--calib: an .npz, a folder of .npz, a folder of .npy) and its errors


def _xs(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)


def _bad_arrays(case: str) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Arrays for one bad calibration case and the words its error must hold."""
    x = _xs()
    if case == "missing":
        return {"inputs": x}, ("no array for model input 'x'",)
    if case == "extra":
        return {"x": x, "labels": np.zeros(6, np.int64)}, ("'labels'", "not a model input")
    if case == "dtype":
        return {"x": x.astype(np.float64)}, ("'x'", "float64", "float32")
    if case == "width":
        return {"x": x[:, :16].copy()}, ("'x'", "axis 1", "32")
    if case == "rank":
        return {"x": x[:, :, None].copy()}, ("'x'", "rank 2")
    if case == "nan":
        x[1, 3] = x[2, 5] = np.nan
        x[4, 0] = np.inf
        return {"x": x}, ("'x'", "NaN", "3 of", "2 NaN, 1 Inf")
    if case == "inf":
        x[0, 0] = -np.inf
        return {"x": x}, ("'x'", "1 of", "0 NaN, 1 Inf")
    raise ValueError(case)


CALIB_CASES = ["missing", "extra", "dtype", "width", "rank", "nan", "inf"]


@pytest.mark.parametrize("layout", ["npz", "npz_folder", "npy_folder"])
@pytest.mark.parametrize("case", CALIB_CASES)
def test_bad_calibration_data(capsys, tmp_path, mlp_path, layout, case):
    arrays, needles = _bad_arrays(case)
    if layout == "npz":
        calib = tmp_path / "calib.npz"
        np.savez(calib, **arrays)
    elif layout == "npz_folder":
        calib = tmp_path / "calib"
        calib.mkdir()
        np.savez(calib / "batch_000.npz", x=_xs(4, seed=1))  # a good file first: the bad one is named
        np.savez(calib / "batch_001.npz", **arrays)
        needles = (*needles, "batch_001.npz")
    else:
        calib = tmp_path / "calib"
        calib.mkdir()
        for name, value in arrays.items():
            np.save(calib / f"{name}.npy", value)
    _refused(capsys, ["optimize", mlp_path, "-o", tmp_path / "out.onnx", "--calib", calib, *FAST], *needles,
             folder=tmp_path, keep=(mlp_path,))


def test_nan_in_inputs_is_counted(capsys, tmp_path, mlp_path):
    """--inputs: the error names the input and how many values are not finite."""
    arrays, needles = _bad_arrays("nan")
    np.savez(tmp_path / "in.npz", **arrays)
    _refused(capsys, ["optimize", mlp_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "in.npz", *FAST],
             *needles, "of 192 values", folder=tmp_path, keep=(mlp_path,))


class _Payload:
    """Unpickling this would create the marker file: the proof that no pickle is ever loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _object_array(marker: Path) -> np.ndarray:
    array = np.empty((6, 32), dtype=object)
    array[:] = 0.0
    array[0, 0] = _Payload(marker)
    return array


def test_pickle_payload_works_when_unpickled(tmp_path):
    """Control for the tests below: loading the payload with pickles allowed does create the marker."""
    marker = tmp_path / "marker"
    np.save(tmp_path / "x.npy", _object_array(marker), allow_pickle=True)
    np.load(tmp_path / "x.npy", allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("option", ["--inputs", "--calib", "--calib npz_folder", "--calib npy_folder"])
def test_object_arrays_are_never_unpickled(capsys, tmp_path, mlp_path, option):
    marker = tmp_path.parent / f"{tmp_path.name}.marker"  # outside the folder the helper watches
    array = _object_array(marker)
    if option.endswith("npz_folder"):
        source = tmp_path / "calib"
        source.mkdir()
        np.savez(source / "batch_000.npz", x=array)
    elif option.endswith("npy_folder"):
        source = tmp_path / "calib"
        source.mkdir()
        np.save(source / "x.npy", array, allow_pickle=True)
    else:
        source = tmp_path / "data.npz"
        np.savez(source, x=array)  # savez pickles object arrays
    _refused(capsys, ["optimize", mlp_path, "-o", tmp_path / "out.onnx", option.split()[0], source, *FAST],
             "object array", folder=tmp_path, keep=(mlp_path,))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Output paths


def test_output_is_a_symlink_to_the_input(capsys, tmp_path, mlp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(mlp_path)
    _refused(capsys, ["optimize", mlp_path, "-o", link, *FAST], "is the input model", folder=tmp_path,
             keep=(mlp_path,))
    assert link.is_symlink()


def test_output_is_a_hard_link_to_the_input(capsys, tmp_path, mlp_path):
    link = tmp_path / "hard.onnx"
    os.link(mlp_path, link)
    _refused(capsys, ["optimize", mlp_path, "-o", link, *FAST], "is the input model", folder=tmp_path,
             keep=(mlp_path,))


def test_output_input_spelled_with_dot_dot(capsys, tmp_path, mlp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    model = tmp_path / "a" / "m.onnx"
    model.write_bytes(mlp_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["optimize", "a/m.onnx", "-o", "./a/../a/m.onnx", *FAST], "is the input model",
             folder=tmp_path, keep=(model,))


def test_read_only_output_folder_by_permissions(capsys, tmp_path, mlp_path, monkeypatch):
    """What a non-root user sees in a chmod'ed folder (tests run as root, so os.access is simulated)."""
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out_dir else real_access(p, mode, **kw))
    monkeypatch.setattr(Factorizer, "build", _must_not_run)  # refused before the slow work
    _refused(capsys, ["optimize", mlp_path, "-o", out_dir / "out.onnx", *FAST], "not writable",
             folder=tmp_path, keep=(mlp_path,))


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "not writable"), (errno.EACCES, "not writable"),
                                          (errno.ENOSPC, "no space left")])
def test_output_folder_refuses_new_files(capsys, tmp_path, mlp_path, monkeypatch, code, needle):
    """A read-only file system, a permission denial root does not bypass, or a full disk: found by the
    probe before the slow work."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(Factorizer, "build", _must_not_run)
    _refused(capsys, ["optimize", mlp_path, "-o", tmp_path / "out.onnx", *FAST], needle, folder=tmp_path,
             keep=(mlp_path,))


@pytest.mark.parametrize("external", [False, True])
def test_disk_full_while_writing_leaves_nothing(capsys, tmp_path, mlp_path, monkeypatch, external):
    """The disk fills up half-way through the model: one line, no partial output, no temporary folder."""
    real_save = onnx.save_model

    def save_half_then_fail(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx, "save_model", save_half_then_fail)
    argv = ["optimize", mlp_path, "-o", tmp_path / "out.onnx", *FAST] + (["--external-data"] if external else [])
    _refused(capsys, argv, "no space left", "out.onnx not written", folder=tmp_path, keep=(mlp_path,))


def test_disk_full_while_writing_the_report(capsys, tmp_path, mlp_path, monkeypatch):
    """The report is written after the model: the model stays, the report leaves no temporary file."""
    real_write_text = Path.write_text

    def fail_on_report(self, *args, **kwargs):
        if self.name.startswith(".r.json"):
            real_write_text(self, "{\"partial", encoding="utf-8")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_report)
    code = main([str(a) for a in ["optimize", mlp_path, "-o", tmp_path / "out.onnx", "--report",
                                  tmp_path / "r.json", *FAST]])
    out, err = capsys.readouterr()
    assert code == 2 and len(message_lines(err)) == 1 and "no space left" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.onnx"]


def test_html_report_in_missing_folder(capsys, tmp_path, mlp_path):
    _refused(capsys, ["optimize", mlp_path, "-o", tmp_path / "out.onnx", "--html", tmp_path / "no" / "r.html",
                      *FAST], "cannot write the HTML report", folder=tmp_path, keep=(mlp_path,))


# --------------------------------------------------------------------------------------------------
# An original that is already broken on the inputs


def _nan_model(path: Path, build_mlp) -> Path:
    """The MLP with Sqrt on its output: NaN wherever the MLP's output is negative."""
    model = build_mlp()
    model.graph.node[-1].output[0] = "pre_sqrt"
    model.graph.node.append(helper.make_node("Sqrt", ["pre_sqrt"], ["y"], name="broken_sqrt"))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("with_inputs", [False, True])
def test_original_with_nan_outputs_is_refused_before_rewriting(capsys, tmp_path, build_mlp, monkeypatch,
                                                               with_inputs):
    path = _nan_model(tmp_path / "broken.onnx", build_mlp)
    monkeypatch.setattr(Factorizer, "build", _must_not_run)
    extra = []
    if with_inputs:
        np.savez(tmp_path / "in.npz", x=_xs(20))
        extra = ["--inputs", tmp_path / "in.npz", "--batch-size", "8"]
    line = _refused(capsys, ["optimize", path, "-o", tmp_path / "out.onnx", *extra, *FAST],
                    "original model produces NaN/Inf in output 'y'", folder=tmp_path, keep=(path,))
    assert ("in.npz" if with_inputs else "synthetic inputs") in line
    if with_inputs:
        assert "of 192 values" in line  # the first batch (8 of 20 rows): checked in seconds, before any work


def test_validate_against_an_original_with_nan_outputs(capsys, tmp_path, build_mlp, mlp_path):
    path = _nan_model(tmp_path / "broken.onnx", build_mlp)
    _refused(capsys, ["validate", path, mlp_path, *FAST], "original model produces NaN/Inf in output 'y'",
             folder=tmp_path, keep=(path, mlp_path))


def test_nan_model_may_still_be_compressed_without_validation(capsys, tmp_path, build_mlp):
    """--no-validate makes no claim about outputs, so nothing is run and the model is written."""
    path = _nan_model(tmp_path / "broken.onnx", build_mlp)
    assert main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--no-validate"]) == 0
    assert (tmp_path / "out.onnx").is_file()


def test_output_over_the_inputs_external_data_is_refused(capsys, tmp_path, tiny_mlp_external):
    """``-o ext.onnx.data`` (the input's weights) or an output whose own .data file is the input's."""
    from onnxlr.cli import main

    src = tiny_mlp_external(tmp_path / "ext.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ext.onnx.data").symlink_to(tmp_path / "ext.onnx.data")
    for out in (tmp_path / "ext.onnx.data", tmp_path / "other" / "ext.onnx"):
        assert main(["optimize", str(src), "-o", str(out), "--rank-ratio", "0.5", "--external-data"]) == 2
        err = message_lines(capsys.readouterr().err)
        assert len(err) == 1 and "would overwrite the input's external data ext.onnx.data" in err[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
