"""select_series: the documented order of preference, and a reason for every runner-up."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from dicom_factory import CHEST, GATED_CASC, SAGITTAL, write_series
from pydicom.uid import generate_uid

from cacflow.discover import discover_visit
from cacflow.qc import qc_series
from cacflow.selection import select_series


@pytest.fixture(scope="module")
def visit(tmp_path_factory):
    """One real visit folder with the series a calcium-scoring exam typically holds."""
    root = tmp_path_factory.mktemp("visit")
    write_series(root / "1", n_slices=2, thickness=None, orientation=SAGITTAL, series_number=1,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), tags={"SeriesDescription": "Topogram 0.6 T20f"})
    write_series(root / "2", thickness=3.0, series_number=2, tags=GATED_CASC)
    write_series(root / "3", n_slices=150, thickness=1.0, series_number=3, tags=GATED_CASC)
    write_series(root / "4", n_slices=120, thickness=0.75, series_number=4,
                 tags={**GATED_CASC, "SeriesDescription": "CorCTA 0.75 Bv40 75%", "ContrastBolusAgent": "Iomeron"})
    write_series(root / "5", n_slices=60, thickness=5.0, series_number=5, tags=CHEST)
    write_series(root / "6", kvp=100, series_number=6, tags=GATED_CASC)
    series = discover_visit(root).series
    return {s.series_number: (s, qc_series(s)) for s in series}


def pick(visit, *numbers):
    return [visit[n] for n in numbers]


def reasons(selection, visit):
    by_uid = {r.series_uid: r for r in selection.ranked}
    return {n: by_uid[s.series_uid].reason_not_chosen for n, (s, _) in visit.items() if s.series_uid in by_uid}


def test_gated_3mm_120kvp_series_is_chosen_and_every_other_series_says_why(visit):
    selection = select_series(list(visit.values()))
    assert selection.chosen_uid == visit[2][0].series_uid
    assert selection.visit_status == "scorable" and selection.visit_reason is None
    assert selection.scan_type == "gated"
    assert reasons(selection, visit) == {
        1: "failed QC: localizer",
        2: None,
        3: "lower preference: 1 mm thin recon; 3 mm preferred",
        4: "failed QC: contrast_tag",
        5: "lower preference: non-gated while a gated series exists",
        6: "lower preference: 100 kVp; 120 kVp preferred",
    }
    ranks = {r.series_uid: r.rank for r in selection.ranked}
    # 120 kVp outranks thickness: the 1 mm 120 kVp recon beats the 3 mm 100 kVp one.
    assert [ranks[visit[n][0].series_uid] for n in (2, 3, 6, 5, 1, 4)] == [1, 2, 3, 4, None, None]
    assert [r.chosen for r in selection.ranked].count(True) == 1


def test_result_does_not_depend_on_input_order(visit):
    pairs = list(visit.values())
    expected = select_series(pairs)
    for seed in range(5):
        random.Random(seed).shuffle(pairs)
        assert select_series(pairs) == expected


def test_nongated_chest_is_scored_only_without_a_gated_series(visit):
    selection = select_series(pick(visit, 1, 4, 5))
    assert selection.chosen_uid == visit[5][0].series_uid and selection.scan_type == "nongated"
    assert selection.visit_status == "scorable"
    assert selection.visit_reason == ("scored on a non-gated series: no gated series passed QC; "
                                      "chosen series has QC warnings (thick_slices, not_gated)")


def test_nothing_scorable_gives_one_actionable_sentence(visit):
    selection = select_series(pick(visit, 1, 4))
    assert selection.chosen_uid is None and selection.visit_status == "not_scorable"
    assert selection.visit_reason == ("no scorable series: 2 series, all failed QC (localizer; contrast_tag); "
                                      "each series' reason is in the series table")
    for ranked in selection.ranked:
        assert ranked.rank is None and not ranked.chosen and ranked.reason_not_chosen.startswith("failed QC")


def test_empty_visit_is_not_scorable():
    selection = select_series([])
    assert (selection.chosen_uid, selection.visit_status, selection.ranked) == (None, "not_scorable", [])
    assert "no CT series" in selection.visit_reason


def test_prefer_gated_off_ranks_on_thickness_first(visit):
    thin_gated = visit[3]
    chest_3mm = replace(visit[5][0], slice_thickness_mm=3.0, slice_increment_mm=3.0, series_uid=generate_uid())
    pairs = [thin_gated, (chest_3mm, qc_series(chest_3mm))]
    assert select_series(pairs).chosen_uid == thin_gated[0].series_uid
    assert select_series(pairs, prefer_gated=False).chosen_uid == chest_3mm.series_uid


def variant(visit, **changes):
    record = replace(visit[2][0], series_uid=generate_uid(), **changes)
    return record, qc_series(record)


def test_native_beats_derived(visit):
    derived = variant(visit, image_type=("DERIVED", "PRIMARY", "MPR"))
    selection = select_series([derived, visit[2]])
    assert selection.chosen_uid == visit[2][0].series_uid
    assert selection.ranked[1].reason_not_chosen == ("lower preference: derived image; a native (ORIGINAL) "
                                                     "series is preferred")


def test_fewer_warnings_then_coverage_then_slices(visit):
    warned = variant(visit, rescale_varies=True)
    shorter = variant(visit, z_extent_mm=100.0)
    fewer = variant(visit, n_slices=39)
    selection = select_series([warned, shorter, fewer, visit[2]])
    assert selection.chosen_uid == visit[2][0].series_uid
    assert [r.reason_not_chosen for r in selection.ranked[1:]] == [
        "lower preference: fewer slices (39 vs 40)",
        "lower preference: less z coverage (100 mm vs 117 mm)",
        "lower preference: more QC warnings (rescale_varies)",
    ]


def test_thickness_closest_to_3mm_wins_among_thick_recons(visit):
    four = variant(visit, slice_thickness_mm=4.0, slice_increment_mm=4.0)
    five = variant(visit, slice_thickness_mm=5.0, slice_increment_mm=5.0)
    selection = select_series([five, four])
    assert selection.chosen_uid == four[0].series_uid
    assert selection.ranked[1].reason_not_chosen == "lower preference: 5 mm thick recon; 3 mm preferred"


def test_ties_break_on_series_number_then_uid(visit):
    twin_low = variant(visit, series_number=7)
    twin_high = variant(visit, series_number=8)
    selection = select_series([twin_high, twin_low])
    assert selection.chosen_uid == twin_low[0].series_uid
    assert selection.ranked[1].reason_not_chosen.startswith("same preference as the chosen series")


def test_warnings_of_the_chosen_series_are_reported(visit):
    selection = select_series([visit[6]])
    assert selection.visit_reason == "chosen series has QC warnings (kvp_not_120)"
    rows = selection.to_rows()
    assert rows == [{"series_uid": visit[6][0].series_uid, "chosen": True, "selection_rank": 1,
                     "not_chosen_reason": None}]
