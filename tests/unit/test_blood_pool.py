"""The image's own contrast check: blood-pool HU measured in the converted volume.

Ground truth comes from the phantom generator's definition of blood (40 HU, plus
310 HU of iodine scaled for the kVp when ``contrast=True``), not from this code.
"""

from __future__ import annotations

import numpy as np
import pytest
from visit_rows import default_settings, pending_visit

from cacflow.blood_pool import measure_blood_pool
from cacflow.synth.phantom import PhantomSettings, generate_phantom

UNENHANCED_BLOOD_HU = 40.0  # the generator's blood; its myocardium is 45 HU
IODINE_HU_AT_120_KVP = 310.0


def _expected_enhanced_hu(kvp: int) -> float:
    # the generator's iodine model: HU rise as (120 / kVp) ** 1.3 at lower tube voltage
    return UNENHANCED_BLOOD_HU + IODINE_HU_AT_120_KVP * (120.0 / kvp) ** 1.3


def _measure(seed: int, **settings):
    volume = generate_phantom(seed, PhantomSettings(**settings)).volume()
    return measure_blood_pool(volume.hu, volume.spacing_mm)


@pytest.mark.parametrize("seed", [3, 4])
def test_unenhanced_cardiac_scan_measures_unenhanced_blood(seed):
    measured = _measure(seed)
    assert not measured.enhanced
    assert measured.hu == pytest.approx(UNENHANCED_BLOOD_HU, abs=10)


@pytest.mark.parametrize(("seed", "kvp"), [(3, 120), (4, 100), (5, 135)])
def test_contrast_cardiac_scan_measures_the_iodine(seed, kvp):
    measured = _measure(seed, contrast=True, kvp=kvp)
    assert measured.enhanced and measured.volume_ml > 50
    assert measured.hu == pytest.approx(_expected_enhanced_hu(kvp), abs=25)


def test_thin_cta_with_short_coverage_is_found():
    measured = _measure(6, contrast=True, slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=60)
    assert measured.enhanced
    assert measured.hu == pytest.approx(_expected_enhanced_hu(120), abs=25)


def test_nongated_chest_field_of_view_is_measured():
    measured = _measure(7, gated=False, fov_centre="body", pixel_spacing_mm=0.75,
                        slice_thickness_mm=5.0, slice_increment_mm=5.0)
    assert not measured.enhanced
    assert measured.hu == pytest.approx(UNENHANCED_BLOOD_HU, abs=10)
    contrast = _measure(7, gated=False, fov_centre="body", pixel_spacing_mm=0.75,
                        slice_thickness_mm=5.0, slice_increment_mm=5.0, contrast=True)
    assert contrast.enhanced and contrast.hu == pytest.approx(_expected_enhanced_hu(120), abs=25)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_heavy_calcium_and_devices_are_not_mistaken_for_contrast(seed):
    """Aortic, valve and coronary calcium, sternal wires, stents and leads are all
    dense, but small: they must not read as an enhanced blood pool."""
    measured = _measure(seed, target_agatston=2500.0, device_probability=1.0)
    assert not measured.enhanced
    assert measured.hu == pytest.approx(UNENHANCED_BLOOD_HU, abs=10)


def test_a_volume_without_lungs_is_unmeasured():
    """A water cylinder (like a calcium phantom) has no mediastinum: no guess."""
    z, y, x = np.mgrid[0:20, 0:128, 0:128]
    hu = np.where((y - 64) ** 2 + (x - 64) ** 2 < 50 ** 2, 0.0, -1000.0).astype(np.float32)
    hu[:, 60:68, 60:68] = 400.0  # a dense rod inside
    measured = measure_blood_pool(hu, (3.0, 1.5, 1.5))
    assert measured.hu is None and not measured.enhanced
    assert "lungs" in measured.note


def test_real_qrm_phantom_is_not_called_contrast(tmp_path, phantom_dir):
    """The real phantom (a thorax phantom, no blood, no lungs) must never be failed as contrast."""
    from cacflow.convert import convert_series, load_volume

    target = tmp_path / "qrm.nii"
    convert_series(sorted(p for p in phantom_dir.iterdir() if p.is_file()), target)
    volume = load_volume(target)
    measured = measure_blood_pool(volume.hu, volume.spacing_mm)
    assert not measured.enhanced
    assert measured.hu is None or measured.hu < 200


# --- the check in the pipeline ---------------------------------------------------------

def test_pipeline_stops_a_contrast_scan_with_a_reason():
    from cacflow.pipeline import NOT_SCORABLE, check_blood_pool

    visit = pending_visit()
    check_blood_pool(visit, generate_phantom(3, PhantomSettings(contrast=True)).volume(), default_settings())
    assert visit["status"] == NOT_SCORABLE and visit["qc_status"] == "fail"
    assert "contrast_blood_pool" in visit["status_reason"] and "HU" in visit["status_reason"]
    assert visit["qc_reasons"] == "contrast_blood_pool"
    assert visit["blood_pool_hu"] == pytest.approx(_expected_enhanced_hu(120), abs=25)


def test_pipeline_scores_an_unenhanced_scan_and_records_the_value():
    from cacflow.pipeline import PENDING, check_blood_pool

    visit = pending_visit(qc_reasons="kvp_not_expected", qc_status="warn")
    check_blood_pool(visit, generate_phantom(3, PhantomSettings()).volume(), default_settings())
    assert (visit["status"], visit["qc_status"], visit["qc_reasons"]) == (PENDING, "warn", "kvp_not_expected")
    assert visit["blood_pool_hu"] == pytest.approx(UNENHANCED_BLOOD_HU, abs=10)


def test_pipeline_flags_an_unmeasurable_scan_but_scores_it():
    from cacflow.pipeline import PENDING, check_blood_pool
    from cacflow.volume import Volume

    hu = np.zeros((10, 64, 64), dtype=np.float32)
    visit = pending_visit()
    check_blood_pool(visit, Volume(hu, (3.0, 1.0, 1.0)), default_settings())
    assert (visit["status"], visit["qc_status"], visit["qc_reasons"]) == (PENDING, "warn", "blood_pool_unmeasured")
    assert visit["blood_pool_hu"] is None


def test_the_contrast_limit_comes_from_the_config():
    from cacflow.pipeline import PENDING, check_blood_pool

    settings = default_settings()
    settings["qc"]["blood_pool_contrast_hu"] = 600.0
    visit = pending_visit()
    check_blood_pool(visit, generate_phantom(3, PhantomSettings(contrast=True)).volume(), settings)
    assert visit["status"] == PENDING and visit["qc_status"] == "pass"
