"""Screenshot of an HTML report (``onnxlr … --html``) in headless Chromium, for docs/report.png.

    python bench/report_screenshot.py report.html docs/report.png [--width 1200]

docs/report.png is LeNet at half its parameters, validated on every provider of two devices:

    onnxlr optimize ~/.cache/onnxlr/mnist_lenet.onnx -o /tmp/lenet.onnx --calib ~/.cache/onnxlr/mnist_calib.npz \\
        --target params=0.5 --inputs ~/.cache/onnxlr/mnist_test.npz --providers all \\
        --device .venv-openvino/bin/python --html /tmp/lenet.html
    python bench/report_screenshot.py /tmp/lenet.html docs/report.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from onnxlr import browser


def screenshot(page: Path, output: Path, width: int = 1200) -> tuple[int, int]:
    """Write a full-page PNG of ``page`` to ``output``; returns the page's size in CSS pixels."""
    with tempfile.TemporaryDirectory() as profile:
        driver = browser.chromium(profile, width=width)
        try:
            driver.get(page.resolve().as_uri())
            png = browser.full_page_png(driver)
            size = driver.execute_script("return [document.documentElement.scrollWidth, "
                                         "document.documentElement.scrollHeight]")
        finally:
            driver.quit()
    output.write_bytes(png)
    return tuple(size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200, help="window width in CSS pixels (default 1200)")
    args = parser.parse_args()
    why = browser.missing()
    if why:
        print(f"report_screenshot: {why}", file=sys.stderr)
        return 2
    width, height = screenshot(args.html, args.png, args.width)
    print(f"wrote {args.png} ({width}x{height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
