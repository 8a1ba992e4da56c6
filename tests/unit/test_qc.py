"""qc_series and infer_gating: each check's status and code, on real DICOM written by pydicom."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
from dicom_factory import CHEST, GATED_CASC, SAGITTAL, write_series
from pydicom.data import get_testdata_file
from pydicom.uid import SecondaryCaptureImageStorage

from cacflow.discover import discover_visit
from cacflow.qc import Check, QCSettings, blood_pool_contrast_check, infer_gating, qc_series

NO_GATING = {"SeriesDescription": "Series 3.0 B30f", "ProtocolName": None}


def discovered(folder, **kwargs):
    write_series(folder, **kwargs)
    series = discover_visit(folder).series
    assert len(series) == 1
    return series[0]


def qc_of(folder, **kwargs):
    return qc_series(discovered(folder, **kwargs))


def assert_problem(qc, code, status):
    found = [c for c in qc.checks if c.code == code]
    assert found, f"{code} not raised; got {qc.qc_reasons!r}"
    assert found[0].status == status
    assert found[0].message.endswith(".") and len(found[0].message) > 30


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A clean 40-slice, 3 mm, 120 kVp axial series with no gating information at all."""
    record = discovered(tmp_path_factory.mktemp("plain"), tags={"SeriesDescription": "Series 3.0 B30f"})
    assert infer_gating(record).gated is None
    return record


def test_gated_calcium_score_series_passes(tmp_path):
    qc = qc_of(tmp_path, tags=GATED_CASC)
    assert qc.status == "pass" and qc.qc_reasons == "" and qc.scan_type == "gated"
    assert qc.gating.confidence == "high"
    row = qc.to_row()
    assert row["qc_reasons"] is None and row["qc_messages"] is None and row["gated"] is True
    assert row["gating_evidence"] == ("cardiac_sync_technique:PROSPECTIVE; nominal_cardiac_phase_pct:70; "
                                      "series_description:CaSc")


def test_localizer_fails(tmp_path):
    qc = qc_of(tmp_path, n_slices=1, thickness=None, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
               orientation=SAGITTAL, tags={"SeriesDescription": "Topogram 0.6 T20f"})
    assert qc.status == "fail"
    assert qc.qc_reasons == "localizer"  # not buried under thickness/orientation findings


def test_localizer_named_only_in_the_description_fails(plain):
    qc = qc_series(replace(plain, series_description="Scout"))
    assert_problem(qc, "localizer", "fail")


def test_thin_recon_warns(tmp_path):
    qc = qc_of(tmp_path, n_slices=140, thickness=0.6, tags=GATED_CASC)
    assert qc.status == "warn" and qc.qc_reasons == "thin_slices"


def test_contrast_cta_fails(tmp_path):
    tags = {**GATED_CASC, "SeriesDescription": "CorCTA 0.75 Bv40 75%", "ContrastBolusAgent": "Iomeron 350",
            "ContrastBolusRoute": "IV"}
    qc = qc_of(tmp_path, thickness=0.75, tags=tags)
    assert qc.status == "fail"
    assert_problem(qc, "contrast_tag", "fail")
    assert qc.to_row()["contrast_agent_tag"] is True


@pytest.mark.parametrize("agent", ["NONE", "no", "Non-contrast", ""])
def test_contrast_tag_saying_none_passes(plain, agent):
    qc = qc_series(replace(plain, contrast_agent=agent))
    assert "contrast_tag" not in qc.codes() and qc.to_row()["contrast_agent_tag"] is False


def test_oral_contrast_only_warns(plain):
    assert_problem(qc_series(replace(plain, contrast_route="ORAL")), "oral_contrast", "warn")


def test_contrast_in_the_description_warns(plain):
    assert_problem(qc_series(replace(plain, series_description="Thorax CTA 1.0")), "contrast_description", "warn")
    assert "contrast_description" not in qc_series(replace(plain, series_description="Chest non-contrast")).codes()


def test_nongated_5mm_chest_is_scorable_but_flagged(tmp_path):
    qc = qc_of(tmp_path, n_slices=60, thickness=5.0, tags=CHEST)
    assert qc.status == "warn" and qc.scan_type == "nongated"
    assert qc.qc_reasons == "thick_slices; not_gated"
    assert qc.gating.gated is False


def test_slices_thicker_than_5mm_fail(plain):
    qc = qc_series(replace(plain, slice_thickness_mm=6.0, slice_increment_mm=6.0))
    assert_problem(qc, "slice_thickness_out_of_range", "fail")


def test_thickness_limits_are_configurable(plain):
    record = replace(plain, slice_thickness_mm=1.0, slice_increment_mm=1.0)
    assert "thin_slices" in qc_series(record).codes()
    assert "thin_slices" not in qc_series(record, QCSettings(scoring_thickness_mm=(0.5, 3.0))).codes()


def test_missing_thickness_warns(plain):
    assert_problem(qc_series(replace(plain, slice_thickness_mm=None)), "missing_slice_thickness", "warn")


def test_100_kvp_warns(tmp_path):
    qc = qc_of(tmp_path, kvp=100, tags=GATED_CASC)
    assert qc.status == "warn" and qc.qc_reasons == "kvp_not_120"


def test_missing_kvp_warns(plain):
    assert_problem(qc_series(replace(plain, kvp=None)), "missing_kvp", "warn")


def test_missing_slice_fails(tmp_path):
    qc = qc_of(tmp_path, positions=[i * 3.0 for i in range(40) if i != 20], tags=GATED_CASC)
    assert qc.status == "fail" and qc.qc_reasons == "missing_slices"


def test_duplicate_instance_warns(tmp_path):
    paths = write_series(tmp_path / "s", tags=GATED_CASC)
    shutil.copy(paths[3], tmp_path / "copy.dcm")
    qc = qc_series(discover_visit(tmp_path).series[0])
    assert qc.status == "warn" and qc.qc_reasons == "duplicate_files"


def test_duplicate_position_fails(tmp_path):
    qc = qc_of(tmp_path, positions=[i * 3.0 for i in range(40)] + [60.0], tags=GATED_CASC)
    assert qc.status == "fail" and qc.qc_reasons == "duplicate_slices"


def test_uneven_spacing_warns(tmp_path):
    positions = [i * 3.0 for i in range(20)] + [61.0 + i * 3.0 for i in range(20)]
    qc = qc_of(tmp_path, positions=positions, tags=GATED_CASC)
    assert qc.status == "warn" and qc.qc_reasons == "uneven_spacing"


def test_gantry_tilt_fails(tmp_path):
    qc = qc_of(tmp_path, tags={**GATED_CASC, "GantryDetectorTilt": 15.0})
    assert qc.status == "fail" and qc.qc_reasons == "gantry_tilt"


def test_tilt_seen_only_in_the_geometry_fails_as_tilt_not_orientation(tmp_path):
    qc = qc_of(tmp_path, orientation=(1.0, 0.0, 0.0, 0.0, 0.9396926, -0.3420201), tags=GATED_CASC)
    assert qc.qc_reasons == "gantry_tilt"


def test_sagittal_fails(tmp_path):
    qc = qc_of(tmp_path, orientation=SAGITTAL, tags=GATED_CASC)
    assert qc.status == "fail" and qc.qc_reasons == "not_axial"


def test_non_ct_modality_fails(tmp_path):
    qc = qc_of(tmp_path, kvp=None, tags={**GATED_CASC, "Modality": "MR"})
    assert qc.status == "fail" and qc.qc_reasons == "not_ct"  # no kVp finding on an MR series


def test_secondary_capture_fails(tmp_path):
    qc = qc_of(tmp_path, tags={**GATED_CASC, "SOPClassUID": SecondaryCaptureImageStorage})
    assert qc.status == "fail" and qc.qc_reasons == "secondary_capture"


def test_other_object_types_labelled_ct_fail(plain):
    assert_problem(qc_series(replace(plain, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67")),
                   "unsupported_sop_class", "fail")


def test_derived_image_warns_and_projection_fails(plain):
    assert_problem(qc_series(replace(plain, image_type=("DERIVED", "SECONDARY", "MPR"))), "derived_image", "warn")
    assert_problem(qc_series(replace(plain, image_type=("DERIVED", "SECONDARY", "MIP"))), "projection_image", "fail")


def test_missing_rescale_fails(tmp_path):
    qc = qc_of(tmp_path, tags=GATED_CASC, drop=("RescaleIntercept",))
    assert qc.status == "fail" and qc.qc_reasons == "missing_rescale"


def test_varying_rescale_warns(plain):
    assert_problem(qc_series(replace(plain, rescale_varies=True)), "rescale_varies", "warn")


def test_too_few_slices_fails_and_short_coverage_warns(plain):
    assert_problem(qc_series(replace(plain, n_slices=6, z_extent_mm=15.0)), "too_few_slices", "fail")
    assert_problem(qc_series(replace(plain, n_slices=20, z_extent_mm=57.0)), "short_coverage", "warn")


def test_overlapping_and_noncontiguous_slices_warn(plain):
    assert_problem(qc_series(replace(plain, slice_increment_mm=1.5)), "overlapping_slices", "warn")
    assert_problem(qc_series(replace(plain, slice_increment_mm=6.0)), "noncontiguous_slices", "warn")


def test_mixed_series_fail(plain):
    qc = qc_series(replace(plain, mixed_orientation=True, mixed_matrix=True))
    assert qc.codes("fail") == ["mixed_orientation", "mixed_matrix"]


def test_missing_geometry_fails(plain):
    qc = qc_series(replace(plain, n_missing_position=3, pixel_spacing_row_mm=None))
    assert qc.codes("fail") == ["missing_geometry", "missing_pixel_spacing"]


def test_truncated_files_warn(plain):
    assert_problem(qc_series(replace(plain, n_unreadable_files=2)), "unreadable_files", "warn")


def test_status_is_the_worst_check_and_reasons_keep_check_order(plain):
    qc = qc_series(replace(plain, kvp=100.0, n_missing_rescale=1))
    assert qc.status == "fail"
    assert qc.qc_reasons == "kvp_not_120; missing_rescale; not_gated"
    assert qc.to_row()["qc_messages"].count(" | ") == 2


def test_blood_pool_check():
    assert blood_pool_contrast_check(45.0).status == "pass"
    contrast = blood_pool_contrast_check(320.0)
    assert (contrast.status, contrast.code) == ("fail", "contrast_blood_pool")
    assert blood_pool_contrast_check(None).code == "blood_pool_unmeasured"
    assert blood_pool_contrast_check(float("nan")).status == "warn"
    assert blood_pool_contrast_check(320.0, QCSettings(blood_pool_contrast_hu=350.0)).status == "pass"


def test_a_later_check_can_fail_a_passing_series(tmp_path):
    qc = qc_of(tmp_path, tags=GATED_CASC)
    failed = qc.with_check(blood_pool_contrast_check(400.0))
    assert (qc.status, failed.status, failed.qc_reasons) == ("pass", "fail", "contrast_blood_pool")
    assert isinstance(failed.checks[-1], Check)


# --- gating inference: one case per kind of evidence ---

@pytest.mark.parametrize("changes, gated, confidence, evidence", [
    ({"cardiac_sync_technique": "PROSPECTIVE"}, True, "high", "cardiac_sync_technique:PROSPECTIVE"),
    ({"cardiac_sync_technique": "RETROSPECTIVE"}, True, "high", "cardiac_sync_technique:RETROSPECTIVE"),
    ({"cardiac_sync_technique": "NONE"}, False, "high", "against:cardiac_sync_technique:NONE"),
    ({"nominal_cardiac_phase_pct": 75.0}, True, "high", "nominal_cardiac_phase_pct:75"),
    ({"trigger_time_ms": 512.0}, True, "medium", "trigger_time_ms:512"),
    ({"heart_rate_bpm": 58.0}, True, "medium", "heart_rate_bpm:58"),
    ({"scan_options": "TP70PC\\OSCRATEMIN060BPM"}, True, "high", "scan_options:TP70PC"),
    ({"scan_options": "OSCRATEAVG066BPM"}, True, "medium", "scan_options:OSCRATEAVG066BPM"),
    ({"scan_options": "BESTPH_D_P070PC"}, True, "high", "scan_options:BESTPH_D_P070PC"),
    ({"scan_options": "CARDIAC GATING"}, True, "medium", "scan_options:CARDIAC GATING"),
    ({"series_description": "CaSc 3.0 B35f"}, True, "medium", "series_description:CaSc"),
    ({"series_description": "Ca Score 3mm"}, True, "medium", "series_description:Ca Score"),
    ({"protocol_name": "Calcium Score    (Volume)"}, True, "medium", "protocol_name:Calcium"),
    ({"series_description": "CS 3.0"}, True, "medium", "series_description:CS"),
    ({"series_description": "SmartScore - Gated"}, True, "medium", "series_description:Gated"),
    ({"series_description": "Pro_Gated_CS_3.0_I30f_3_70%"}, True, "medium", "series_description:70%"),
    ({"series_description": "Cardiac 3.0"}, True, "low", "series_description:Cardiac"),
    ({"series_description": "Heart 75%"}, True, "medium", "series_description:75%"),
    ({"series_description": "Chest ASIR 40%"}, False, "low", "against:series_description:Chest"),
    ({"series_description": "Chest CaSc 3.0"}, True, "medium", "series_description:CaSc"),
    ({"series_description": "Non-gated chest 3mm"}, False, "medium", "against:series_description:Non-gated"),
    ({"trigger_time_ms": 0.0}, None, "low", None),
])
def test_gating_inferred_from_each_kind_of_evidence(plain, changes, gated, confidence, evidence):
    result = infer_gating(replace(plain, **{"series_description": None, **changes}))
    assert (result.gated, result.confidence) == (gated, confidence), result.evidence
    if evidence is None:
        assert result.evidence == []
    else:
        assert evidence in result.evidence


def test_tags_and_descriptions_combine_to_high_confidence(plain):
    result = infer_gating(replace(plain, series_description="CaSc 3.0", heart_rate_bpm=61.0))
    assert (result.gated, result.confidence) == (True, "high")


def test_conflicting_evidence_lowers_confidence(plain):
    result = infer_gating(replace(plain, series_description="CaSc 3.0", cardiac_sync_technique="NONE"))
    assert result.gated is False and result.confidence == "low"


def test_blank_ecg_tags_with_casc_description_are_gated(tmp_path):
    # De-identified gated scans: ECG tags present but empty.
    tags = {"SeriesDescription": "CaSc 3.0 B35f 70%", "CardiacSynchronizationTechnique": "",
            "TriggerTime": "", "NominalPercentageOfCardiacPhase": None, "HeartRate": ""}
    qc = qc_of(tmp_path, tags=tags)
    assert qc.scan_type == "gated" and qc.gating.confidence == "medium"
    assert qc.status == "pass" and qc.qc_reasons == ""


def test_no_gating_evidence_is_nongated_and_flagged(plain):
    qc = qc_series(plain)
    assert qc.scan_type == "nongated" and qc.gating.gated is None
    assert_problem(qc, "not_gated", "warn")


def test_weak_gating_evidence_warns(plain):
    assert_problem(qc_series(replace(plain, series_description="Cardiac 3.0")), "gating_uncertain", "warn")


# --- real files ---

def test_real_ct_small_has_a_contrast_tag(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct")
    qc = qc_series(discover_visit(tmp_path).series[0])
    assert qc.status == "fail"
    assert_problem(qc, "contrast_tag", "fail")
    assert_problem(qc, "too_few_slices", "fail")


def test_real_enhanced_ct_perfusion_fails(tmp_path):
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp_path / "ect")
    qc = qc_series(discover_visit(tmp_path).series[0])
    assert qc.codes("fail") == ["contrast_tag", "slice_thickness_out_of_range", "too_few_slices"]
    assert "derived_image" in qc.codes("warn")


def test_real_jpeg2000_ct_with_oblique_orientation_is_tilted(tmp_path):
    shutil.copy(get_testdata_file("J2K_pixelrep_mismatch.dcm"), tmp_path / "j2k")
    record = discover_visit(tmp_path).series[0]
    assert record.compressed and record.orientation == "tilted_axial"
    assert record.tilt_geometry_deg == pytest.approx(22.0, abs=0.1)
    assert "gantry_tilt" in qc_series(record).codes("fail")


def test_real_phantom_is_scorable_with_a_derived_warning(phantom_dir):
    qc = qc_series(discover_visit(phantom_dir).series[0])
    assert qc.status == "warn" and qc.qc_reasons == "derived_image"
    # No ECG tags; the "Calcium Score" protocol and "Cardiac" description say gated.
    assert qc.scan_type == "gated" and qc.gating.confidence == "medium"
    assert set(qc.gating.evidence) == {"series_description:Cardiac", "protocol_name:Calcium"}


def test_a_tiny_field_of_view_fails(tmp_path):
    qc = qc_of(tmp_path, tags={**GATED_CASC, "PixelSpacing": [0.5, 0.5]})  # 16 px x 0.5 mm = 8 mm wide
    assert "small_field_of_view" in qc.codes("fail")


def test_a_cardiac_field_of_view_passes_the_fov_check(tmp_path):
    qc = qc_of(tmp_path, tags=GATED_CASC)  # 16 px x 12.5 mm = 200 mm
    assert "small_field_of_view" not in qc.codes()
