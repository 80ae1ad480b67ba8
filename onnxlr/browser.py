"""Headless Chromium through Selenium, to look at the HTML report the way a reader does.

Used by the HTML report test and ``bench/report_screenshot.py``; needs ``selenium`` (dev extra),
the system's ``chromium`` and ``chromedriver``. Selenium Manager is never asked for anything: the
driver path is given explicitly, and the browser is kept off the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("ONNXLR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ONNXLR_CHROMEDRIVER", "/usr/bin/chromedriver")
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--disable-quic", "--hide-scrollbars")


def missing() -> str:
    """Why a headless Chromium cannot be started here ("" if it can)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)) and not shutil.which(path):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return ""


def chromium(user_data_dir: str | os.PathLike, width: int = 1200, height: int = 900):
    """A headless Chromium WebDriver with a fresh profile in ``user_data_dir``; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (*ARGUMENTS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(argument)
    # an explicit driver path: Selenium skips Selenium Manager, which would download one
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def full_page_png(driver) -> bytes:
    """A PNG of the whole page, beyond the window (Chrome DevTools' captureBeyondViewport)."""
    import base64

    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    return base64.b64decode(shot["data"])
