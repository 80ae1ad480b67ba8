"""The HTML report (onnxlr.html_report, ``--html``), looked at in headless Chromium.

The browser tests need selenium, /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium
chromium-driver); without them they are skipped, unless ONNXLR_REQUIRE_BROWSER is set (to anything
but 0), as in CI, where they fail instead.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

from onnxlr import api, browser, html_report
from onnxlr.cli import main

FIGURES = ("latency", "layers", "size", "kernels")
FAST = dict(repeats=2, batch_size=4)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    why = browser.missing()
    if why:
        if os.environ.get("ONNXLR_REQUIRE_BROWSER", "0") not in ("", "0"):
            pytest.fail(f"ONNXLR_REQUIRE_BROWSER is set but no headless browser: {why}")
        pytest.skip(f"no headless browser: {why}")
    chromium = browser.chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.quit()


def _report(mlp_path, sample_x, **options) -> dict:
    _, report = api.optimize(mlp_path, calib={"x": sample_x(32, seed=1)}, inputs={"x": sample_x(16)},
                             max_error="rel_l2=10", providers="cpu,nnapi", **FAST, **options)
    return json.loads(report.to_json())


def _open(driver, tmp_path, report: dict):
    page = tmp_path / "report.html"
    page.write_text(html_report.render(report), encoding="utf-8")
    driver.get(page.as_uri())
    return page


@pytest.mark.parametrize("recipe", ["lowrank", "lowrank+int8"])
def test_every_figure_is_drawn(driver, tmp_path, mlp_path, sample_x, recipe):
    report = _report(mlp_path, sample_x, recipe=recipe, rank_ratio=0.5)
    _open(driver, tmp_path, report)
    for key in FIGURES:
        figure = driver.find_element("id", key)
        assert figure.is_displayed(), key
        assert figure.size["width"] > 100 and figure.size["height"] > 100, (key, figure.size)
        box, paths, unresolved = driver.execute_script(
            """const svg = arguments[0].querySelector('svg'); const r = svg.getBoundingClientRect();
               const refs = [...svg.querySelectorAll('use')].map(u => u.getAttribute('xlink:href') || u.getAttribute('href'));
               return [[r.width, r.height], svg.querySelectorAll('path').length,
                       refs.filter(h => !document.getElementById(h.slice(1)))];""", figure)
        assert box[0] > 100 and box[1] > 100, (key, box)
        assert paths > 10, (key, paths)
        assert unresolved == [], (key, unresolved)  # each glyph / marker reference finds its own plot's
        assert figure.find_element("tag name", "figcaption").text.strip()


def test_summary_and_provider_table_show_the_report(driver, tmp_path, mlp_path, sample_x):
    report = _report(mlp_path, sample_x, rank_ratio=0.5)
    _open(driver, tmp_path, report)
    summary = driver.find_element("id", "summary").text
    assert f"{report['original']['params']:,} → {report['optimized']['params']:,}" in summary
    assert f"{report['original']['bytes']:,} → {report['optimized']['bytes']:,}" in summary
    assert "PASSED" in summary
    cpu = next(p for p in report["validation"]["providers"] if p["provider"] == "CPUExecutionProvider")
    row = next(r for r in driver.find_elements("css selector", "#providers tbody tr")
               if "CPUExecutionProvider" in r.text)
    cells = [c.text for c in row.find_elements("tag name", "td")]
    for cell, key in ((cells[3], "latency_original"), (cells[4], "latency_optimized")):
        median, p90 = (float(v) for v in re.findall(r"[0-9.]+(?:e-?\d+)?", cell))
        assert median == pytest.approx(cpu[key]["median_ms"], rel=0.01, abs=5e-4)
        assert p90 == pytest.approx(cpu[key]["p90_ms"], rel=0.01, abs=5e-4)
    assert cells[6] == "y" and float(cells[8]) == pytest.approx(cpu["outputs"][0]["rel_l2"], rel=0.01)
    nnapi = next(r for r in driver.find_elements("css selector", "#providers tbody tr")
                 if "NnapiExecutionProvider" in r.text)
    assert "not in this onnxruntime build" in nnapi.text
    assert len(driver.find_elements("css selector", "#mobile tbody tr")) == 3


def test_page_loads_nothing_and_its_screenshot_is_not_blank(driver, tmp_path, mlp_path, sample_x):
    from PIL import Image

    page = _open(driver, tmp_path, _report(mlp_path, sample_x, rank_ratio=0.5))
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    source = page.read_text()
    assert not re.search(r"<script|<link|<img|\bsrc=|@import|url\((?!#)", source)
    image = Image.open(io.BytesIO(browser.full_page_png(driver))).convert("RGB")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    assert image.height >= height > 900  # the whole page, beyond the window
    image.save(tmp_path / "report.png")
    pixels = np.asarray(image).astype(int)
    white = np.all(pixels == 255, axis=-1).mean()
    ink = (pixels.min(axis=-1) < 200).mean()  # text, bars, axes: well darker than the page and its cards
    assert white > 0.3, white  # the cards, figures and tables
    assert ink > 0.02, ink
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # plots and text, not flat boxes
    rows = np.flatnonzero((pixels.min(axis=-1) < 200).any(axis=1))
    assert rows[-1] - rows[0] > 0.8 * image.height  # drawn from top to bottom, not just a header


def test_render_without_validation_leaves_its_sections_out(mlp_path):
    _, report = api.optimize(mlp_path, rank_ratio=0.5, validate=False)
    page = html_report.render(json.loads(report.to_json()))
    assert page.startswith("<!DOCTYPE html>")
    assert 'id="layers"' in page and 'id="size"' in page
    assert 'id="latency"' not in page and 'id="kernels"' not in page and 'id="providers"' not in page


def test_render_escapes_the_report_text(mlp_path, sample_x):
    report = _report(mlp_path, sample_x, rank_ratio=0.5)
    report["passes"][0]["layers"].append({"node": "<b>n</b>", "op": "MatMul", "action": "skipped",
                                          "reason": "<script>alert(1)</script>", "details": {}})
    page = html_report.render(report)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;n" in page


def test_render_shows_why_a_provider_did_not_run(mlp_path, sample_x):
    report = _report(mlp_path, sample_x, rank_ratio=0.5)
    cpu = next(p for p in report["validation"]["providers"] if p["provider"] == "CPUExecutionProvider")
    cpu.update(reason="optimized model failed: no kernel for <Op>", outputs=[], latency_original=None,
               latency_optimized=None, speedup=None, profile=None)
    page = html_report.render(report)
    assert "optimized model failed: no kernel for &lt;Op&gt;" in page
    assert 'id="latency"' not in page and 'id="kernels"' not in page and 'id="card-speed-up"' not in page
    assert 'id="layers"' in page and 'id="mobile"' in page


def test_cli_writes_the_html_report(tmp_path, mlp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["optimize", str(mlp_path), "-o", str(tmp_path / "small.onnx"), "--rank-ratio", "0.5",
                 "--repeats", "2", "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert all(f'<figure id="{key}">' in text for key in FIGURES)
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place
    assert main(["validate", str(mlp_path), str(tmp_path / "small.onnx"), "--repeats", "2", "--html", str(page)]) == 0
    assert 'id="latency"' in page.read_text(encoding="utf-8")


def test_cli_html_in_a_missing_folder_fails_before_the_work(tmp_path, mlp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--html", str(tmp_path / "no" / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the HTML report" in err and not out.exists()


def test_settings_skipped_layers_and_an_alarming_value_are_shown(driver, tmp_path, mlp_path, sample_x):
    """A run with no --max-error whose output drifts far (every layer at rank 1), and a layer left dense
    by its per-layer rank: the page shows the settings, every skipped layer with its reason, and the
    alarming worst-sample cosine highlighted (red), with the alarms on top."""
    _, result = api.optimize(mlp_path, calib={"x": sample_x(32, seed=1)}, inputs={"x": sample_x(16)},
                             ranks={"fc1": 1, "W2": 0}, providers="cpu", **FAST)
    report = json.loads(result.to_json())
    cpu = report["validation"]["providers"][0]
    assert cpu["outputs"][0]["cosine_min"] < 0.9 and report["alarms"]  # the case the page must flag
    _open(driver, tmp_path, report)
    settings = {tuple(c.text for c in row.find_elements("tag name", "td"))
                for row in driver.find_elements("css selector", "#settings tbody tr")}
    assert ("recipe", "", "lowrank") in settings
    assert any(group == "rank" and key == "ranks" and "fc1" in value for group, key, value in settings)
    assert any(group == "validation" and key == "providers" for group, key, _ in settings)
    skipped = [[c.text for c in row.find_elements("tag name", "td")]
               for row in driver.find_elements("css selector", "#skipped tbody tr")]
    assert ["factorize_matmul", "fc2", "Gemm", "kept dense by the rank allocation (rank 0)"] in skipped
    alarmed = driver.find_elements("css selector", "#providers td.alarm")
    assert alarmed and float(alarmed[-1].text) == pytest.approx(cpu["outputs"][0]["cosine_min"], abs=1e-4)
    colour = driver.execute_script("return getComputedStyle(arguments[0]).color", alarmed[-1])
    red, green, blue = (int(v) for v in re.findall(r"\d+", colour)[:3])
    assert red > 150 and green < 100 and blue < 100, colour
    box = driver.find_element("id", "alarms")
    assert box.is_displayed() and "worst per-sample cosine" in box.text and "No --max-error" in box.text
