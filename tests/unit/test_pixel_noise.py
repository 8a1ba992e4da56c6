"""The pixel noise estimate against noise of known standard deviation."""

from dataclasses import replace

import numpy as np
import pytest
from visit_rows import default_settings, pending_visit

from cacflow.pixel_noise import pixel_noise_hu
from cacflow.synth import phantom as phantom_module
from cacflow.synth.phantom import PhantomSettings, generate_phantom


def test_white_noise_on_flat_tissue():
    rng = np.random.default_rng(1)
    hu = 40.0 + 25.0 * rng.standard_normal((12, 128, 128))
    assert pixel_noise_hu(hu, 0.5) == pytest.approx(25.0, rel=0.03)


def test_correlated_noise_beside_lung_counts_in_full():
    """Noise as coarse as CT's softest kernels at its finest pixels (0.8 mm grain, 0.3 mm
    pixels), with half of every slice lung: the lung and its edge are left out, and the
    grain is counted in full, where neighbouring-pixel differences would cancel it."""
    settings = PhantomSettings(noise_hu=30.0, noise_grain_mm=0.8, pixel_spacing_mm=0.3)
    noise = phantom_module._correlated_noise(np.random.default_rng(2), (16, 160, 160), settings)
    hu = np.where(np.arange(160)[None, None, :] < 80, 40.0, -850.0) + noise
    measured_noise = float(noise[:, :, :80].std())
    assert pixel_noise_hu(hu, 0.3) == pytest.approx(measured_noise, rel=0.05)


@pytest.mark.parametrize("gated, noise_hu", [(True, 18.0), (False, 35.0)])
def test_generated_scans_read_their_noise(gated, noise_hu):
    settings = replace(PhantomSettings(), gated=gated, fov_centre="heart" if gated else "body",
                       pixel_spacing_mm=0.4 if gated else 0.7, noise_hu=noise_hu)
    phantom = generate_phantom(5, settings)
    assert pixel_noise_hu(phantom.hu, phantom.spacing_mm[1]) == pytest.approx(noise_hu, rel=0.04)


def test_no_soft_tissue_is_unmeasured():
    rng = np.random.default_rng(3)
    lung = -850.0 + 20.0 * rng.standard_normal((8, 64, 64))
    assert pixel_noise_hu(lung, 0.5) is None


# --- the QC check in the pipeline ------------------------------------------------------

def test_a_noisy_scan_is_scored_and_flagged_with_its_noise():
    from cacflow.pipeline import PENDING, check_image_noise

    visit = pending_visit()
    check_image_noise(visit, generate_phantom(3, PhantomSettings(noise_hu=40.0)).volume(), default_settings())
    assert (visit["status"], visit["qc_status"], visit["qc_reasons"]) == (PENDING, "warn", "noisy_image")
    assert visit["image_noise_hu"] == pytest.approx(40.0, rel=0.04)


def test_a_quiet_scan_passes_and_keeps_its_other_warnings():
    from cacflow.pipeline import PENDING, check_image_noise

    visit = pending_visit(qc_reasons="kvp_not_expected", qc_status="warn")
    check_image_noise(visit, generate_phantom(3, PhantomSettings(noise_hu=15.0)).volume(), default_settings())
    assert (visit["status"], visit["qc_status"], visit["qc_reasons"]) == (PENDING, "warn", "kvp_not_expected")
    assert visit["image_noise_hu"] == pytest.approx(15.0, rel=0.04)


def test_the_check_says_what_it_measured():
    from cacflow.qc import PASS, WARN, QCSettings, image_noise_check

    noisy = image_noise_check(41.2)
    assert (noisy.status, noisy.code) == (WARN, "noisy_image")
    assert "41 HU" in noisy.message and "above 30 HU" in noisy.message
    assert image_noise_check(30.0).status == PASS  # the limit itself passes
    assert image_noise_check(41.2, QCSettings(max_image_noise_hu=45.0)).status == PASS
    assert (image_noise_check(None).status, image_noise_check(float("nan")).status) == (PASS, PASS)


def test_the_flag_reaches_the_chosen_series_row():
    from cacflow.pipeline import apply_image_checks

    series = [{"participant_id": "P1", "visit": "1", "series_instance_uid": "1.2.3", "qc_status": "pass",
               "qc_reasons": None, "qc_messages": None, "chosen": True},
              {"participant_id": "P1", "visit": "1", "series_instance_uid": "1.2.4", "qc_status": "pass",
               "qc_reasons": None, "qc_messages": None, "chosen": False}]
    scans = [{"participant_id": "P1", "visit": "1", "series_instance_uid": "1.2.3", "qc_reasons": "noisy_image",
              "image_noise_hu": 41.2}]
    apply_image_checks(series, scans)
    chosen, other = series
    assert (chosen["qc_status"], chosen["qc_reasons"], chosen["chosen"]) == ("warn", "noisy_image", True)
    assert "41 HU" in chosen["qc_messages"]
    assert (other["qc_status"], other["qc_reasons"]) == ("pass", None)
