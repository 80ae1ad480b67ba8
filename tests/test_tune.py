"""``onnxlr tune`` (issue #23): the search, its cache, the manifest, the evaluator hook and the config file,
through the command line, on the digits classifier skl2onnx exported (tests/fixtures/converters)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import message_lines

from onnxlr import cli
from onnxlr.planning import tune as tune_module

FIXTURES = Path(__file__).parent / "fixtures" / "converters"
SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "tune.schema.json").read_text())
FEW = "int8,int4,lowrank params=0.5,lowrank params=0.75,lowrank params=0.9"
ARM64_PYTHON = os.environ.get("ONNXLR_ARM64_PYTHON")


@pytest.fixture
def workdir(tmp_path):
    """The digits model, calibration rows, held-out rows with their labels, and an accuracy evaluator."""
    shutil.copy(FIXTURES / "skl_mlp_raw.onnx", tmp_path / "model.onnx")
    with np.load(FIXTURES / "digits.npz") as digits:
        X, y = digits["X"].astype(np.float32), digits["y"]
    np.savez(tmp_path / "calib.npz", input=X[:512])
    np.savez(tmp_path / "heldout.npz", input=X[1400:], labels=y[1400:])
    (tmp_path / "metrics.py").write_text(
        "import numpy as np\n\n"
        "def accuracy(outputs, data):\n"
        "    return float(np.mean(outputs['label'] == data['labels']))\n")
    return tmp_path


def _tune(capsys, workdir, *extra) -> tuple[int, dict, str]:
    code = cli.main(["tune", str(workdir / "model.onnx"), "--calib", str(workdir / "calib.npz"), "--inputs",
                     str(workdir / "heldout.npz"), "-o", str(workdir / "tuned"), "-q", "--repeats", "5",
                     "--candidates", FEW, *extra])
    captured = capsys.readouterr()
    assert message_lines(captured.err) == [], captured.err
    manifest = json.loads((workdir / "tuned" / "tune.json").read_text())
    return code, manifest, captured.out


def test_a_run_picks_per_target_writes_a_valid_manifest_and_resumes_without_measuring_again(capsys, workdir):
    code, manifest, out = _tune(capsys, workdir, "--max-error", "top1=0.97")
    jsonschema.validate(manifest, SCHEMA)
    assert code in (0, 1)  # a tiny model: whether a candidate beats the original's 0.01 ms is noise
    rows = {c["name"]: c for c in manifest["candidates"]}
    assert rows["lowrank params=0.5"]["status"] == "dropped"  # 0.92 top-1 on the held-out digits
    assert "top-1 agreement (last axis) 0.9" in rows["lowrank params=0.5"]["reason"]
    assert rows["lowrank params=0.9"]["status"] == "not built"  # 0.75 already met the tolerance
    assert rows["int8"]["check"]["holds"] and rows["int8"]["bytes"] < 0.7 * (workdir / "model.onnx").stat().st_size
    [target] = manifest["targets"]
    assert target["device"] == "local" and target["provider"] == "CPUExecutionProvider"
    if target["pick"]:
        assert (workdir / "tuned" / target["pick"]["file"]).exists()
        assert target["pick"]["candidate"] in rows and rows[target["pick"]["candidate"]]["status"] == "picked"
        assert target["pick"]["candidate"] in out
    else:
        assert "as fast as the original" in target["reason"]
    assert (workdir / "tuned" / "tune.html").read_text().count("<svg") >= 1
    assert manifest["measurements_made"] == 4 + 4 + 1  # builds, held-out checks, one timing of the survivors
    # the same run again: every build, check and timing comes from the cache
    code_again, again, _ = _tune(capsys, workdir, "--max-error", "top1=0.97")
    assert again["measurements_made"] == 0 and code_again == code
    assert again["targets"] == manifest["targets"]


def test_an_interrupted_run_repeats_no_finished_measurement(capsys, workdir, monkeypatch):
    """Stopped while timing (after every build and check), the next run builds and checks nothing again."""
    built = []
    real_optimize = tune_module.optimizer.optimize

    def counting(model, options):
        built.append(options.recipe.name)
        return real_optimize(model, options)

    monkeypatch.setattr(tune_module.optimizer, "optimize", counting)

    def interrupted(self, *args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tune_module._Search, "_time_target", interrupted)
        assert cli.main(["tune", str(workdir / "model.onnx"), "--calib", str(workdir / "calib.npz"), "--inputs",
                         str(workdir / "heldout.npz"), "-o", str(workdir / "tuned"), "-q", "--candidates", FEW,
                         "--max-error", "top1=0.97"]) == 130
    first = list(built)
    assert len(first) == 4  # int8, int4, lowrank 0.5 and 0.75 (0.9 not needed)
    capsys.readouterr()
    _, manifest, _ = _tune(capsys, workdir, "--max-error", "top1=0.97")
    assert built == first  # nothing built again
    assert manifest["measurements_made"] == 1  # only the timing the interruption stopped


def test_the_evaluator_and_the_config_file(capsys, workdir):
    """A TOML file describes the run (paths relative to it); the evaluator's accuracy on the labels held
    with the inputs is the tolerance: with no drop allowed, a candidate that loses accuracy is dropped
    with its score."""
    (workdir / "tune.toml").write_text(
        'model = "model.onnx"\ncalib = "calib.npz"\ninputs = "heldout.npz"\noutput = "tuned"\n'
        'evaluator = "metrics.py:accuracy"\nmax_drop = 0.0\n'
        f'candidates = {json.dumps(FEW.split(","))}\nrepeats = 5\n')
    code = cli.main(["tune", "--config", str(workdir / "tune.toml"), "-q"])
    out = capsys.readouterr().out
    manifest = json.loads((workdir / "tuned" / "tune.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["settings"]["evaluator"] == "accuracy" and manifest["settings"]["max_drop"] == 0.0
    rows = {c["name"]: c for c in manifest["candidates"]}
    half = rows["lowrank params=0.5"]
    assert half["status"] == "dropped" and "task score" in half["reason"]
    assert half["check"]["score"] < 0.95
    assert code in (0, 1) and "candidates" in out


@pytest.mark.parametrize("argv,needle", [
    (["--max-drop", "0.1"], "tune needs a tolerance"),
    (["--evaluator", "metrics.py:accuracy"], "--evaluator needs --max-drop"),
    (["--max-error", "top1=0.9", "--evaluator", "missing.py:f", "--max-drop", "0"], "evaluator file not found"),
    (["--max-error", "top1=0.9", "--candidates", "int9"], "unknown tune candidate 'int9'"),
])
def test_bad_tune_settings_are_one_line_errors(capsys, workdir, monkeypatch, argv, needle):
    monkeypatch.chdir(workdir)
    code = cli.main(["tune", "model.onnx", "--calib", "calib.npz", "--inputs", "heldout.npz", "-o", "tuned", *argv])
    lines = message_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_a_config_file_with_an_unknown_setting_is_refused(capsys, workdir):
    (workdir / "bad.toml").write_text('model = "model.onnx"\nmax_errors = "top1=0.9"\n')
    assert cli.main(["tune", "--config", str(workdir / "bad.toml")]) == 2
    assert "unknown setting 'max_errors'" in message_lines(capsys.readouterr().err)[0]


@pytest.mark.skipif(not ARM64_PYTHON, reason="needs ONNXLR_ARM64_PYTHON (make test builds .arm64)")
def test_the_emulated_arm64_device_checks_every_candidate_and_times_none(capsys, workdir):
    code, manifest, out = _tune(capsys, workdir, "--max-error", "top1=0.97", "--device", ARM64_PYTHON)
    jsonschema.validate(manifest, SCHEMA)
    [check] = manifest["emulated_checks"]
    assert check["emulated"].startswith("qemu-aarch64") and check["samples"] == tune_module.EMULATED_SAMPLES
    assert all(t["device"] == "local" for t in manifest["targets"])  # no timing target on the emulated device
    where = f"{ARM64_PYTHON}/CPUExecutionProvider"
    checked = {c["name"]: c["targets"][where] for c in manifest["candidates"] if where in c["targets"]}
    assert checked and all(entry["median_ms"] is None for entry in checked.values())
    # the ARM kernels compute what the x86 ones do, for every candidate (int8 included)
    assert all(entry["holds"] for entry in checked.values()), checked
    assert "emulated (qemu-aarch64" in out


@pytest.mark.slow
@pytest.mark.skipif(not ARM64_PYTHON, reason="needs ONNXLR_ARM64_PYTHON (make test builds .arm64)")
def test_minilm_and_a_cnn_pick_hold_on_arm_kernels(tmp_path, minilm_path, text_paths, mnist_path, cache):
    """What tune picks on the CPU for MiniLM (the fused int8 form, docs/benchmarks.md) and for a CNN
    (the LeNet's int8 form), run on the emulated ARM64 device: the same outputs as on x86 — numerics
    only, no speed-up claimed."""
    from onnxlr import api
    from onnxlr.models import mnist, text

    calib_npz, eval_npz = text_paths
    sentences = {k: v[:4] for k, v in text.load(eval_npz).items()}
    images, _ = mnist.load_test(cache)
    for model, recipe, calib, inputs in ((minilm_path, "int8", str(calib_npz), sentences),
                                         (mnist_path, "int8-cnn", str(cache / "mnist_calib.npz"), {"image": images[:16]})):
        pick, _ = api.optimize(str(model), recipe=recipe, calib=calib, calib_samples=64, validate=False)
        path = tmp_path / f"{Path(model).stem}.{recipe}.onnx"
        api.write(pick, path, source=model)
        report = api.validate(str(model), str(path), devices=[ARM64_PYTHON], inputs=inputs, repeats=3)
        local, arm = (next(p for p in report.validation.providers if p.device == d and p.provider == "CPUExecutionProvider")
                      for d in ("local", ARM64_PYTHON))
        assert arm.emulated.startswith("qemu-aarch64") and arm.speedup is None
        for here, there in zip(local.outputs, arm.outputs):
            # the pick's error against the original is the same on ARM's kernels as on x86's
            assert there.cosine_min == pytest.approx(here.cosine_min, abs=2e-3), (recipe, here, there)


def test_the_page_shows_each_targets_plot_the_pick_and_why_candidates_were_dropped(capsys, workdir):
    from onnxlr import browser

    why = browser.missing()
    if why:
        if os.environ.get("ONNXLR_REQUIRE_BROWSER", "0") not in ("", "0"):
            pytest.fail(f"ONNXLR_REQUIRE_BROWSER is set but no headless browser: {why}")
        pytest.skip(f"no headless browser: {why}")
    _, manifest, _ = _tune(capsys, workdir, "--max-error", "top1=0.97")
    driver = browser.chromium(workdir / "chromium-profile")
    try:
        driver.get((workdir / "tuned" / "tune.html").as_uri())
        figure = driver.find_element("id", "pareto-0")
        assert figure.is_displayed() and figure.size["width"] > 300 and figure.size["height"] > 150
        assert figure.find_elements("css selector", "svg path")
        rows = driver.find_elements("css selector", "#candidates tbody tr")
        assert len(rows) == len(manifest["candidates"])
        dropped = [r.text for r in rows if r.find_elements("css selector", "td.alarm")]
        assert any("lowrank params=0.5" in text and "top-1 agreement" in text for text in dropped), dropped
        picks = driver.find_element("id", "picks").text
        target = manifest["targets"][0]
        assert (target["pick"]["candidate"] if target["pick"] else "as fast as the original") in picks
    finally:
        driver.quit()


def test_all_providers_means_every_provider_of_each_devices_build(tmp_path):
    import onnxruntime as ort

    from onnxlr.compare import parse_tolerance
    from onnxlr.runtimes.devices import Device
    from onnxlr.runtimes.providers import parse_provider_specs

    stem = FIXTURES / "skl_mlp_raw"
    options = tune_module.TuneOptions(model=Path(f"{stem}.onnx"), calib=Path(f"{stem}.calib.npz"),
                                      inputs=Path(f"{stem}.inputs.npz"), output=tmp_path,
                                      tolerance=parse_tolerance("top1=0.9"))
    search = tune_module._Search(options)

    found = search._providers_on(Device("local"), parse_provider_specs("all"))
    assert found == [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    assert search._providers_on(Device("local"), parse_provider_specs("cpu")) == ["CPUExecutionProvider"]


def test_a_fixed_batch_model_is_tuned_one_sample_at_a_time(capsys, tmp_path):
    """An export with its batch fixed at 1 reads the ordinary stacked held-out file (issue #20's rule)."""
    stem = FIXTURES / "torch_fixed_batch1"
    code = cli.main(["tune", f"{stem}.onnx", "--calib", f"{stem}.calib.npz", "--inputs", f"{stem}.inputs.npz",
                     "-o", str(tmp_path / "tuned"), "-q", "--repeats", "3", "--candidates", "int8,lowrank params=0.9",
                     "--max-error", "cosine=0.9"])
    assert message_lines(capsys.readouterr().err) == []
    manifest = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert code in (0, 1) and manifest["settings"]["batch_size"] == 8
    rows = {c["name"]: c for c in manifest["candidates"]}
    assert rows["int8"]["check"]["holds"]  # built, and checked on every held-out sample
    assert rows["lowrank params=0.9"]["status"] != "failed", rows["lowrank params=0.9"]["reason"]
    assert manifest["targets"][0]["original_median_ms"] > 0
