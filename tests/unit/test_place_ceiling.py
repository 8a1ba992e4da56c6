"""The place-ceiling script behind docs/evaluation.md ("How far place alone can go"):
its candidates and their kinds on a hand-built slice, its rules' counts on hand-made
scans, and a real run on the first visits of a cohort, where the oracle must read the
generator's own coronary truth back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "benchmarks" / "place_ceiling.py"


@pytest.fixture(scope="module")
def place_ceiling():
    return load_benchmark("place_ceiling")


def test_candidates_of_a_hand_built_slice(place_ceiling):
    # 0.5 mm pixels: 4 pixels make 1 mm^2. An artery along column 10; on it a plaque
    # (2 x 3 pixels, peak 250 HU: 1.5 mm^2 x weight 2 = 3.0) and a noise group (2 x 2 at
    # 140: 1 mm^2 x 1); bone touching the artery at row 30 (2 x 4 at 500, flagged
    # non-coronary); 3 pixels at 300 on the artery (0.75 mm^2: too small); a noise group
    # 4 mm from the artery (rows 40-41, columns 18-19) and one 10 mm away (columns 30-31).
    image = np.zeros((1, 50, 40))
    artery = np.zeros(image.shape, dtype=bool)
    artery[0, :, 9:12] = True
    coronary = np.zeros(image.shape, dtype=bool)
    image[0, 5:7, 9:12] = 200
    image[0, 6, 10] = 250
    coronary[0, 5:7, 9:12] = True
    image[0, 15:17, 10:12] = 140
    image[0, 30:32, 11:15] = 500
    noncoronary = np.zeros(image.shape, dtype=bool)
    noncoronary[0, 30:32, 12:15] = True
    image[0, 22, 9:12] = 300
    image[0, 40:42, 19:21] = 150
    image[0, 40:42, 31:33] = 150
    found, far = place_ceiling.candidates(image, coronary, artery, noncoronary, pixel_mm=0.5, increment_mm=3.0)
    assert len(found) == 4 and far == {"coronary": 0, "noncoronary": 0, "noise": 1}
    plaque, noise, bone = (next(c for c in found if c["what"] == what) for what in ("coronary", "noise", "noncoronary"))
    assert (plaque["area_mm2"], plaque["peak_hu"], plaque["agatston"], plaque["distance_mm"]) == (1.5, 250.0, 3.0, 0.0)
    assert bone["distance_mm"] == 0.0 and bone["agatston"] == pytest.approx(2.0 * 4)
    near_noise = sorted(c["distance_mm"] for c in found if c["what"] == "noise")
    assert near_noise == [0.0, 4.0]  # column 19 is 8 pixels from column 11
    assert noise["agatston"] == 1.0  # the first in raster order: the one on the artery
    # a 2.5 mm increment scales Agatston by 2.5 / 3
    found, _ = place_ceiling.candidates(image, coronary, artery, noncoronary, pixel_mm=0.5, increment_mm=2.5)
    assert next(c for c in found if c["what"] == "coronary")["agatston"] == pytest.approx(3.0 * 2.5 / 3, abs=1e-4)


def _scan(reference: float, *candidates: tuple[str, float, float, float, float]) -> dict:
    return {"reference_agatston": reference, "candidates": [
        {"what": what, "area_mm2": area, "peak_hu": peak, "agatston": agatston, "distance_mm": distance}
        for what, area, peak, agatston, distance in candidates]}


def test_rule_counts_on_hand_made_scans(place_ceiling):
    scans = [
        _scan(3.0, ("coronary", 1.5, 250, 3.0, 0.0)),  # found by every rule below
        _scan(1.2, ("coronary", 1.2, 140, 1.2, 0.0)),  # lost to a 150 HU floor
        _scan(0.0, ("noise", 1.1, 160, 1.1, 0.0)),  # false call unless the area floor is 1.5
        _scan(0.0, ("noise", 2.0, 170, 2.0, 1.5)),  # false call only with a 2 mm tolerance
        _scan(0.0, ("noncoronary", 5.0, 900, 20.0, 0.0)),  # never called
        _scan(0.5, ("coronary", 1.0, 140, 0.5, 0.0)),  # below CAC 1 on both sides
    ]
    plain = place_ceiling.rule_result(scans, 0.0, 1.0, 130.0)
    assert (plain["tp"], plain["fn"], plain["tn"], plain["fp"]) == (2, 0, 3, 1)
    assert plain["false_positives_by"] == {"noise": 1, "plaque_the_reference_scores_under_1": 0}
    wide = place_ceiling.rule_result(scans, 2.0, 1.0, 130.0)
    assert (wide["tp"], wide["fp"]) == (2, 2)
    brighter = place_ceiling.rule_result(scans, 0.0, 1.0, 150.0)
    assert (brighter["tp"], brighter["fn"], brighter["fp"]) == (1, 1, 1)
    larger = place_ceiling.rule_result(scans, 0.0, 1.5, 130.0)
    assert (larger["tp"], larger["fn"], larger["fp"], larger["specificity"]) == (1, 1, 0, 1.0)


def test_script_reads_the_generators_truth_back(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "888001", "--participants", "3", "--workers", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [json.loads(line) for line in completed.stdout.splitlines()]
    scans = [r for r in rows if r["type"] == "scan"]
    assert [s["participant_id"] for s in scans] == ["P001", "P002", "P003"]
    for scan in scans:
        coronary = [c for c in scan["candidates"] if c["what"] == "coronary"]
        # every coronary candidate lies on its artery, and together they are what the
        # image reference scores (the same groups: those touching a plaque's footprint)
        assert all(c["distance_mm"] == 0.0 for c in coronary)
        assert sum(c["agatston"] for c in coronary) == pytest.approx(scan["image_reference_agatston"], abs=1e-3)
    assert sum(r["type"] == "rule" for r in rows) == 3 * 4 * 4


def test_check_mode_reads_the_scans_the_model_check_scores():
    """--check-seed images the very scans ``holdout_check`` (the validation, hold-out
    and speck checks) scores: the same references, scan by scan."""
    from cacflow.training import holdout_check

    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--check-seed", "55000001", "--check-scans", "2", "--workers", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    scans = [r for r in map(json.loads, completed.stdout.splitlines()) if r["type"] == "scan"]
    checked = holdout_check(str(REPO / "src" / "cacflow" / "model" / "weights"), n_scans=2, seed=55_000_001, workers=1)
    assert [s["reference_agatston"] for s in scans] == [r["reference"] for r in checked["scans"]]
    assert [s["scan_type"] == "gated" for s in scans] == [r["gated"] for r in checked["scans"]]
