"""The onnxlr command line, run in-process through onnxlr.cli.main (plus one subprocess for --help).

Exit codes: 0 success, 1 tolerance failed (nothing written), 2 user error (one line on stderr).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import message_lines, user_error_line
from onnx import TensorProto, helper, numpy_helper

from onnxlr.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--repeats", "2"]  # keep latency measurement short


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _usage_error(capsys, argv, *needles, folder: Path | None = None, output: Path | None = None) -> str:
    """Run the CLI and check it failed as a user error: exit 2, one stderr line naming the problem,
    no traceback, no output (and no temporary file) written."""
    before = sorted(p.name for p in folder.iterdir()) if folder else None
    line = user_error_line(capsys, argv)
    for needle in needles:
        assert needle in line, (needle, line)
    if output is not None:
        assert not Path(output).exists()
    if folder is not None:
        assert sorted(p.name for p in folder.iterdir()) == before
    return line


@pytest.fixture
def out_path(tmp_path) -> Path:
    return tmp_path / "out.onnx"


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------------
# Help and argument parsing


def test_help_in_subprocess():
    python = REPO / ".venv" / "bin" / "python"
    result = subprocess.run([str(python if python.exists() else sys.executable), "-m", "onnxlr", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("optimize", "validate", "inspect"):
        assert command in result.stdout
    assert "Traceback" not in result.stderr


def test_help_states_each_commands_own_default_recipe(capsys):
    """The demo runs int8 (its own default), optimize lowrank: each --help says its own."""
    for command, default in (("demo", "int8"), ("optimize", "lowrank")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"which passes run (default {default};" in text, command


def test_no_command(capsys):
    _usage_error(capsys, [], "required")


def test_unknown_command(capsys):
    _usage_error(capsys, ["shrink", "m.onnx"], "shrink")


def test_optimize_requires_output(capsys, mlp_path):
    _usage_error(capsys, ["optimize", mlp_path], "-o/--output")


def test_unknown_option(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--rank-ratoi", "0.5"], "--rank-ratoi",
                 folder=tmp_path)


# --------------------------------------------------------------------------------------------------
# Error paths: model files


def test_missing_model_file(capsys, tmp_path, out_path):
    _usage_error(capsys, ["optimize", tmp_path / "missing.onnx", "-o", out_path], "not found", "missing.onnx",
                 output=out_path)


def test_not_an_onnx_file(capsys, tmp_path, out_path):
    text = tmp_path / "readme.onnx"
    text.write_text("hello, I am not a model\n")
    _usage_error(capsys, ["optimize", text, "-o", out_path], "readme.onnx", "not a valid ONNX model",
                 folder=tmp_path)


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_other_commands_with_missing_model(capsys, tmp_path, mlp_path, command):
    args = [command, tmp_path / "gone.onnx"] + ([mlp_path] if command == "validate" else [])
    _usage_error(capsys, args, "gone.onnx", folder=tmp_path)


def test_external_data_outside_folder_via_cli(capsys, tmp_path, tiny_mlp_external, out_path):
    path = tiny_mlp_external(tmp_path / "ext.onnx")
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../ext.onnx.data"
    path.write_bytes(model.SerializeToString())
    _usage_error(capsys, ["optimize", path, "-o", out_path], "leaves the model's folder", folder=tmp_path)


def test_output_equal_to_input(capsys, mlp_path, tmp_path):
    before = _sha256(mlp_path)
    _usage_error(capsys, ["optimize", mlp_path, "-o", mlp_path], "is the input model", folder=tmp_path)
    assert _sha256(mlp_path) == before


def test_output_equal_to_input_spelled_differently(capsys, mlp_path, tmp_path):
    (tmp_path / "sub").mkdir()
    before = _sha256(mlp_path)
    other_spelling = tmp_path / "sub" / ".." / mlp_path.name
    _usage_error(capsys, ["optimize", mlp_path, "-o", other_spelling], "is the input model", folder=tmp_path)
    assert _sha256(mlp_path) == before


def test_output_folder_missing(capsys, mlp_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", tmp_path / "nowhere" / "o.onnx", *FAST],
                 "output folder does not exist", folder=tmp_path)


# --------------------------------------------------------------------------------------------------
# Error paths: providers and dims


def test_unknown_provider(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--providers", "foo"], "unknown provider", "'foo'",
                 folder=tmp_path)


def test_unknown_provider_in_list_for_validate(capsys, mlp_path, tmp_path):
    _usage_error(capsys, ["validate", mlp_path, mlp_path, "--providers", "cpu,gpu9"], "unknown provider", "gpu9")


def test_empty_provider_list(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--providers", ","], "no provider",
                 folder=tmp_path)


@pytest.mark.parametrize("dim", ["batch", "batch=x", "batch=0", "=4", "batch=-1", "batch=1.5"])
def test_malformed_dim(capsys, mlp_path, out_path, tmp_path, dim):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, f"--dim={dim}"], "malformed --dim", repr(dim),
                 folder=tmp_path)


def test_malformed_dim_for_inspect(capsys, mlp_path):
    _usage_error(capsys, ["inspect", mlp_path, "--dim", "batch"], "malformed --dim")


@pytest.mark.parametrize("option", ["--threads", "--batch-size", "--repeats"])
def test_non_positive_counts(capsys, mlp_path, out_path, tmp_path, option):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, option, "0"], option, "at least 1",
                 folder=tmp_path)


# --------------------------------------------------------------------------------------------------
# Error paths: --inputs .npz


def test_npz_missing_input(capsys, mlp_path, out_path, tmp_path, sample_x):
    npz = _npz(tmp_path / "in.npz", inputs=sample_x())
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "no array for model input 'x'",
                 folder=tmp_path)


def test_npz_wrong_dtype(capsys, mlp_path, out_path, tmp_path, sample_x):
    npz = _npz(tmp_path / "in.npz", x=sample_x().astype(np.float64))
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "'x'", "float64", "float32",
                 folder=tmp_path)


def test_npz_extra_array(capsys, mlp_path, out_path, tmp_path, sample_x):
    npz = _npz(tmp_path / "in.npz", x=sample_x(), labels=np.zeros(4, dtype=np.int64))
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "'labels'", "not a model input",
                 folder=tmp_path)


def test_npz_nan(capsys, mlp_path, out_path, tmp_path, sample_x):
    x = sample_x()
    x[1, 3] = np.nan
    npz = _npz(tmp_path / "in.npz", x=x)
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "'x'", "NaN",
                 folder=tmp_path)


def test_npz_inf_for_validate(capsys, mlp_path, tmp_path, sample_x):
    x = sample_x()
    x[0, 0] = np.inf
    npz = _npz(tmp_path / "in.npz", x=x)
    _usage_error(capsys, ["validate", mlp_path, mlp_path, "--inputs", npz], "Inf", folder=tmp_path)


def test_npz_object_array(capsys, mlp_path, out_path, tmp_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.array([{"payload": 1}, None], dtype=object))  # pickled on save
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "object arrays",
                 folder=tmp_path)


def test_npz_wrong_width(capsys, mlp_path, out_path, tmp_path):
    npz = _npz(tmp_path / "in.npz", x=np.zeros((4, 16), dtype=np.float32))
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "axis 1", "32",
                 folder=tmp_path)


def test_npz_wrong_rank(capsys, mlp_path, out_path, tmp_path):
    npz = _npz(tmp_path / "in.npz", x=np.zeros((32,), dtype=np.float32))
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", npz], "rank 2", folder=tmp_path)


def test_npz_not_a_zip(capsys, mlp_path, out_path, tmp_path):
    bad = tmp_path / "in.npz"
    bad.write_text("not a zip file")
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", bad], str(bad), folder=tmp_path)


def test_npz_text_file_is_not_called_a_pickle(capsys, mlp_path, out_path, tmp_path):
    bad = tmp_path / "in.npz"
    bad.write_text("not a zip file")
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", bad], "is not an .npz file",
                 folder=tmp_path)


def test_npz_missing_file(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--inputs", tmp_path / "none.npz"],
                 "input file not found", "none.npz", folder=tmp_path)


# --------------------------------------------------------------------------------------------------
# Error paths: rank rules and tolerance


@pytest.mark.parametrize("rank", ["fc1", "fc1=", "fc1=x", "=3", "fc1=-2", "fc1=1.5"])
def test_malformed_rank(capsys, mlp_path, out_path, tmp_path, rank):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, f"--rank={rank}"], "malformed --rank",
                 repr(rank), folder=tmp_path)


def test_rank_zero_keeps_a_layer_dense(capsys, mlp_path, out_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--rank", "fc1=0", "--rank", "fc2=4", *FAST]) == 0
    out = capsys.readouterr().out
    assert "kept dense by the rank allocation (rank 0)" in out and "[fc1]" in out
    assert [n.op_type for n in onnx.load(out_path).graph.node].count("MatMul") == 1


def test_rank_naming_no_layer(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--rank", "fc3=4"], "no factorizable", "'fc3'",
                 folder=tmp_path)


def test_rank_above_min_dimension(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--rank", "fc1=40"], "rank 40", "'fc1'",
                 folder=tmp_path)


@pytest.mark.parametrize("spec,needle", [
    ("abc", "malformed --max-error"),
    ("rel_l2=abc", "malformed --max-error"),
    ("rel_l2=-1", "non-negative"),
    ("nan", "finite"),
    ("inf", "finite"),
    ("foo=0.1", "unknown --max-error metric 'foo'"),
    ("l2=0.1", "unknown --max-error metric 'l2'"),
])
def test_bad_max_error(capsys, mlp_path, out_path, tmp_path, spec, needle):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, f"--max-error={spec}"], needle, folder=tmp_path)


def test_bad_max_error_for_validate(capsys, mlp_path):
    _usage_error(capsys, ["validate", mlp_path, mlp_path, "--max-error", "speed=2"], "unknown --max-error metric")


def test_rank_ratio_and_energy_together(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--rank-ratio", "0.5", "--energy", "0.9"],
                 "not allowed with", folder=tmp_path)


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.5", "nan"])
def test_rank_ratio_out_of_range(capsys, mlp_path, out_path, tmp_path, ratio):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, f"--rank-ratio={ratio}"], "rank ratio",
                 "(0, 1]", folder=tmp_path)


@pytest.mark.parametrize("energy", ["0", "1.01"])
def test_energy_out_of_range(capsys, mlp_path, out_path, tmp_path, energy):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, f"--energy={energy}"], "energy", "(0, 1]",
                 folder=tmp_path)


def test_rank_ratio_not_a_number(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--rank-ratio", "half"], "--rank-ratio",
                 "expected a number", folder=tmp_path)


# --------------------------------------------------------------------------------------------------
# Success paths


def test_optimize_writes_checked_runnable_model(capsys, mlp_path, out_path, ort_run, sample_x):
    code = main(["optimize", str(mlp_path), "-o", str(out_path), "--rank-ratio", "0.5", *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert message_lines(err) == [], err
    assert any(line.startswith("[onnxlr] ") for line in err.splitlines()), "no progress lines"
    onnx.checker.check_model(str(out_path), full_check=True)
    x = sample_x(8)
    (ref,), (got,) = ort_run(mlp_path, {"x": x}), ort_run(out_path, {"x": x})
    assert got.shape == ref.shape == (8, 24)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2
    assert not np.allclose(got, ref, atol=1e-7)  # the rank really was cut
    lines = out.splitlines()
    assert lines[0].startswith("params  2,760 -> 2,216")
    assert lines[1].startswith("bytes ")
    assert "fc1" in out and "rank 16" in out and "fc2" in out and "rank 12" in out
    assert "latency" in out and "speed-up" in out and "cosine" in out
    assert lines[-1] == f"wrote {out_path}"
    # factors replaced the dense weights
    names = {t.name for t in onnx.load(str(out_path)).graph.initializer}
    assert "W1" not in names and {"W1/lr_A", "W1/lr_B"} <= names


def test_optimize_report_json(capsys, mlp_path, out_path, tmp_path):
    report = tmp_path / "r.json"
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--rank-ratio", "0.5", "--report", str(report),
                 *FAST]) == 0
    data = json.loads(report.read_text())
    assert {"original", "optimized", "passes", "validation"} <= set(data)
    assert data["original"]["params"] == 2760 and data["optimized"]["params"] == 2216
    assert data["optimized"]["path"] == str(out_path)
    assert data["written"] is True
    (record,) = data["passes"]
    assert record["name"] == "factorize_matmul" and record["config"]["rank_ratio"] == 0.5
    assert {layer["node"] for layer in record["layers"]} == {"fc1", "fc2"}
    (provider,) = data["validation"]["providers"]
    assert provider["provider"] == "CPUExecutionProvider" and provider["available"] is True
    assert provider["outputs"][0]["name"] == "y" and 0 < provider["outputs"][0]["rel_l2"] < 0.2
    assert provider["speedup"] > 0


def test_optimize_with_npz_inputs(capsys, mlp_path, out_path, tmp_path, sample_x):
    npz = _npz(tmp_path / "in.npz", x=sample_x(20))
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--inputs", str(npz), "--batch-size", "8",
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert f"validation on {npz} (20 samples)" in out
    assert out_path.is_file()


def test_optimize_with_dim(capsys, mlp_path, out_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--dim", "batch=3", *FAST]) == 0
    out = capsys.readouterr().out
    assert "synthetic inputs (batch=3)" in out
    assert "{'x': [3, 32]}" in out


def test_optimize_energy_and_rank_override(capsys, mlp_path, out_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--energy", "0.9", "--rank", "fc2=3",
                 "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "validation on" not in out
    fc1 = next(line for line in out.splitlines() if line.strip().startswith("fc1"))
    fc2 = next(line for line in out.splitlines() if line.strip().startswith("fc2"))
    assert "rank 6 " in fc1  # 0.9 of the spectrum (see inspect's rank_for_energy)
    assert "rank 3 " in fc2


def test_optimize_external_data_flag(capsys, mlp_path, out_path, tmp_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--external-data", "--no-validate"]) == 0
    assert (tmp_path / "out.onnx.data").is_file()
    onnx.checker.check_model(str(out_path))


def test_max_error_fails_on_lossy_rank(capsys, mlp_path, out_path, tmp_path):
    report = tmp_path / "r.json"
    code = main(["optimize", str(mlp_path), "-o", str(out_path), "--rank-ratio", "0.5", "--max-error", "1e-9",
                 "--report", str(report), *FAST])
    out, err = capsys.readouterr()
    assert code == 1
    assert not out_path.exists()
    # the model is not written; the report is, and says so
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "r.json"]
    saved = json.loads(report.read_text())
    assert saved["passed"] is False and saved["written"] is False
    assert "FAILED" in out
    assert "fails the tolerance" in err and "not written" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["--rank-ratio", "0.5", "--max-error", "0.5"],
    ["--rank-ratio", "0.5", "--max-error", "cosine=0.9"],
    ["--rank-ratio", "0.5", "--max-error", "max_abs=1"],
    ["--rank-ratio", "1.0", "--force", "--max-error", "1e-4"],
])
def test_max_error_passes(capsys, mlp_path, out_path, args):
    code = main(["optimize", str(mlp_path), "-o", str(out_path), *args, *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "PASSED" in out
    assert out_path.is_file()


def test_full_rank_without_force_is_skipped(capsys, mlp_path, out_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--rank-ratio", "1.0", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "0 rewritten, 2 skipped" in out
    assert "would not save parameters" in out


def test_unavailable_known_provider_does_not_fail(capsys, mlp_path, out_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    code = main(["optimize", str(mlp_path), "-o", str(out_path), "--providers", "cpu,cuda", "--max-error", "0.5",
                 *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "CUDAExecutionProvider: not run" in out
    assert "not in this onnxruntime build" in out and "onnxruntime-gpu" in out
    assert "CPUExecutionProvider: latency" in out
    assert out_path.is_file()


def test_validate_prints_per_output_cosine(capsys, tmp_path, mlp_path, out_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--no-validate"]) == 0
    capsys.readouterr()
    code = main(["validate", str(mlp_path), str(out_path), "--report", str(tmp_path / "v.json"), *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("output y:")]
    cosine = float(line.split("cosine ")[1].split()[0])
    assert 0.9 < cosine < 1.0
    assert "speed-up" in out
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["passes"] == [] and data["validation"]["providers"][0]["outputs"][0]["name"] == "y"


def test_validate_identical_models(capsys, mlp_path):
    assert main(["validate", str(mlp_path), str(mlp_path), "--max-error", "max_abs=0", *FAST]) == 0
    out = capsys.readouterr().out
    assert "max abs 0," in out and "rel L2 0," in out and "PASSED" in out


def test_validate_tolerance_failure_exit_1(capsys, mlp_path, out_path):
    assert main(["optimize", str(mlp_path), "-o", str(out_path), "--no-validate"]) == 0
    capsys.readouterr()
    assert main(["validate", str(mlp_path), str(out_path), "--max-error", "1e-9", *FAST]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_inspect_table(capsys, mlp_path):
    assert main(["inspect", str(mlp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"fc1", "fc2"}
    assert rows["fc1"][1:4] == ["MatMul", "32x48", "1,536"] and rows["fc1"][5] == "19.2"
    assert rows["fc2"][1:4] == ["Gemm", "48x24", "1,152"] and rows["fc2"][5] == "16.0"
    assert rows["fc1"][4] == "1,536"  # symbolic batch: one sample
    assert "break-even" in out.splitlines()[0] and "r@90%" in out.splitlines()[0]
    main(["inspect", str(mlp_path), "--json"])
    spectra = {layer["node"]: layer["rank_for_energy"] for layer in json.loads(capsys.readouterr().out)}
    for name, row in rows.items():  # the ranks reaching 90% and 99% of the energy, as the JSON has them
        assert [int(row[6]), int(row[7])] == [spectra[name]["0.9"], spectra[name]["0.99"]]


def test_inspect_json(capsys, mlp_path):
    assert main(["inspect", str(mlp_path), "--json", "--dim", "batch=4"]) == 0
    layers = json.loads(capsys.readouterr().out)
    by_node = {layer["node"]: layer for layer in layers}
    assert set(by_node) == {"fc1", "fc2"}
    fc1, fc2 = by_node["fc1"], by_node["fc2"]
    assert fc1["op"] == "MatMul" and fc1["weight"] == "W1" and fc1["shape"] == [32, 48]
    assert fc2["op"] == "Gemm" and fc2["weight"] == "W2" and fc2["shape"] == [48, 24]  # transB undone
    assert fc1["params"] == fc1["macs_per_row"] == 1536 and fc1["macs"] == 4 * 1536
    assert fc1["break_even_rank"] == 19.2 and fc2["break_even_rank"] == 16.0
    assert fc1["factorizable"] is True and fc1["reason"] == ""
    energies = list(fc1["energy_at_rank"].values())
    assert energies == sorted(energies) and 0 < energies[0] < energies[-1] <= 1
    assert set(fc1["rank_for_energy"]) == {"0.9", "0.99"}
    assert fc1["rank_for_energy"]["0.9"] <= fc1["rank_for_energy"]["0.99"]


def test_inspect_reports_non_factorizable_layer(capsys, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="dyn")], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert main(["inspect", str(path)]) == 0
    assert "not factorizable: weight is not a constant" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    (layer,) = json.loads(capsys.readouterr().out)
    assert layer["node"] == "dyn" and layer["factorizable"] is False and "not a constant" in layer["reason"]


# --------------------------------------------------------------------------------------------------
# Regression tests for bugs found while these tests were written


def test_report_in_missing_folder_is_a_user_error(capsys, mlp_path, out_path, tmp_path):
    _usage_error(capsys, ["optimize", mlp_path, "-o", out_path, "--report", tmp_path / "no" / "r.json", *FAST],
                 "cannot write the report", output=out_path)


def test_validate_models_with_different_outputs_is_a_user_error(capsys, tmp_path, mlp_proto, mlp_path):
    renamed = onnx.ModelProto()
    renamed.CopyFrom(mlp_proto)
    renamed.graph.node[-1].output[0] = "z"
    renamed.graph.output[0].name = "z"
    other = tmp_path / "z.onnx"
    onnx.save(renamed, str(other))
    _usage_error(capsys, ["validate", mlp_path, other, *FAST], "'y'")


def test_no_validate_with_max_error_is_consistent(capsys, mlp_path, out_path):
    code = main(["optimize", str(mlp_path), "-o", str(out_path), "--no-validate", "--max-error", "1e-12"])
    out = capsys.readouterr().out
    assert not (code == 0 and "FAILED" in out), out


def test_external_data_flag_on_small_model(capsys, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")],
    )
    src = tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--rank", "mm=2", "--external-data", "--no-validate"]) == 0
    assert out.is_file()


def test_validate_models_with_different_output_shapes_is_a_user_error(capsys, tmp_path, mlp_proto, mlp_path):
    narrow = onnx.ModelProto()
    narrow.CopyFrom(mlp_proto)
    for tensor in narrow.graph.initializer:
        if tensor.name in ("W2", "b2"):
            shape = (16, 48) if tensor.name == "W2" else (16,)
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(shape, np.float32), tensor.name))
    narrow.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 16
    other = tmp_path / "narrow.onnx"
    onnx.save(narrow, str(other))
    _usage_error(capsys, ["validate", mlp_path, other, *FAST], "'y'")


def test_a_bug_in_a_pass_exits_3_with_one_line_and_the_traceback_in_a_file(capsys, mlp_path, out_path, monkeypatch):
    """An unexpected exception inside a pass is onnxlr's bug, not a tolerance failure (exit 1) nor a user
    error (exit 2): exit 3, one stderr line saying so and naming a file that holds the traceback;
    ``--debug`` shows the traceback too. Nothing is written."""
    from onnxlr.passes.factorize_matmul import FactorizeMatMul

    def broken(self, graph):
        raise ZeroDivisionError("deliberately failing pass")

    monkeypatch.setattr(FactorizeMatMul, "run", broken)
    argv = ["optimize", str(mlp_path), "-o", str(out_path), "--rank-ratio", "0.5", *FAST]
    assert main(argv) == 3
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("onnxlr: internal error, a bug in onnxlr"), lines
    assert "ZeroDivisionError: deliberately failing pass" in lines[0]
    saved = Path(lines[0].rsplit("the traceback is in ", 1)[1])
    assert "in broken" in saved.read_text() and "Traceback" in saved.read_text()
    saved.unlink()
    assert not out_path.exists()
    assert main([*argv, "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    Path(message_lines(err)[-1].rsplit("the traceback is in ", 1)[1]).unlink()
