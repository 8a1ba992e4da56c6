"""Mass calibration from phantom rods, and the physical check on the real QRM phantom."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from cacflow import cli
from cacflow.calibration import (
    CCI_DENSITY_MG_CM3,
    CCI_DIAMETER_MM,
    CCI_RADIAL_FRACTION,
    calibrate_volume,
    measure_inserts,
    measure_phantom_inserts,
)
from cacflow.scoring import ScoringSettings
from cacflow.volume import Volume

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


@pytest.mark.parametrize("water_hu", [0.0, 35.0])
def test_insert_masses_are_exact_without_blur(water_hu):
    volume, exact = cci_phantom(water_hu=water_hu)
    settings = ScoringSettings(mass_calibration_mg_per_hu_mm3=0.0007, mass_calibration_water_hu=water_hu)
    rows = measure_inserts(volume, settings, reference=exact)
    assert [row["insert"] for row in rows] == [
        f"{size}-{density}" for density in CCI_DENSITY_MG_CM3 for size in CCI_DIAMETER_MM
    ]
    for row in rows:
        assert row["detected"], row["insert"]
        assert row["mass_error_pct"] == pytest.approx(0.0, abs=1e-3), row["insert"]


def test_inserts_need_a_calibration():
    volume, _ = cci_phantom()
    with pytest.raises(ValueError, match="calibration"):
        measure_inserts(volume, ScoringSettings())


# --- the real QRM phantom (Canon Aquilion ONE, 120 kVp, 3 mm) ----------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("CACFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PHANTOM = SHARED_DATA / "qrm-phantom-canon"
REFERENCE_CSV = SHARED_DATA / "qrm-phantom-canon.reference.csv"
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


def test_water_subtraction_brings_every_large_and_medium_mass_closer_to_physical(phantom_inserts):
    for size in ("large", "medium"):
        for density in CCI_DENSITY_MG_CM3:
            row = phantom_inserts[f"{size}-{density}"]
            conventional = abs(row["mass_without_water_subtraction_mg"] - row["physical_mass_mg"])
            assert abs(row["mass_mg"] - row["physical_mass_mg"]) < conventional, row["insert"]


# Threshold-based mass misses the blur below 130 HU and counts the 30 HU of the
# resin around the inserts as calcium; on this 3 mm scan the net is +9 to +13 %
# for four inserts (docs/scoring.md, "Phantom validation"). The bound stays 10 %.
_OVER_10_PCT = "measured +10.4 to +12.6 % on this scan; see docs/scoring.md, Phantom validation"


@pytest.mark.parametrize(
    "insert",
    [
        pytest.param("large-low", marks=pytest.mark.xfail(strict=True, reason=_OVER_10_PCT)),
        "large-medium",
        pytest.param("large-high", marks=pytest.mark.xfail(strict=True, reason=_OVER_10_PCT)),
        "medium-low",
        pytest.param("medium-medium", marks=pytest.mark.xfail(strict=True, reason=_OVER_10_PCT)),
        pytest.param("medium-high", marks=pytest.mark.xfail(strict=True, reason=_OVER_10_PCT)),
    ],
)
def test_phantom_mass_within_10_percent_of_physical(phantom_inserts, insert):
    row = phantom_inserts[insert]
    print(f"{insert}: {row['mass_mg']:.2f} mg vs {row['physical_mass_mg']} mg ({row['mass_error_pct']:+.1f} %)")
    assert abs(row["mass_error_pct"]) <= 10.0
