"""Mass calibration from phantom rods, and the physical check on the real QRM phantom."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf

from cacflow import cli
from cacflow.calibration import (
    CCI_DENSITY_MG_CM3,
    CCI_DIAMETER_MM,
    CCI_RADIAL_FRACTION,
    _insert_labels,
    calibrate_volume,
    measure_inserts,
    measure_phantom_inserts,
)
from cacflow.scoring import ScoringSettings, score_volume
from cacflow.volume import Volume
from shared_data import PHANTOM_DIR, PHANTOM_REFERENCE_CSV, SHARED_DATA

PIXEL_MM = 0.5
ROD_HU, WATER_HU, BODY_HU = 310.0, 30.0, 60.0
ROD_RADIUS_MM = 6.0
ROD_CENTRE = (64.0, 64.0)  # (row, column)
WATER_CENTRE = (64.0, 92.0)  # 14 mm to the right of the HA rod


def _disc(shape, centre, radius_mm):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return np.hypot(rows - centre[0], cols - centre[1]) * PIXEL_MM <= radius_mm


def rod_phantom(water_rod=True, seed=0):
    """A 28 mm body with an HA rod and a water-equivalent rod on slices 3-9 of 12.

    Slice 3 holds only half the rods (through-plane partial volume) and slice 9
    is shaded 60 HU darker overall, as at the end of a real phantom.
    """
    shape = (12, 128, 128)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = _disc(shape[1:], ROD_CENTRE, 28.0)
    rod, water = _disc(shape[1:], ROD_CENTRE, ROD_RADIUS_MM), _disc(shape[1:], WATER_CENTRE, ROD_RADIUS_MM)
    for z in range(shape[0]):
        hu[z][body] = BODY_HU
        if 3 <= z <= 9:
            share = 0.5 if z == 3 else 1.0
            hu[z][rod] = BODY_HU + share * (ROD_HU - BODY_HU)
            if water_rod:
                hu[z][water] = BODY_HU + share * (WATER_HU - BODY_HU)
    hu[9][body] -= 60.0
    hu += np.random.default_rng(seed).normal(0, 8, shape).astype(np.float32)
    return Volume(hu=hu, spacing_mm=(3.0, PIXEL_MM, PIXEL_MM))


def test_finds_both_rods_and_derives_c():
    calibration = calibrate_volume(rod_phantom())
    expected = 0.2 / (ROD_HU - WATER_HU)  # 200 mg/cm^3 = 0.2 mg/mm^3
    assert calibration.mg_per_hu_mm3 == pytest.approx(expected, rel=0.01)
    assert calibration.rod_hu == pytest.approx(ROD_HU, abs=1.5)
    assert calibration.water_hu == pytest.approx(WATER_HU, abs=1.5)
    assert (calibration.rod_roi.centre_y_px, calibration.rod_roi.centre_x_px) == pytest.approx(ROD_CENTRE, abs=0.5)
    assert (calibration.water_roi.centre_y_px, calibration.water_roi.centre_x_px) == pytest.approx(
        WATER_CENTRE, abs=1.0
    )
    assert calibration.water_roi.kind == "water-equivalent rod"
    assert calibration.rod_roi.slices == [4, 5, 6, 7, 8]  # not the partial slice 3, not the shaded slice 9
    assert calibration.rod_roi.radius_mm < ROD_RADIUS_MM


def test_rod_density_scales_c():
    assert calibrate_volume(rod_phantom(), rod_density_mg_cm3=400).mg_per_hu_mm3 == pytest.approx(
        0.4 / (ROD_HU - WATER_HU), rel=0.01
    )


def test_without_a_water_rod_the_body_is_the_water_reference():
    calibration = calibrate_volume(rod_phantom(water_rod=False))
    assert calibration.water_roi.kind == "phantom body around the HA rod"
    assert calibration.water_hu == pytest.approx(BODY_HU, abs=1.5)
    assert calibration.mg_per_hu_mm3 == pytest.approx(0.2 / (ROD_HU - BODY_HU), rel=0.01)


def test_given_rod_and_water_positions_are_used():
    calibration = calibrate_volume(
        rod_phantom(), rod_centre_yx=ROD_CENTRE, rod_radius_mm=ROD_RADIUS_MM, water_centre_yx=WATER_CENTRE
    )
    assert calibration.mg_per_hu_mm3 == pytest.approx(0.2 / (ROD_HU - WATER_HU), rel=0.01)
    assert calibration.rod_roi.slices == [4, 5, 6, 7, 8]
    assert calibration.rod_roi.radius_mm == pytest.approx(0.6 * ROD_RADIUS_MM)
    with pytest.raises(ValueError, match="both"):
        calibrate_volume(rod_phantom(), rod_centre_yx=ROD_CENTRE)


def test_scoring_settings_carry_the_calibration():
    calibration = calibrate_volume(rod_phantom(), source="phantom:test")
    settings = calibration.scoring_settings(ScoringSettings(min_area_mm2=2.0))
    assert settings.mass_calibration_mg_per_hu_mm3 == calibration.mg_per_hu_mm3
    assert settings.mass_calibration_water_hu == calibration.water_hu
    assert settings.mass_calibration_source == "phantom:test" and settings.min_area_mm2 == 2.0
    assert json.loads(json.dumps(calibration.to_dict()))["rod_roi"]["kind"] == "hydroxyapatite rod"


def cci_phantom(c=0.0007, water_hu=0.0):
    """Noise-free QRM-like insert: nine HA cylinders in water, 1 mm slices, 0.5 mm pixels.

    An insert voxel holds HA at its nominal density, so its HU is water + density / c
    and its exact mass is density x (voxels x voxel volume).
    """
    shape = (9, 200, 200)
    hu = np.full(shape, water_hu, dtype=np.float32)
    centre = np.array([100.0, 100.0])
    exact = {}
    for angle, density in zip((90.0, 210.0, 330.0), CCI_DENSITY_MG_CM3):
        direction = np.array([math.sin(math.radians(angle)), math.cos(math.radians(angle))])
        for size, diameter in CCI_DIAMETER_MM.items():
            # On a pixel centre, so even the 1 mm insert covers 5 pixels (1.25 mm^2).
            where = np.round(centre + CCI_RADIAL_FRACTION[size] * 36.0 / PIXEL_MM * direction)
            disc = _disc(shape[1:], where, diameter / 2)
            slices = range(4 - int(diameter) // 2, 4 + int(diameter) // 2 + 1)  # length = diameter
            value = water_hu + CCI_DENSITY_MG_CM3[density] / 1000.0 / c
            for z in slices:
                hu[z][disc] = value
            exact[(size, density)] = CCI_DENSITY_MG_CM3[density] / 1000.0 * disc.sum() * len(slices) * 0.25
    return Volume(hu=hu, spacing_mm=(1.0, PIXEL_MM, PIXEL_MM)), exact


@pytest.mark.parametrize("method", ["integrated", "threshold"])
@pytest.mark.parametrize("water_hu", [0.0, 35.0])
def test_insert_masses_are_exact_without_blur(water_hu, method):
    volume, exact = cci_phantom(water_hu=water_hu)
    settings = ScoringSettings(
        mass_calibration_mg_per_hu_mm3=0.0007, mass_calibration_water_hu=water_hu, mass_method=method
    )
    rows = measure_inserts(volume, settings, reference=exact)
    assert [row["insert"] for row in rows] == [
        f"{size}-{density}" for density in CCI_DENSITY_MG_CM3 for size in CCI_DIAMETER_MM
    ]
    for row in rows:
        assert row["detected"], row["insert"]
        assert row["mass_method"] == method
        assert row["mass_error_pct"] == pytest.approx(0.0, abs=1e-3), row["insert"]
        assert row["threshold_mass_error_pct"] == pytest.approx(0.0, abs=1e-3), row["insert"]


def test_inserts_need_a_calibration():
    volume, _ = cci_phantom()
    with pytest.raises(ValueError, match="calibration"):
        measure_inserts(volume, ScoringSettings())


# --- the real QRM phantom (Canon Aquilion ONE, 120 kVp, 3 mm) ----------------------------

PHANTOM, REFERENCE_CSV = PHANTOM_DIR, PHANTOM_REFERENCE_CSV
MOLLOILAB_C = 0.000722  # derived by the MolloiLab software on the same scan


@pytest.fixture(scope="module")
def phantom_inserts():
    if not (PHANTOM.is_dir() and REFERENCE_CSV.is_file()):
        pytest.skip(f"the real QRM phantom scan and reference are not at {SHARED_DATA}")
    return {row["insert"]: row for row in measure_phantom_inserts(PHANTOM, REFERENCE_CSV)}


def test_phantom_calibration_agrees_with_molloilab(capsys):
    if not PHANTOM.is_dir():
        pytest.skip(f"the real QRM phantom scan is not at {PHANTOM}")
    assert cli.main(["calibrate", str(PHANTOM)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mg_per_hu_mm3"] == pytest.approx(MOLLOILAB_C, rel=0.02)
    assert result["water_roi"]["kind"] == "water-equivalent rod"
    assert result["source"] == f"phantom:{PHANTOM}"
    assert 250 < result["rod_hu"] - result["water_hu"] < 300


def test_phantom_agatston_agrees_with_molloilab(phantom_inserts):
    with open(REFERENCE_CSV, newline="") as handle:
        for row in csv.DictReader(handle):
            density = row["inserts"].split()[0].lower()
            for size in CCI_DIAMETER_MM:
                theirs = float(row[f"calculated_agat_{size}"])
                ours = phantom_inserts[f"{size}-{density}"]["agatston"]
                assert ours == pytest.approx(theirs, rel=0.03, abs=0.01), f"{size}-{density}"


def test_phantom_large_and_medium_inserts_are_found(phantom_inserts):
    for size in ("large", "medium"):
        for density in CCI_DENSITY_MG_CM3:
            assert phantom_inserts[f"{size}-{density}"]["detected"], f"{size}-{density}"


def test_integrated_mass_is_closer_to_physical_than_the_conventional_mass(phantom_inserts):
    for size in ("large", "medium"):
        for density in CCI_DENSITY_MG_CM3:
            row = phantom_inserts[f"{size}-{density}"]
            assert row["mass_method"] == "integrated"
            assert abs(row["mass_error_pct"]) < abs(row["conventional_mass_error_pct"]), row["insert"]


# Integrated mass (docs/scoring.md, "Phantom validation"): on this scan five of the six
# large and medium inserts are within 10 %; medium-medium measures +16.3 %, and +10.8 to
# +24.4 % under every margin (0.5-1.5 mm), ring (1-3 mm) and through-plane variant tried.
# Synthetic inserts with this scan's blur in its own noise give an unbiased mass with a
# 9 % standard deviation for that insert: noise, which no constant removes honestly.
_MEDIUM_MEDIUM = "measured +16.3 % on this scan (noise SD about 9 %); see docs/scoring.md, Phantom validation"


@pytest.mark.parametrize(
    "insert",
    [
        "large-low",
        "large-medium",
        "large-high",
        "medium-low",
        pytest.param("medium-medium", marks=pytest.mark.xfail(strict=True, reason=_MEDIUM_MEDIUM)),
        "medium-high",
    ],
)
def test_phantom_mass_within_10_percent_of_physical(phantom_inserts, insert):
    row = phantom_inserts[insert]
    print(f"{insert}: {row['mass_mg']:.2f} mg vs {row['physical_mass_mg']} mg ({row['mass_error_pct']:+.1f} %)")
    assert abs(row["mass_error_pct"]) <= 10.0


# --- the same check on synthetic inserts in this scan's own noise ------------------------

PSF_SIGMA_MM = 0.65  # in-plane Gaussian fitted to the HA rod's and large inserts' edges on this scan
SLAB_EDGE_SIGMA_MM = 0.4  # blur of a 3 mm slab's edges (the large inserts' slice shares fit a sharp slab)


@pytest.fixture(scope="module")
def phantom_volume():
    if not PHANTOM.is_dir():
        pytest.skip(f"the real QRM phantom scan is not at {PHANTOM}")
    from cacflow.coca import read_dicom_series

    return read_dicom_series(PHANTOM).volume


def _blurred_cylinder(shape, centre_yx, diameter_mm, start_mm, excess_hu, pixel_mm, increment_mm):
    """Excess HU of a cylinder along z (length = diameter) seen through this scan's blur."""
    supersample = 5
    rows, cols = np.mgrid[: shape[1] * supersample, : shape[2] * supersample]
    rows, cols = (rows + 0.5) / supersample - 0.5, (cols + 0.5) / supersample - 0.5
    inside = np.hypot(rows - centre_yx[0], cols - centre_yx[1]) * pixel_mm <= diameter_mm / 2
    disc = inside.reshape(shape[1], supersample, shape[2], supersample).mean(axis=(1, 3))
    disc = ndimage.gaussian_filter(disc, PSF_SIGMA_MM / pixel_mm, mode="constant")
    z = np.linspace(-increment_mm / 2, increment_mm / 2, 301)
    share = []
    for k in range(shape[0]):  # fraction of slab k the blurred cylinder fills
        edge = np.sqrt(2) * SLAB_EDGE_SIGMA_MM
        inside_z = 0.5 * (erf((k * increment_mm + z - start_mm) / edge)
                          - erf((k * increment_mm + z - start_mm - diameter_mm) / edge))
        share.append(inside_z.mean())
    return excess_hu * np.array(share)[:, None, None] * disc[None]


@pytest.mark.parametrize("size", ["large", "medium"])
@pytest.mark.parametrize("density", list(CCI_DENSITY_MG_CM3))
def test_integrated_mass_is_unbiased_on_synthetic_inserts_in_the_phantoms_noise(phantom_volume, size, density):
    """Known inserts (this scan's c, blur and slices) added to its own resin, away from the real inserts.

    Slices 12-19 hold only resin (74 HU, noise SD 21 HU); the mean error over many positions
    shows the bias of the definition, the spread the noise a single insert measurement carries.
    """
    pixel_mm, increment = phantom_volume.spacing_mm[1], phantom_volume.spacing_mm[0]
    c = 0.000721  # this scan's calibration (test_phantom_calibration_agrees_with_molloilab)
    settings = ScoringSettings(mass_calibration_mg_per_hu_mm3=c, mass_calibration_water_hu=30.5)
    diameter, rho = CCI_DIAMETER_MM[size], CCI_DENSITY_MG_CM3[density]
    exact = rho / 1000 * math.pi * (diameter / 2) ** 2 * diameter
    rng = np.random.default_rng(7)
    errors = []
    for _ in range(40):
        angle, radius = rng.uniform(0, 2 * math.pi), rng.uniform(0, 30)  # within the insert body
        cy, cx = 215 + radius / pixel_mm * math.sin(angle), 240 + radius / pixel_mm * math.cos(angle)
        y0, x0, z0 = int(cy) - 30, int(cx) - 30, int(rng.integers(12, 14))
        patch = phantom_volume.hu[z0 : z0 + 7, y0 : y0 + 60, x0 : x0 + 60].astype(np.float64)
        centre = (cy - y0, cx - x0)
        start = 3 * increment + rng.uniform(-increment / 2, increment / 2) - diameter / 2  # about slice 3
        patch += _blurred_cylinder(patch.shape, centre, diameter, start, rho / 1000 / c, pixel_mm, increment)
        volume = Volume(hu=patch.astype(np.float32), spacing_mm=phantom_volume.spacing_mm, slice_thickness_mm=3.0)
        labels = _insert_labels(volume, 130.0, np.array(centre), diameter / 2, range(2, 5))
        scan = score_volume(volume.hu, labels, volume.spacing_mm, settings, slice_thickness_mm=3.0)
        errors.append(100 * (scan.mass_mg - exact) / exact)
    mean, sd = float(np.mean(errors)), float(np.std(errors))
    print(f"{size}-{density}: mean {mean:+.1f} %, SD {sd:.1f} %")
    assert abs(mean) <= max(3.0, 3 * sd / math.sqrt(len(errors)))
