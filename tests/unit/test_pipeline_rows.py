"""Shard rows: every key survives the Parquet round trip whichever row holds it, and a
scored row carries the review flag the inference stage's range implies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cacflow.pipeline import OUTSIDE_MODEL_RANGE_NOTE, read_rows, scan_row, score_visit, write_rows
from cacflow.volume import Volume

REPO = Path(__file__).resolve().parents[2]


def test_keys_missing_from_the_first_row_are_kept(tmp_path):
    # e.g. a shard whose first visit was not scored: the scores must not be dropped
    rows = [{"participant_id": "P1", "status": "not_scorable"},
            {"participant_id": "P2", "status": "scored", "agatston_total": 12.5, "risk_category_uncertain": True}]
    write_rows(rows, tmp_path / "rows.parquet")
    assert read_rows(tmp_path / "rows.parquet") == [
        {"participant_id": "P1", "status": "not_scorable", "agatston_total": None, "risk_category_uncertain": None},
        {"participant_id": "P2", "status": "scored", "agatston_total": 12.5, "risk_category_uncertain": True},
    ]


@pytest.fixture(scope="module")
def settings():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def scan_with_one_lesion():
    """One LAD lesion of 8 pixels (0.5 x 0.5 mm) at 450 HU on a 3 mm slice: Agatston 8."""
    hu = np.zeros((3, 16, 16), dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    hu[1, 4:6, 4:8], labels[1, 4:6, 4:8] = 450.0, 2
    return Volume(hu, (3.0, 0.5, 0.5), 3.0), labels


@pytest.mark.parametrize("low, high, uncertain", [
    (8.0, 8.0, False),   # no unsure call
    (8.0, 10.0, False),  # unsure calls that stay within 1-10
    (0.0, 8.0, True),    # the whole score hangs on an unsure call: 0 or 1-10
    (8.0, 14.0, True),   # an unsure 6 more would make it 11-100
    (None, None, None),  # not assessed (inferred by an older version)
])
def test_the_flag_follows_the_risk_categories_of_the_range(settings, low, high, uncertain):
    volume, labels = scan_with_one_lesion()
    visit = {"participant_id": "P1", "visit": "v1", "kvp": 120.0, "slice_thickness_mm": 3.0, "scan_type": "gated",
             "agatston_range_low": low, "agatston_range_high": high}
    scan, _ = score_visit(visit, volume, labels, settings)
    assert scan["agatston_total"] == pytest.approx(8.0)
    assert scan["risk_category_uncertain"] is uncertain
    assert ("review the overlay" in (scan["status_reason"] or "")) == bool(uncertain)


@pytest.mark.parametrize("outside", [True, False, None])  # None: the model records no training range
def test_a_scan_outside_the_models_range_says_so_in_its_reason(settings, outside):
    volume, labels = scan_with_one_lesion()
    visit = {"participant_id": "P1", "visit": "v1", "kvp": 120.0, "slice_thickness_mm": 3.0, "scan_type": "gated",
             "agatston_range_low": 8.0, "agatston_range_high": 8.0, "outside_model_range": outside}
    scan, _ = score_visit(visit, volume, labels, settings)
    row = scan_row(visit, scan, "digest")
    assert row["outside_model_range"] is outside
    assert row["status_reason"] == (OUTSIDE_MODEL_RANGE_NOTE if outside else None)


def test_a_visit_inferred_but_not_scored_has_no_range_verdict():
    visit = {"participant_id": "P1", "visit": "v1", "status": "failed", "status_reason": "scoring raised ...",
             "agatston_range_low": 8.0, "agatston_range_high": 8.0, "outside_model_range": True}
    row = scan_row(visit, None, "digest")
    assert row["outside_model_range"] is None and row["agatston_range_low"] is None
