"""The cohort report opens in a real browser (Debian's headless Chromium) without
errors and shows its overlay images."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cacflow import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed, offline machine (no background network, no GPU, root).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CACFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail("CACFLOW_REQUIRE_BROWSER=1 but Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def small_report(path):
    hu = np.full((64, 64), 40.0)
    labels = np.zeros((64, 64), dtype=np.uint8)
    for value, (row, col) in zip((1, 2, 3, 4), ((10, 10), (10, 40), (40, 10), (40, 40))):
        hu[row:row + 12, col:col + 12] = 400.0
        labels[row:row + 12, col:col + 12] = value
    scans = pd.DataFrame([
        {"participant_id": "P1", "visit": "V1", "status": "scored", "status_reason": None, "agatston_total": 812.0,
         "risk_category": ">400", "cac_drs": "A3/N4", "scan_type": "gated", "qc_status": "pass",
         "agatston_lm": 10.0, "agatston_lad": 400.0, "agatston_lcx": 2.0, "agatston_rca": 400.0, "kvp": 120.0},
        {"participant_id": "P2", "visit": "V1", "status": "not_scorable", "status_reason": "no scorable series",
         "agatston_total": None, "risk_category": None, "cac_drs": None, "scan_type": None, "qc_status": None,
         "kvp": None},
    ])
    series = pd.DataFrame([{"participant_id": "P1", "visit": "V1", "qc_status": "pass", "qc_reasons": None,
                            "chosen": True}])
    overlays = {("P1", "V1"): [report.overlay_png(hu, labels)]}
    report.render_report(scans, series, pd.DataFrame(), path, overlays=overlays)


def render(chromium, html, tmp_path, name):
    screenshot = tmp_path / f"{name}.png"
    result = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}", f"--screenshot={screenshot}",
         "--window-size=1400,9000", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    colour_counts = {value: int((pixels == colour).all(axis=1).sum()) for value, colour in report.VESSEL_COLOURS.items()}
    return result, colour_counts


def test_report_loads_without_errors_and_shows_the_overlays(chromium, tmp_path):
    html = tmp_path / "report.html"
    small_report(html)
    result, shown = render(chromium, html, tmp_path, "good")
    assert result.returncode == 0, result.stderr[-2000:]
    console_errors = [line for line in result.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert console_errors == []
    # The same page with the image made undecodable: the vessel colours that remain
    # come from the rest of the page; the overlay adds each vessel's labelled block.
    broken = tmp_path / "broken.html"
    text = html.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 4:])
    _, without_image = render(chromium, broken, tmp_path, "broken")
    for value in report.VESSEL_COLOURS:
        assert shown[value] - without_image[value] >= 100, (value, shown, without_image)
