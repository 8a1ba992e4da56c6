"""Agatston / volume / mass scoring: hand-computed cases, properties, NIfTI I/O and the CLI.

Expected values are worked out in each test from the definitions in docs/scoring.md.
"""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from cacflow import VESSEL_LABELS, cli
from cacflow.nifti_io import load_nifti, save_nifti
from cacflow.scoring import (
    ScoringSettings,
    adjacent_slices,
    cac_drs,
    density_weight,
    kvp_adjusted_levels,
    risk_category,
    score,
    score_volume,
)
from cacflow.volume import Volume

LM, LAD, LCX, RCA = 1, 2, 3, 4
PIXEL = 0.5  # mm: pixel area 0.25 mm^2, so 4 pixels make the 1 mm^2 minimum area
SPACING = (3.0, PIXEL, PIXEL)


def blank(nz=3, ny=16, nx=16, vessel=LAD):
    """Soft-tissue volume whose every voxel lies in one vessel label."""
    return np.full((nz, ny, nx), 40.0, dtype=np.float32), np.full((nz, ny, nx), vessel, dtype=np.int16)


# --- hand-computed fixtures --------------------------------------------------------


def test_three_by_three_block_of_400_hu():
    hu, labels = blank()
    hu[1, 4:7, 4:7] = 400
    result = score_volume(hu, labels, SPACING)
    area = 9 * PIXEL * PIXEL  # 2.25 mm^2
    assert result.agatston_total == pytest.approx(area * 4)  # weight 4, 3 mm increment: 9.0
    assert result.agatston_total == pytest.approx(9.0)
    assert result.agatston_lad == pytest.approx(9.0)
    assert result.volume_mm3 == pytest.approx(area * 3.0)
    assert result.lesion_count == 1
    lesion = result.lesions[0]
    assert (lesion.vessel, lesion.slice_index, lesion.density_weight, lesion.voxel_count) == ("lad", 1, 4, 9)
    assert lesion.peak_hu == 400 and lesion.mean_hu == 400
    assert result.mass_mg is None and lesion.mass_mg is None


def test_weight_comes_from_the_peak_not_the_mean():
    hu, labels = blank()
    hu[0, 2:5, 2:5] = 150
    hu[0, 3, 3] = 250  # peak 250 -> weight 2, although the mean is 161
    result = score_volume(hu, labels, SPACING)
    assert result.lesions[0].density_weight == 2
    assert result.agatston_total == pytest.approx(9 * 0.25 * 2)


def test_diagonal_neighbours_are_one_lesion():
    hu, labels = blank()
    for i in range(4):  # four pixels touching only at corners: 1.0 mm^2 with 8-connectivity
        hu[0, 3 + i, 3 + i] = 300
    result = score_volume(hu, labels, SPACING)
    assert result.lesion_count == 1
    assert result.agatston_total == pytest.approx(4 * 0.25 * 3)


def test_minimum_area_drops_smaller_components_and_keeps_exactly_one_mm2():
    hu, labels = blank()
    hu[0, 2, 2:5] = 500  # 3 pixels = 0.75 mm^2: dropped
    hu[1, 2, 2:6] = 500  # 4 pixels = 1.00 mm^2: kept
    result = score_volume(hu, labels, SPACING)
    assert [lesion.slice_index for lesion in result.lesions] == [1]
    assert result.agatston_total == pytest.approx(1.0 * 4)
    looser = score_volume(hu, labels, SPACING, ScoringSettings(min_area_mm2=0.5))
    assert looser.agatston_total == pytest.approx((0.75 + 1.0) * 4)


def test_lesion_on_a_vessel_boundary_goes_to_the_majority_vessel():
    hu, labels = blank(vessel=0)
    hu[0, 4:7, 4:8] = 300  # 12 pixels
    labels[0, 4:7, 4:6] = RCA  # 6 pixels
    labels[0, 4:7, 6:7] = LAD  # 3 pixels
    labels[0, 4:7, 7:8] = RCA  # 3 more: RCA holds 9 of 12
    result = score_volume(hu, labels, SPACING)
    assert result.lesion_count == 1
    assert result.lesions[0].vessel == "rca"
    assert result.agatston_rca == pytest.approx(12 * 0.25 * 3) and result.agatston_lad == 0


def test_a_tie_between_vessels_goes_to_the_lower_label():
    hu, labels = blank(vessel=0)
    hu[0, 4:6, 4:8] = 300
    labels[0, 4:6, 4:6] = LCX
    labels[0, 4:6, 6:8] = LAD
    assert score_volume(hu, labels, SPACING).lesions[0].vessel == "lad"


def test_calcium_outside_the_coronary_labels_is_ignored():
    hu, labels = blank(vessel=0)
    hu[0, 2:5, 2:5] = 600
    labels[0, 2:5, 2:5] = 5  # not a coronary label value (e.g. "other calcium")
    hu[1, 2:5, 2:5] = 600  # label 0
    assert score_volume(hu, labels, SPACING).agatston_total == 0


def test_a_lesion_only_counts_voxels_inside_the_labels():
    hu, labels = blank(vessel=0)
    hu[0, 4:7, 4:7] = 400
    labels[0, 4:7, 4:6] = LM  # the third column of the block is outside every vessel
    result = score_volume(hu, labels, SPACING)
    assert result.lesions[0].voxel_count == 6
    assert result.agatston_lm == pytest.approx(6 * 0.25 * 4)


def test_lesions_do_not_connect_across_slices():
    hu, labels = blank()
    hu[0:2, 4:7, 4:7] = 400
    result = score_volume(hu, labels, SPACING)
    assert result.lesion_count == 2
    assert result.agatston_total == pytest.approx(2 * 9.0)


def test_increment_of_1_5_mm_halves_the_score_and_the_volume():
    hu, labels = blank()
    hu[1, 4:7, 4:7] = 400
    result = score_volume(hu, labels, (1.5, PIXEL, PIXEL))
    assert result.increment_scale == pytest.approx(0.5)
    assert result.agatston_total == pytest.approx(4.5)
    assert result.volume_mm3 == pytest.approx(9 * 0.25 * 1.5)


def test_thickness_is_recorded_but_the_increment_decides():
    hu, labels = blank()
    hu[1, 4:7, 4:7] = 400
    overlapping = score_volume(hu, labels, (1.5, PIXEL, PIXEL), slice_thickness_mm=3.0)
    assert overlapping.slice_thickness_mm == 3.0 and overlapping.slice_increment_mm == 1.5
    assert overlapping.agatston_total == pytest.approx(4.5)


def test_lesion_ids_follow_slice_then_vessel_then_position():
    hu, labels = blank(nz=2, vessel=0)
    labels[:, :, :8] = RCA
    labels[:, :, 8:] = LM
    for z, y, x in [(1, 2, 2), (0, 10, 2), (0, 2, 10), (0, 10, 10), (0, 2, 2)]:
        hu[z, y : y + 2, x : x + 2] = 300
    result = score_volume(hu, labels, SPACING, z_positions_mm=np.array([100.0, 103.0]))
    order = [(lesion.slice_index, lesion.vessel, lesion.lesion_id) for lesion in result.lesions]
    assert order == [(0, "lm", 1), (0, "lm", 2), (0, "rca", 3), (0, "rca", 4), (1, "rca", 5)]
    first_lm = result.lesions[0]
    assert first_lm.voxel_count == 4 and first_lm.z_mm == 100.0
    assert result.lesions[-1].z_mm == 103.0
    ids_lm = [(lesion.lesion_id, lesion.area_mm2) for lesion in result.lesions if lesion.vessel == "lm"]
    assert ids_lm == [(1, 1.0), (2, 1.0)]


def test_z_mm_defaults_to_index_times_increment():
    hu, labels = blank()
    hu[2, 4:7, 4:7] = 400
    assert score_volume(hu, labels, (2.5, PIXEL, PIXEL)).lesions[0].z_mm == pytest.approx(5.0)


# --- mass ---------------------------------------------------------------------------
#
# Integrated mass (docs/scoring.md, Mass score): per lesion, c x voxel volume x the sum
# of (HU - local background) over the voxels within the margin (1 mm) of its pixels on
# its slice and over the same footprint on the adjacent slice on each side; the
# background is the median of the ring 1-3 mm from its pixels. With 0.5 mm pixels a
# pixel lies within 1 mm of a 3 x 3 block when its row and column offsets (dy, dx)
# from the block satisfy dy^2 + dx^2 <= 4: the block (9), two rows or columns of 3
# beyond each side (24) and one pixel at each corner (4), 37 in all, 28 outside it.

C = 0.001  # mg HA per HU per mm^3
VOXEL_MM3 = PIXEL * PIXEL * 3.0  # 0.75 mm^3
BLOCK = (slice(10, 13), slice(10, 13))  # 3 x 3 pixels, clear of the border by more than 3 mm
IN_MARGIN, AROUND_BLOCK = 37, 28


def calibrated(**options):
    return ScoringSettings(mass_calibration_mg_per_hu_mm3=C, **options)


def distance_to_block_mm(shape=(24, 24), block=BLOCK):
    """Distance (mm) from each pixel centre to the nearest pixel centre of the block, brute force."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    by, bx = np.mgrid[block]
    d = np.hypot(rows[..., None] - by.ravel(), cols[..., None] - bx.ravel()) * PIXEL
    return d.min(axis=-1)


def test_pixel_counts_within_the_margin_of_a_block():
    d = distance_to_block_mm()
    assert (d <= 1.0).sum() == IN_MARGIN and ((d > 0) & (d <= 1.0)).sum() == AROUND_BLOCK


def test_uniform_block_on_a_zero_background_has_the_exact_mass():
    hu, labels = blank(ny=24, nx=24)
    hu[:] = 0.0
    hu[1][BLOCK] = 400
    volume = 9 * VOXEL_MM3  # 6.75 mm^3
    result = score_volume(hu, labels, SPACING, calibrated(mass_calibration_source="cli"))
    assert result.mass_mg == pytest.approx(C * 400 * volume)  # 2.7 mg: the margin and ring hold 0 HU
    assert result.lesions[0].mass_mg == pytest.approx(C * 400 * volume)
    assert result.lesions[0].mass_background_hu == 0
    assert (result.mass_method, result.mass_margin_mm, result.mass_ring_mm, result.mass_adjacent_slices) == (
        "integrated", 1.0, 2.0, 1)
    assert result.mass_calibration_source == "cli" and result.mass_calibration_mg_per_hu_mm3 == C
    threshold = score_volume(hu, labels, SPACING, calibrated(mass_method="threshold"))
    assert threshold.mass_mg == pytest.approx(C * 400 * volume)  # both definitions agree without blur
    assert threshold.mass_method == "threshold"
    assert (threshold.mass_margin_mm, threshold.mass_ring_mm, threshold.mass_adjacent_slices) == (None, None, None)
    assert threshold.lesions[0].mass_background_hu is None


def test_the_local_background_is_subtracted_not_water():
    hu, labels = blank(ny=24, nx=24)  # soft tissue at 40 HU
    hu[1][BLOCK] = 400
    volume = 9 * VOXEL_MM3
    for water_hu in (0.0, 30.0):  # the background, not the calibration's water, is the zero
        result = score_volume(hu, labels, SPACING, calibrated(mass_calibration_water_hu=water_hu))
        assert result.lesions[0].mass_background_hu == 40
        assert result.mass_mg == pytest.approx(C * (400 - 40) * volume)
    # The threshold definition keeps the calibration line's zero: c x (mean HU - water HU) x volume.
    threshold = score_volume(hu, labels, SPACING, calibrated(mass_method="threshold", mass_calibration_water_hu=30.0))
    assert threshold.mass_mg == pytest.approx(C * (400 - 30) * volume)


def test_blur_below_the_threshold_within_the_margin_is_counted():
    hu, labels = blank(ny=24, nx=24)
    hu[1, 9:14, 9:14] = 100  # a one-pixel halo of 100 HU (0.5-0.7 mm out), 16 pixels
    hu[1][BLOCK] = 400
    result = score_volume(hu, labels, SPACING, calibrated())
    assert result.mass_mg == pytest.approx(C * VOXEL_MM3 * (9 * (400 - 40) + 16 * (100 - 40)))
    threshold = score_volume(hu, labels, SPACING, calibrated(mass_method="threshold"))
    assert threshold.mass_mg == pytest.approx(C * VOXEL_MM3 * 9 * 400)  # the halo is lost


def test_the_background_is_the_median_of_the_ring_just_outside_the_margin():
    hu, labels = blank(ny=24, nx=24)
    d = distance_to_block_mm()
    hu[1][(d > 1.0) & (d <= 3.0)] = 60  # the ring
    hu[1][BLOCK] = 400
    result = score_volume(hu, labels, SPACING, calibrated())
    assert result.lesions[0].mass_background_hu == 60
    # The 28 pixels of the margin at 40 HU lie 20 HU below that background.
    assert result.mass_mg == pytest.approx(C * VOXEL_MM3 * (9 * (400 - 60) + AROUND_BLOCK * (40 - 60)))


def test_the_ring_and_the_region_leave_out_other_calcium():
    hu, labels = blank(ny=24, nx=24, vessel=0)
    labels[1][BLOCK] = LAD
    d = distance_to_block_mm()
    bone = (d > 0) & (np.mgrid[:24, :24][1] >= 10)  # 700 HU outside the coronary labels, right of the block
    hu[1][bone] = 700
    hu[1][BLOCK] = 400
    ring = (d > 1.0) & (d <= 3.0)
    assert np.median(hu[1][ring]) == 700  # most of the ring is bone: it must not be the background
    result = score_volume(hu, labels, SPACING, calibrated())
    assert result.lesion_count == 1 and result.lesions[0].mass_background_hu == 40
    # Bone pixels within the margin are not calcium of this lesion either; the others are 40 HU.
    assert result.mass_mg == pytest.approx(C * VOXEL_MM3 * 9 * (400 - 40))


def test_neighbouring_lesions_share_the_blur_between_them_without_double_counting():
    hu, labels = blank(ny=24, nx=24)
    hu[1, 10:12, 6:8] = 400  # lesion A, 2 x 2 pixels (1 mm^2)
    hu[1, 10:12, 11:13] = 400  # lesion B, three pixels (1.5 mm) to the right
    hu[1, 10:12, 8:11] = 100  # blur between them: 6 pixels, each within 1 mm of A, of B, or both
    result = score_volume(hu, labels, SPACING, calibrated())
    assert result.lesion_count == 2
    assert [lesion.mass_background_hu for lesion in result.lesions] == [40, 40]
    assert result.mass_mg == pytest.approx(C * VOXEL_MM3 * (8 * (400 - 40) + 6 * (100 - 40)))
    # Column 8 is nearer A, column 10 nearer B; column 9 is as near to both and goes to one of them.
    own, shared = C * VOXEL_MM3 * (4 * 360 + 2 * 60), C * VOXEL_MM3 * 2 * 60
    masses = sorted(lesion.mass_mg for lesion in result.lesions)
    assert masses == pytest.approx([own, own + shared])


def test_through_plane_partial_volume_on_the_adjacent_slices_is_counted():
    hu, labels = blank(nz=5, ny=24, nx=24)
    hu[1][BLOCK] = 100  # the ends of the calcification, below the threshold
    hu[2][BLOCK] = 400
    hu[3][BLOCK] = 100
    hu[0][BLOCK] = 100  # two slices away: outside the lesion's reach for contiguous slices
    result = score_volume(hu, labels, SPACING, calibrated(), slice_thickness_mm=3.0)
    assert result.lesion_count == 1 and result.mass_adjacent_slices == 1
    assert result.mass_mg == pytest.approx(C * VOXEL_MM3 * (9 * 360 + 2 * 9 * 60))
    # 3 mm slices every 1.5 mm: the slices within one thickness (two on each side) count.
    overlapping = score_volume(hu, labels, (1.5, PIXEL, PIXEL), calibrated(), slice_thickness_mm=3.0)
    assert overlapping.mass_adjacent_slices == 2
    assert overlapping.mass_mg == pytest.approx(C * PIXEL * PIXEL * 1.5 * (9 * 360 + 3 * 9 * 60))


def test_an_adjacent_slice_with_its_own_lesion_is_not_counted_twice():
    hu, labels = blank(nz=5, ny=24, nx=24)
    hu[1][BLOCK] = 100
    hu[2][BLOCK] = 400
    hu[3][BLOCK] = 200  # a lesion of its own
    result = score_volume(hu, labels, SPACING, calibrated())
    assert [lesion.slice_index for lesion in result.lesions] == [2, 3]
    first, second = (lesion.mass_mg for lesion in result.lesions)
    assert first == pytest.approx(C * VOXEL_MM3 * (9 * 360 + 9 * 60))  # its slice and slice 1
    assert second == pytest.approx(C * VOXEL_MM3 * 9 * 160)  # its slice; slice 4 holds nothing
    # A slice between two lesions goes to the lower one.
    hu[3][BLOCK] = 400
    hu[1][BLOCK] = 400
    hu[2][BLOCK] = 100
    tie = score_volume(hu, labels, SPACING, calibrated())
    assert [lesion.slice_index for lesion in tie.lesions] == [1, 3]
    assert [lesion.mass_mg for lesion in tie.lesions] == pytest.approx(
        [C * VOXEL_MM3 * (9 * 360 + 9 * 60), C * VOXEL_MM3 * 9 * 360]
    )


@pytest.mark.parametrize(
    "increment, thickness, slices", [(3.0, 3.0, 1), (3.0, None, 1), (1.5, 3.0, 2), (1.0, 3.0, 3), (3.0, 1.0, 1)]
)
def test_adjacent_slices_cover_one_slice_thickness(increment, thickness, slices):
    assert adjacent_slices(increment, thickness) == slices


def test_a_lesion_never_has_a_negative_mass():
    hu, labels = blank(ny=24, nx=24)
    d = distance_to_block_mm()
    hu[1][(d > 0) & (d <= 1.0)] = -500  # e.g. lung or air right next to a faint spot
    hu[1][BLOCK] = 140
    result = score_volume(hu, labels, SPACING, calibrated())
    assert 9 * (140 - 40) + AROUND_BLOCK * (-500 - 40) < 0
    assert result.lesions[0].mass_mg == 0 and result.mass_mg == 0


def test_the_background_is_never_below_the_calibrations_water():
    hu, labels = blank(ny=24, nx=24)
    d = distance_to_block_mm()
    hu[1][d > 1.0] = -100  # fat around a vessel wall of 40 HU
    hu[1][BLOCK] = 400
    result = score_volume(hu, labels, SPACING, calibrated(mass_calibration_water_hu=0.0))
    assert result.lesions[0].mass_background_hu == 0
    assert result.mass_mg == pytest.approx(C * VOXEL_MM3 * (9 * 400 + AROUND_BLOCK * 40))


def blurred_disc(n=48, diameter_mm=3.0, height_hu=400.0, sigma_mm=0.65, supersample=8):
    """A disc blurred by a Gaussian point spread (sigma 0.65 mm, as measured on the QRM scan).

    Returns the image and the disc's exact area in pixels (supersampled coverage).
    """
    y, x = np.mgrid[0 : n * supersample, 0 : n * supersample]
    centre = (n - 1) / 2 + 0.3  # off the pixel grid
    inside = np.hypot((y + 0.5) / supersample - 0.5 - centre, (x + 0.5) / supersample - 0.5 - centre)
    coverage = (inside * PIXEL <= diameter_mm / 2).reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    return height_hu * ndimage.gaussian_filter(coverage, sigma_mm / PIXEL, mode="constant"), coverage.sum()


def test_integrated_mass_of_a_blurred_calcification_is_nearly_exact():
    image, area_px = blurred_disc()
    exact = C * 400 * area_px * VOXEL_MM3
    hu = np.full((3, 48, 48), 70.0, dtype=np.float32)  # a background that is not water
    hu[1] += image
    labels = np.full(hu.shape, LAD, dtype=np.int16)
    # Beyond the 130 HU contour (outside the disc's edge here) plus 1 mm = 1.5 sigma, a
    # Gaussian-blurred edge of height H holds H x sigma x (phi(1.5) - 1.5 Q(1.5)) = 0.029 sigma H
    # per mm of edge, about 2.5 % of a 3 mm disc's H x area: the integrated mass keeps 97.5 %.
    integrated = score_volume(hu, labels, SPACING, calibrated(mass_calibration_water_hu=30.0))
    assert integrated.lesion_count == 1
    assert integrated.mass_mg == pytest.approx(exact, rel=0.025)
    # The threshold definition loses the blur below 130 HU and counts the 70 HU base above water.
    threshold = score_volume(hu, labels, SPACING, calibrated(mass_calibration_water_hu=30.0, mass_method="threshold"))
    assert abs(threshold.mass_mg / exact - 1) > 0.05


def test_integrated_mass_is_unbiased_in_correlated_noise():
    image, area_px = blurred_disc()
    exact = C * 400 * area_px * VOXEL_MM3
    rows, cols = np.mgrid[:48, :48]
    labels = np.zeros((3, 48, 48), dtype=np.int16)
    labels[:, np.hypot(rows - 23.8, cols - 23.8) * PIXEL <= 3.0] = LAD  # a label around the calcification
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(100):
        noise = ndimage.gaussian_filter(rng.normal(0, 1, (3, 48, 48)), (0, 1.0, 1.0))  # 0.5 mm correlation
        hu = (70.0 + noise * 20 / noise.std()).astype(np.float32)
        hu[1] += image
        errors.append(score_volume(hu, labels, SPACING, calibrated(mass_calibration_water_hu=30.0)).mass_mg / exact - 1)
    # About 11 % per scan at 20 HU noise, so the mean of 100 is known to about 1.1 %.
    assert abs(np.mean(errors)) < 0.035


def test_mass_methods_are_checked():
    with pytest.raises(ValueError, match="mass_method"):
        ScoringSettings(mass_method="mean")
    with pytest.raises(ValueError, match="mass_margin_mm"):
        ScoringSettings(mass_margin_mm=-1)
    with pytest.raises(ValueError, match="mass_ring_mm"):
        ScoringSettings(mass_ring_mm=0)


def test_threshold_mass_uses_each_lesions_own_mean():
    hu, labels = blank()
    hu[0, 2:4, 2:4] = 200  # 1 mm^2 at 200 HU
    hu[1, 2:4, 2:6] = 500  # 2 mm^2 at 500 HU
    c = 0.0007
    settings_ = ScoringSettings(mass_calibration_mg_per_hu_mm3=c, mass_method="threshold")
    result = score_volume(hu, labels, SPACING, settings_)
    assert result.mass_mg == pytest.approx(c * (200 * 1.0 * 3 + 500 * 2.0 * 3))


def test_an_empty_scan():
    hu, labels = blank()
    result = score_volume(hu, labels, SPACING, ScoringSettings(mass_calibration_mg_per_hu_mm3=0.001))
    assert (result.agatston_total, result.volume_mm3, result.mass_mg, result.lesion_count) == (0, 0, 0, 0)
    assert (result.risk_category, result.cac_drs, result.lesions) == ("0", "A0", [])


def test_settings_and_geometry_are_recorded():
    hu, labels = blank()
    result = score_volume(hu, labels, (2.0, 0.4, 0.45), ScoringSettings(min_area_mm2=2.0), kvp=100)
    assert result.threshold_hu == 130 and result.kvp_adjusted is False and result.kvp == 100
    assert result.min_area_mm2 == 2.0 and result.slice_increment_mm == 2.0
    assert result.increment_scale == pytest.approx(2 / 3)


def test_to_dict_is_json_ready():
    hu, labels = blank()
    hu[1, 4:7, 4:7] = 400
    result = score_volume(hu, labels, SPACING, ScoringSettings(mass_calibration_mg_per_hu_mm3=0.001))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["agatston_total"] == 9.0 and data["lesions"][0]["vessel"] == "lad"
    assert "lesions" in data and data["lesions"][0]["lesion_id"] == 1


def test_score_wraps_a_volume():
    hu, labels = blank()
    hu[1, 4:7, 4:7] = 400
    volume = Volume(hu=hu, spacing_mm=SPACING, slice_thickness_mm=3.0, z_positions_mm=np.array([7.0, 10.0, 13.0]))
    result = score(volume, labels)
    assert result.agatston_total == pytest.approx(9.0)
    assert result.lesions[0].z_mm == 10.0 and result.slice_thickness_mm == 3.0


def test_mismatched_shapes_are_rejected():
    hu, labels = blank()
    with pytest.raises(ValueError, match="shape"):
        score_volume(hu, labels[:, :-1], SPACING)


# --- density weights and kVp adjustment ------------------------------------------


@pytest.mark.parametrize(
    "peak, weight",
    [(129.9, 0), (130, 1), (199.9, 1), (200, 2), (299.9, 2), (300, 3), (399.9, 3), (400, 4), (2000, 4)],
)
def test_standard_density_weights(peak, weight):
    assert density_weight(peak) == weight
    assert density_weight(peak, kvp=80) == weight  # kVp is ignored unless adjustment is asked for


@pytest.mark.parametrize(
    "kvp, peak, weight",
    [
        (120, 130, 1), (120, 199.9, 1), (120, 200, 2), (120, 400, 4),  # same as the standard
        (100, 144.9, 0), (100, 145, 1), (100, 222, 1), (100, 223, 2), (100, 334, 2),
        (100, 335, 3), (100, 446, 3), (100, 447, 4),
        (70, 206, 0), (70, 207, 1), (70, 637, 4), (70, 636, 3),
        (135, 119, 1), (135, 365, 4),
    ],
)
def test_kvp_adjusted_weights_at_tabulated_voltages(kvp, peak, weight):
    assert density_weight(peak, kvp=kvp, adjusted=True) == weight


def test_kvp_levels_interpolate_between_and_clamp_outside_the_table():
    # 90 kVp lies halfway between 80 (177/271/408/544) and 100 (145/222/334/446).
    threshold, cutoffs = kvp_adjusted_levels(90)
    assert threshold == pytest.approx((177 + 145) / 2)
    assert cutoffs == pytest.approx(((271 + 222) / 2 + 1, (408 + 334) / 2 + 1, (544 + 446) / 2 + 1))
    assert kvp_adjusted_levels(140) == kvp_adjusted_levels(135)
    assert kvp_adjusted_levels(60) == kvp_adjusted_levels(70)
    assert kvp_adjusted_levels(120) == (130, (200, 300, 400))


def test_kvp_adjusted_scoring_changes_threshold_and_weights_and_records_it():
    hu, labels = blank()
    hu[0, 2:5, 2:5] = 140  # above 130 but below the 145 HU threshold at 100 kVp
    hu[1, 2:5, 2:5] = 220  # weight 2 at 120 kVp, weight 1 at 100 kVp (cut-off 222)
    adjusted = ScoringSettings(kvp_adjusted_thresholds=True)
    at_100 = score_volume(hu, labels, SPACING, adjusted, kvp=100)
    assert (at_100.threshold_hu, at_100.kvp_adjusted, at_100.kvp) == (145, True, 100)
    assert at_100.lesion_count == 1 and at_100.agatston_total == pytest.approx(9 * 0.25 * 1)
    standard = score_volume(hu, labels, SPACING, kvp=100)
    assert (standard.threshold_hu, standard.kvp_adjusted) == (130, False)
    assert standard.agatston_total == pytest.approx(9 * 0.25 * (1 + 2))
    no_kvp = score_volume(hu, labels, SPACING, adjusted)
    assert (no_kvp.threshold_hu, no_kvp.kvp_adjusted) == (130, False)


def test_a_custom_threshold_below_130_adds_volume_but_no_agatston():
    hu, labels = blank()
    hu[0, 2:5, 2:5] = 120
    result = score_volume(hu, labels, SPACING, ScoringSettings(threshold_hu=100))
    assert result.lesion_count == 1 and result.lesions[0].density_weight == 0
    assert result.agatston_total == 0 and result.volume_mm3 == pytest.approx(9 * 0.25 * 3)


# --- categories ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, category",
    [(0, "0"), (0.1, "1-10"), (1, "1-10"), (10, "1-10"), (10.01, "11-100"), (10.5, "11-100"),
     (100, "11-100"), (100.5, "101-400"), (400, "101-400"), (400.01, ">400"), (5000, ">400")],
)
def test_risk_category_boundaries(total, category):
    assert risk_category(total) == category


@pytest.mark.parametrize(
    "total, vessels, grade",
    [(0, 0, "A0"), (0.5, 1, "A1/N1"), (99.99, 2, "A1/N2"), (100, 3, "A2/N3"), (299.99, 1, "A2/N1"),
     (300, 4, "A3/N4"), (400, 2, "A3/N2")],
)
def test_cac_drs_boundaries(total, vessels, grade):
    assert cac_drs(total, vessels) == grade


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_categories_reject_impossible_scores(bad):
    with pytest.raises(ValueError):
        risk_category(bad)
    with pytest.raises(ValueError):
        cac_drs(bad, 1)


def test_cac_drs_counts_vessels_with_calcium():
    hu, labels = blank(vessel=0)
    labels[0, :, :8], labels[0, :, 8:] = LAD, RCA
    hu[0, 2:12, 1:7] = 450  # LAD: 60 px = 15 mm^2 -> 60
    hu[0, 2:12, 9:15] = 450  # RCA: 60
    result = score_volume(hu, labels, SPACING)
    assert result.agatston_total == pytest.approx(120)
    assert (result.risk_category, result.cac_drs) == ("101-400", "A2/N2")


# --- properties -----------------------------------------------------------------------

BOX = st.tuples(
    st.integers(0, 2),  # z
    st.integers(2, 9), st.integers(2, 9),  # y, x
    st.integers(1, 4), st.integers(1, 4),  # height, width
    st.floats(130, 900),  # HU
)
LABEL_BOX = st.tuples(st.integers(0, 2), st.integers(2, 9), st.integers(2, 9), st.integers(1, 6),
                      st.integers(1, 6), st.integers(1, 5))


@st.composite
def scans(draw):
    """A 3 x 16 x 16 scan with calcium boxes and vessel-label boxes, with a free border."""
    hu = np.full((3, 16, 16), 30.0, dtype=np.float32)
    labels = np.zeros((3, 16, 16), dtype=np.int16)
    for z, y, x, h, w, value in draw(st.lists(LABEL_BOX, max_size=5)):
        labels[z, y : y + h, x : x + w] = value
    for z, y, x, h, w, value in draw(st.lists(BOX, max_size=6)):
        hu[z, y : y + h, x : x + w] = value
    labels[draw(st.integers(0, 2))] = draw(st.integers(1, 4))  # some slice always inside a vessel
    return hu, labels


def summary(result):
    return (round(result.agatston_total, 6), round(result.volume_mm3, 6), result.lesion_count)


def reference_agatston(hu, labels, pixel_mm, increment, min_area=1.0):
    """Slice-by-slice loop over components, written independently of score_volume."""
    total = 0.0
    for z in range(hu.shape[0]):
        mask = (hu[z] >= 130) & (labels[z] >= 1) & (labels[z] <= 4)
        components, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            pixels = components == k
            area = pixels.sum() * pixel_mm * pixel_mm
            if area < min_area:
                continue
            peak = hu[z][pixels].max()
            weight = 4 if peak >= 400 else 3 if peak >= 300 else 2 if peak >= 200 else 1
            total += area * weight * increment / 3.0
    return total


@settings(max_examples=60, deadline=None)
@given(scans())
def test_matches_an_independent_per_slice_implementation(scan):
    hu, labels = scan
    assert score_volume(hu, labels, SPACING).agatston_total == pytest.approx(
        reference_agatston(hu, labels, PIXEL, 3.0)
    )


@settings(max_examples=40, deadline=None)
@given(scans(), st.integers(-2, 2), st.integers(-2, 2), st.integers(0, 2))
def test_translation_invariance(scan, dy, dx, dz):
    hu, labels = scan
    padded_hu = np.pad(hu, ((0, 2), (0, 0), (0, 0)), constant_values=30.0)
    padded_labels = np.pad(labels, ((0, 2), (0, 0), (0, 0)))
    moved_hu = np.roll(padded_hu, (dz, dy, dx), axis=(0, 1, 2))  # the 2-pixel border keeps content inside
    moved_labels = np.roll(padded_labels, (dz, dy, dx), axis=(0, 1, 2))
    assert summary(score_volume(moved_hu, moved_labels, SPACING)) == summary(score_volume(hu, labels, SPACING))


@settings(max_examples=40, deadline=None)
@given(scans(), st.integers(0, 2**32 - 1))
def test_sub_threshold_noise_changes_nothing(scan, seed):
    hu, labels = scan
    noisy = hu.copy()
    below = noisy < 130
    noisy[below] = np.random.default_rng(seed).uniform(-1000, 129.99, size=int(below.sum()))
    assert score_volume(noisy, labels, SPACING).to_dict() == score_volume(hu, labels, SPACING).to_dict()


@settings(max_examples=40, deadline=None)
@given(scans())
def test_half_increment_with_twice_the_slices_keeps_the_score(scan):
    hu, labels = scan
    fine = score_volume(np.repeat(hu, 2, axis=0), np.repeat(labels, 2, axis=0), (1.5, PIXEL, PIXEL))
    coarse = score_volume(hu, labels, SPACING)
    assert fine.agatston_total == pytest.approx(coarse.agatston_total, rel=1e-9, abs=1e-9)
    assert fine.volume_mm3 == pytest.approx(coarse.volume_mm3, rel=1e-9, abs=1e-9)
    assert fine.lesion_count == 2 * coarse.lesion_count


@settings(max_examples=40, deadline=None)
@given(scans(), st.permutations([1, 2, 3, 4]))
def test_relabelling_vessels_keeps_totals(scan, permutation):
    hu, labels = scan
    mapping = np.array([0, *permutation, 5])
    relabelled = score_volume(hu, mapping[labels], SPACING)
    original = score_volume(hu, labels, SPACING)
    assert summary(relabelled) == summary(original)
    def shapes(result):
        return sorted((lesion.slice_index, lesion.voxel_count, lesion.peak_hu) for lesion in result.lesions)

    assert shapes(relabelled) == shapes(original)


@settings(max_examples=30, deadline=None)
@given(scans())
def test_mirroring_the_image_keeps_totals(scan):
    hu, labels = scan
    assert summary(score_volume(hu[:, :, ::-1], labels[:, :, ::-1], SPACING)) == summary(
        score_volume(hu, labels, SPACING)
    )


def test_a_clinical_size_volume_scores_in_well_under_half_a_second():
    rng = np.random.default_rng(1)
    hu = rng.normal(40, 20, (60, 512, 512)).astype(np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 150:350, 150:350] = rng.integers(1, 5, size=(60, 1, 1), dtype=np.uint8)
    for _ in range(300):
        z, y, x = rng.integers(0, 60), rng.integers(150, 340), rng.integers(150, 340)
        hu[z, y : y + 5, x : x + 5] = rng.uniform(130, 900)
    best = min(_timed(score_volume, hu, labels, (3.0, 0.4, 0.4)) for _ in range(3))
    assert best < 0.5
    # With the integrated mass (windows around each of the ~300 lesions).
    calibrated_settings = ScoringSettings(mass_calibration_mg_per_hu_mm3=0.0007)
    best = min(_timed(score_volume, hu, labels, (3.0, 0.4, 0.4), calibrated_settings) for _ in range(3))
    assert best < 0.5


def _timed(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


# --- NIfTI I/O and the agatston command -------------------------------------------------


def test_nifti_save_load_round_trip(tmp_path):
    array = np.random.default_rng(2).normal(0, 100, (4, 5, 6)).astype(np.float32)
    z = 534.875 + 2.5 * np.arange(4)
    save_nifti(array, (2.5, 0.488, 0.5), tmp_path / "ct.nii.gz", z_positions_mm=z)
    volume = load_nifti(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(volume.hu, array)
    assert volume.spacing_mm == (2.5, 0.488, 0.5)
    np.testing.assert_allclose(volume.z_positions_mm, z)


def test_nifti_load_reorients_ras_data_and_applies_the_scaling(tmp_path):
    stored = np.zeros((6, 5, 4), dtype=np.int16)  # RAS+ index order (x, y, z)
    stored[0, 0, 0] = 700  # most left, most posterior, most inferior voxel
    image = nib.Nifti1Image(stored, np.diag([0.7, 0.6, 3.0, 1.0]))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "ras.nii")
    volume = load_nifti(tmp_path / "ras.nii")
    assert volume.hu.shape == (4, 5, 6) and volume.spacing_mm == (3.0, 0.6, 0.7)
    # Canonical x grows towards the patient's left, y towards posterior: the last column and row.
    assert volume.hu[0, 4, 5] == 2 * 700 - 1024
    assert volume.hu[1, 0, 0] == -1024


def test_agatston_command_prints_scores_settings_and_lesions(tmp_path, capsys):
    hu, labels = blank()
    hu[1, 4:7, 4:7] = 400
    save_nifti(hu, SPACING, tmp_path / "ct.nii.gz")
    save_nifti(labels, SPACING, tmp_path / "labels.nii.gz")
    code = cli.main(["agatston", "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                     "--mass-calibration", "0.001", "--kvp", "120"])
    output = json.loads(capsys.readouterr().out)
    assert code == 0
    assert output["agatston_total"] == pytest.approx(9.0) and output["agatston_lad"] == pytest.approx(9.0)
    assert output["mass_mg"] == pytest.approx(0.001 * (400 - 40) * 6.75)  # integrated, 40 HU background
    assert output["mass_method"] == "integrated" and output["lesions"][0]["mass_background_hu"] == 40
    assert output["mass_calibration_source"] == "cli" and output["kvp"] == 120
    assert output["risk_category"] == "1-10" and output["cac_drs"] == "A1/N1"
    assert output["threshold_hu"] == 130 and output["min_area_mm2"] == 1.0
    assert [lesion["vessel"] for lesion in output["lesions"]] == ["lad"]
    assert set(VESSEL_LABELS.values()) <= {key.removeprefix("agatston_") for key in output}
    code = cli.main(["agatston", "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                     "--mass-calibration", "0.001", "--mass-water-hu", "30", "--mass-method", "threshold"])
    output = json.loads(capsys.readouterr().out)
    assert code == 0 and output["mass_method"] == "threshold"
    assert output["mass_mg"] == pytest.approx(0.001 * (400 - 30) * 6.75)


def test_agatston_command_rejects_label_volumes_of_another_shape(tmp_path, capsys):
    hu, labels = blank()
    save_nifti(hu, SPACING, tmp_path / "ct.nii.gz")
    save_nifti(labels[:, :-2], SPACING, tmp_path / "labels.nii.gz")
    code = cli.main(["agatston", "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz")])
    assert code == 2
    assert "differs from CT shape" in capsys.readouterr().err


def test_agatston_range_by_hand():
    """0.5 x 0.5 mm pixels, 3 mm slices (scale 1). Sure LAD lesion: 8 pixels = 2 mm^2 at
    peak 450 (weight 4) -> 8. Unsure counted RCA lesion: 4 pixels = 1 mm^2 at 250 (w 2)
    -> 2. Unsure uncounted lesion: 12 pixels = 3 mm^2 at 150 (w 1) -> 3. The range is
    8 (both unsure ones out) to 13 (both in); the model's own total is 10."""
    from cacflow.scoring import agatston_range

    hu = np.zeros((2, 20, 20))
    labels = np.zeros(hu.shape, dtype=np.uint8)
    flipped = np.zeros(hu.shape, dtype=np.uint8)
    hu[0, 2:4, 2:6] = 450.0
    labels[0, 2:4, 2:6] = flipped[0, 2:4, 2:6] = 2
    hu[0, 10:12, 10:12] = 250.0
    labels[0, 10:12, 10:12] = 4  # counted; flipped: out
    hu[1, 5:8, 5:9] = 150.0
    flipped[1, 5:8, 5:9] = 3  # not counted; flipped: LCX
    spacing = (3.0, 0.5, 0.5)
    assert score_volume(hu, labels, spacing).agatston_total == pytest.approx(10.0)
    assert agatston_range(hu, labels, flipped, spacing) == pytest.approx((8.0, 13.0))
    assert agatston_range(hu, labels, labels, spacing) == pytest.approx((10.0, 10.0))
    with pytest.raises(ValueError, match="flipped labels shape"):
        agatston_range(hu, labels, flipped[:1], spacing)
