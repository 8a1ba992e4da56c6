"""The model-check script behind the model card's figures runs, and its sets are what
they claim: the non-coronary set holds no coronary calcium but visible aortic, valve
or mitral calcium, the unfamiliar set calcium of kinds training never shows; the shares
are computed from the per-scan rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cacflow.synth.cohort import NONCORONARY_CALCIUM_KINDS
from cacflow.synth.phantom import UNFAMILIAR_CALCIUM_KINDS

REPO = Path(__file__).resolve().parents[2]


def test_model_checks_script_on_one_scan_each():
    completed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "benchmarks" / "model_checks.py"), str(REPO / "src" / "cacflow" / "model" / "weights"),
         "--validation", "0", "--holdout", "1", "--noncoronary", "2", "--unfamiliar", "1", "--specks", "1", "--thin", "1", "--outside", "1", "--workers", "1", "--scans"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = {r["check"]: r for r in map(json.loads, completed.stdout.splitlines())}
    outside = ("outside_wide_fov", "control_nongated", "outside_kvp_80", "outside_kvp_140", "control_kvp",
               "gap_gated_0.5_0.6", "control_gated")
    assert set(results) == {"holdout", "noncoronary", "unfamiliar", "specks", "thin", *outside}  # --validation 0 skips it
    specks = results["specks"]
    assert specks["seed"] == 23_000_001 and len(specks["scans"]) == 1
    holdout = results["holdout"]
    assert holdout["seed"] == 99_000_001 and len(holdout["scans"]) == 1
    scan = holdout["scans"][0]
    assert holdout["mean_abs_agatston_error"] == abs(scan["predicted"] - scan["reference"])
    # the same figures against what the image shows (phantom.image_reference)
    assert holdout["mean_abs_agatston_error_image_reference"] == abs(scan["predicted"] - scan["image_reference"])
    assert holdout["sensitivity_cac_gt_0_image_reference"] == (
        (scan["predicted"] > 0) if scan["image_reference"] > 0 else None)
    assert scan["slice_thickness_mm"] in (2.5, 3.0, 5.0)  # the training distribution's
    thin = results["thin"]
    assert thin["seed"] == 12_500_001 and [row["slice_thickness_mm"] for row in thin["scans"]] == [1.25]
    wide, control = results["outside_wide_fov"]["scans"][0], results["control_nongated"]["scans"][0]
    assert not wide["gated"] and 0.86 <= wide["pixel_spacing_mm"] <= 0.98  # wider than any training scan
    assert not control["gated"] and 0.60 <= control["pixel_spacing_mm"] <= 0.85  # within the training range
    assert [results[f"outside_kvp_{kvp}"]["scans"][0]["kvp"] for kvp in (80, 140)] == [80, 140]
    assert results["control_kvp"]["scans"][0]["kvp"] in (100, 120)
    gap, gated = results["gap_gated_0.5_0.6"]["scans"][0], results["control_gated"]["scans"][0]
    assert gap["gated"] and gated["gated"] and 0.50 <= gap["pixel_spacing_mm"] <= 0.60
    assert 0.30 <= gated["pixel_spacing_mm"] <= 0.50
    noncoronary = results["noncoronary"]
    assert noncoronary["seed"] == 31_000_001 and len(noncoronary["scans"]) == 2
    for row in noncoronary["scans"]:
        assert row["reference"] == 0  # no coronary calcium
        assert set(row["noncoronary_calcium"].split(";")) <= set(NONCORONARY_CALCIUM_KINDS)
        assert row["noncoronary_calcium"]
    zero = [row["predicted"] == 0 for row in noncoronary["scans"]]
    assert noncoronary["share_scored_zero"] == sum(zero) / 2
    # the review-flag counts are those of the rows, and each range brackets the score
    unfamiliar = results["unfamiliar"]
    assert unfamiliar["seed"] == 41_000_001 and len(unfamiliar["scans"]) == 1
    row = unfamiliar["scans"][0]
    assert row["reference"] == 0 and row["unfamiliar_calcium"]
    assert set(row["unfamiliar_calcium"].split(";")) <= set(UNFAMILIAR_CALCIUM_KINDS)
    assert unfamiliar["share_scored_zero"] == (row["predicted"] == 0)
    # kinds are named only for a scan scored above 0, and they are kinds the generator draws
    assert bool(row["called_coronary"]) == (row["predicted"] > 0)
    assert set(filter(None, row["called_coronary"].split(";"))) <= {
        *UNFAMILIAR_CALCIUM_KINDS, *NONCORONARY_CALCIUM_KINDS, "other"}
    for result in (holdout, noncoronary, unfamiliar, thin, *(results[name] for name in outside)):
        assert result["scans_flagged_uncertain"] == sum(row["category_uncertain"] for row in result["scans"])
        for row in result["scans"]:
            assert row["range_low"] - 1e-9 <= row["predicted"] <= row["range_high"] + 1e-9
    assert noncoronary["wrong_category_scans"] == 2 - sum(zero)
