"""Synthetic phantoms, DICOM writer and demo cohort: ground truth is self-consistent."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from cacflow.nifti_io import load_nifti
from cacflow.synth import cohort as cohort_module
from cacflow.synth import phantom as ph
from cacflow.synth.cohort import generate_cohort
from cacflow.synth.dicom_writer import VENDORS, localizer_from_phantom, uid, write_series
from cacflow.synth.phantom import LesionSpec, PhantomSettings, generate_phantom

SMALL = dict(rows=256, cols=256, pixel_spacing_mm=0.78)  # fast, still covers the heart


def _agatston_by_hand(hu: np.ndarray, labels: np.ndarray, pixel_area: float, increment: float) -> float:
    """Textbook Agatston on labelled voxels, written independently of the generator."""
    total = 0.0
    for k in range(hu.shape[0]):
        groups, n = ndimage.label(labels[k] > 0, structure=np.ones((3, 3)))
        for g in range(1, n + 1):
            member = groups == g
            area = member.sum() * pixel_area
            if area < 1.0:
                continue
            peak = hu[k][member].max()
            total += area * (1 if peak < 200 else 2 if peak < 300 else 3 if peak < 400 else 4)
    return total * increment / 3.0


@pytest.fixture(scope="module")
def single_lesion():
    spec = LesionSpec("lad", 0.3, (2.5, 1.5, 1.5), 600.0)
    return generate_phantom(11, PhantomSettings(lesions=(spec,), noise_hu=0, include_distractors=False))


def test_reference_matches_hand_recomputation(single_lesion):
    p = single_lesion
    assert len(p.lesions) == 1 and p.lesions[0]["vessel"] == "lad"
    by_hand = _agatston_by_hand(p.hu, p.coronary_labels, p.spacing_mm[1] * p.spacing_mm[2], p.spacing_mm[0])
    assert by_hand > 0
    assert p.reference["agatston_total"] == pytest.approx(by_hand, abs=1e-3)
    assert p.reference["agatston_lad"] == p.reference["agatston_total"]
    assert p.reference["lesion_count"] == 1
    assert p.reference["risk_category"] == ph.risk_category(by_hand)


def test_image_reference_by_hand():
    """The image-based reference on a 2-slice image whose score is counted by hand:
    0.5 mm pixels (0.25 mm^2), 3 mm increment (factor 1)."""
    hu = np.zeros((2, 12, 12), dtype=np.float32)
    footprint = np.zeros(hu.shape, dtype=bool)
    # slice 0: a 2 x 3 group (1.5 mm^2) peaking at 250 HU inside an LAD footprint -> 1.5 x 2
    hu[0, 1:3, 1:4] = 140.0
    hu[0, 2, 2] = 250.0
    footprint[0, 1, 1] = True  # touching the footprint at one pixel is enough
    # slice 0: 3 pixels (0.75 mm^2) at 500 HU in the footprint: under 1 mm^2, not scored
    hu[0, 8, 8:11] = 500.0
    footprint[0, 8, 8:11] = True
    # slice 0: 10 pixels at 600 HU outside every footprint (bone, say): not coronary
    hu[0, 5, 0:10] = 600.0
    # slice 1: 4 pixels, two at 129.6 HU, which the DICOM stores as 130, and a
    # 399.6 HU peak stored as 400 (weight 4): 1.0 mm^2 x 4
    hu[1, 4, 4:6] = 129.6
    hu[1, 5, 4:6] = [200.0, 399.6]
    footprint[1, 4:6, 4:6] = True
    # slice 1: a 129.4 HU pixel (stored 129) splits what would be one group; its
    # 3-pixel half in the footprint is too small (0.75 mm^2)
    hu[1, 9, 0:3] = 300.0
    hu[1, 9, 3] = 129.4
    hu[1, 9, 4:7] = 300.0
    footprint[1, 9, 0] = True
    # slice 1: a 2 x 3 group (1.5 mm^2) at 350 HU (weight 3) overlapping an LM footprint
    # at 2 pixels and an LCX footprint at 4: the LCX's, 1.5 x 3
    hu[1, 0:2, 8:11] = 350.0
    lm_pixels = np.zeros(hu.shape, dtype=bool)
    lm_pixels[1, 0, 8:10] = True
    lcx_pixels = np.zeros(hu.shape, dtype=bool)
    lcx_pixels[1, 1, 8:11] = lcx_pixels[1, 0, 10] = True
    box = (slice(0, 2), slice(0, 12), slice(0, 12))
    slice0_only, slice1_only = footprint.copy(), footprint.copy()
    slice0_only[1], slice1_only[0] = False, False
    footprints = [(box, slice0_only, ph.VESSEL_IDS["lad"]), (box, slice1_only, ph.VESSEL_IDS["rca"]),
                  (box, lm_pixels, ph.VESSEL_IDS["lm"]), (box, lcx_pixels, ph.VESSEL_IDS["lcx"])]
    reference = ph.image_reference(hu, footprints, 0.5, 3.0)
    assert reference["image_agatston_lad"] == pytest.approx(1.5 * 2)
    assert reference["image_agatston_rca"] == pytest.approx(1.0 * 4)
    assert reference["image_agatston_lcx"] == pytest.approx(1.5 * 3)
    assert reference["image_agatston_lm"] == 0
    assert reference["image_agatston_total"] == pytest.approx(11.5)
    assert reference["image_risk_category"] == "11-100"
    assert set(reference) == set(ph.IMAGE_REFERENCE_KEYS)
    # a 1.5 mm increment halves it, as in the noise-free reference
    assert ph.image_reference(hu, footprints, 0.5, 1.5)["image_agatston_total"] == pytest.approx(5.75)


def test_image_reference_is_the_noise_free_one_when_there_is_no_noise(single_lesion):
    """Without noise the image shows exactly the rendering the noise-free reference
    scores. (The DICOM's rounding of HU to integers could move a pixel across 130 HU or
    a peak across a weight step in another phantom; in this one it moves neither.)"""
    p = single_lesion
    assert p.reference["image_agatston_total"] > 0
    assert p.reference["image_agatston_total"] == pytest.approx(p.reference["agatston_total"], abs=1e-3)
    assert p.reference["image_agatston_lad"] == p.reference["image_agatston_total"]
    assert p.reference["image_risk_category"] == p.reference["risk_category"]


def test_labels_only_on_lesion_voxels(single_lesion):
    p = single_lesion
    labelled = p.coronary_labels > 0
    assert set(np.unique(p.coronary_labels)) == {0, 2}
    assert (p.hu[labelled] >= 130).all()  # noise-free, so hu is the clean rendering
    assert labelled.sum() == p.lesions[0]["n_voxels"]
    cz, cy, cx = (int(round(v)) for v in p.lesions[0]["centre_voxel_zyx"])
    zz, yy, xx = np.nonzero(labelled)
    assert abs(zz.mean() - cz) <= 1 and abs(yy.mean() - cy) <= 8 and abs(xx.mean() - cx) <= 8
    # the lesion sits on its vessel's tube
    assert (p.vessel_labels[labelled] == 2).mean() > 0.3


def test_fine_rendering_matches_ellipsoid_geometry():
    """At fine sampling the thresholded lesion is the ellipsoid: volume and score by hand."""
    a, b, c, peak = 2.5, 1.5, 1.5, 600.0
    obj = ph._Calcium(np.zeros(3), np.eye(3), (a, b, c), peak, "coronary", "lad")
    xy = np.arange(-4, 4.01, 0.1)
    z = np.arange(-4, 4.01, 0.25)
    grid = ph._Grid(xy, xy, z, 0.25)
    vol = np.zeros((len(z), len(xy), len(xy)), dtype=np.float32)
    box, fraction = ph._render_calcium(vol, grid, obj, peak)
    _, counted, records = ph._score_rendering(vol[box], fraction, grid.z[box[0]], 0, 0.01)
    volume = counted.sum() * 0.01 * 0.25
    assert volume == pytest.approx(4 / 3 * math.pi * a * b * c, rel=0.05)
    # density 600 * (1 - 0.4 q): every slice peaks between 360 and 600, so weight 3 or 4
    agatston = sum(r["agatston"] for r in records) * 0.25 / 3
    assert volume / 3 * 3 * 0.95 <= agatston <= volume / 3 * 4 * 1.05


def test_zero_lesions_scores_zero():
    p = generate_phantom(5, PhantomSettings(n_coronary_lesions=0, **SMALL))
    assert p.lesions == []
    assert not p.coronary_labels.any()
    assert p.reference["agatston_total"] == 0 and p.reference["risk_category"] == "0"
    assert p.reference["cac_drs"] == "A0" and p.reference["lesion_count"] == 0
    assert p.vessel_labels.any()  # the coronary tree is there, just not calcified


def test_canonical_orientation():
    p = generate_phantom(3, PhantomSettings(fov_centre="body", noise_hu=0, include_distractors=False, **SMALL))
    ps = p.spacing_mm[1]
    midline_col = int(round(-p.origin_xy_mm[0] / ps))  # patient x = 0
    centre_row = int(round(-p.origin_xy_mm[1] / ps))  # patient y = 0
    bone_rows = np.nonzero((p.hu[:, :, midline_col - 2 : midline_col + 3] > 600).any(axis=(0, 2)))[0]
    assert bone_rows.max() > centre_row + 40 / ps  # spine posterior: large row index
    assert bone_rows.min() < centre_row - 60 / ps  # sternum anterior
    assert np.nonzero(p.vessel_labels)[2].mean() > midline_col  # heart on the patient's left
    assert p.metadata["heart_centre_zyx_mm"][2] > 0
    assert np.all(np.diff(p.z_positions_mm) > 0)
    # z grows superiorly: the left main sits above the apex-bound LAD, liver at the bottom
    assert np.nonzero(p.vessel_labels == 1)[0].mean() > np.nonzero(p.vessel_labels == 2)[0].mean()
    right_half = p.hu[:, :, :midline_col]
    liver = ((right_half > 50) & (right_half < 70)).mean(axis=(1, 2))
    assert liver[:3].mean() > liver[-3:].mean()


def test_reproducible_by_seed_and_same_patient_across_acquisitions():
    a = generate_phantom(21, PhantomSettings(**SMALL))
    b = generate_phantom(21, PhantomSettings(**SMALL))
    c = generate_phantom(22, PhantomSettings(**SMALL))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.coronary_labels, b.coronary_labels)
    assert a.reference == b.reference and a.lesions == b.lesions
    assert not (a.hu.shape == c.hu.shape and np.array_equal(a.hu, c.hu))
    thin = generate_phantom(21, PhantomSettings(slice_thickness_mm=1.0, slice_increment_mm=1.0, **SMALL))
    assert [x["centre_zyx_mm"] for x in thin.lesions] == [x["centre_zyx_mm"] for x in a.lesions]
    assert thin.hu.shape[0] > 2.5 * a.hu.shape[0]


@pytest.mark.parametrize("target,category", [(5.0, "1-10"), (40.0, "11-100"), (200.0, "101-400"), (900.0, ">400")])
def test_target_agatston_lands_in_its_risk_category(target, category):
    p = generate_phantom(int(target), PhantomSettings(target_agatston=target))
    assert p.reference["risk_category"] == category
    assert p.reference["lesion_count"] >= 1


def test_settings_and_metadata():
    with pytest.raises(ValueError):
        PhantomSettings(n_coronary_lesions=2, target_agatston=50.0)
    p = generate_phantom(4, PhantomSettings(gated=False, contrast=True, kvp=100, slice_thickness_mm=5.0, slice_increment_mm=5.0, **SMALL))
    json.dumps([p.metadata, p.lesions, p.distractors, p.reference])
    assert p.metadata["gated"] is False and p.metadata["kvp"] == 100 and p.metadata["motion_blur_mm"] > 0
    assert p.hu.dtype == np.float32 and p.hu.min() >= -1024 and p.hu.max() <= 3071
    assert p.spacing_mm == (5.0, 0.78, 0.78)
    assert p.hu[p.vessel_labels > 0].mean() > 200  # iodine in the coronary lumen
    volume = p.volume()
    assert volume.hu is p.hu and volume.increment_mm == 5.0


def test_phantom_is_fast():
    start = time.perf_counter()
    p = generate_phantom(8, PhantomSettings(n_slices=50))
    assert p.hu.shape == (50, 512, 512)
    assert time.perf_counter() - start < 4.0  # ~1.3 s on a laptop core; slack for CI


CHEST = dict(pixel_spacing_mm=0.7, fov_centre="body", gated=False, n_coronary_lesions=0)


@pytest.fixture(scope="module")
def with_unfamiliar_calcium():
    """The same patient and acquisition without and with the unfamiliar calcium."""
    plain = generate_phantom(5, PhantomSettings(**CHEST))
    return plain, generate_phantom(5, PhantomSettings(**CHEST, unfamiliar_calcium=True))


def _object_voxels(phantom, entry: dict, margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` of the ellipsoid's bounding sphere (a loose envelope)."""
    z_mm, y_mm, x_mm = entry["centre_zyx_mm"]
    zz = phantom.z_positions_mm[:, None, None]
    yy, xx = _in_plane_mm(phantom)
    reach = max(entry["semi_axes_mm"]) + margin_mm
    return ((yy - y_mm) ** 2 + (xx - x_mm) ** 2 <= reach**2) & (np.abs(zz - z_mm) <= reach + phantom.slice_thickness_mm)


def _in_plane_mm(phantom):
    _, row_mm, col_mm = phantom.spacing_mm
    yy = (phantom.origin_xy_mm[1] + row_mm * np.arange(phantom.hu.shape[1]))[None, :, None]
    xx = (phantom.origin_xy_mm[0] + col_mm * np.arange(phantom.hu.shape[2]))[None, None, :]
    return yy, xx


def _centre_voxel(entry: dict) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in entry["centre_voxel_zyx"])


def test_unfamiliar_calcium_changes_only_its_own_voxels(with_unfamiliar_calcium):
    """Drawn from a stream of their own, after the lesions: the rest of the patient, the
    noise and every other distractor stay as they were; every kind shows in a chest
    field of view; none is coronary."""
    plain, extra = with_unfamiliar_calcium
    new = [d for d in extra.distractors if d["kind"] in ph.UNFAMILIAR_CALCIUM_KINDS]
    assert [d for d in extra.distractors if d["kind"] not in ph.UNFAMILIAR_CALCIUM_KINDS] == plain.distractors
    assert {d["kind"] for d in new if d["agatston_if_scored"] > 0} == set(ph.UNFAMILIAR_CALCIUM_KINDS)
    envelope = np.zeros(plain.hu.shape, bool)
    for entry in new:
        envelope |= _object_voxels(extra, entry, margin_mm=2 * extra.spacing_mm[1])
    changed = plain.hu != extra.hu
    assert changed.any() and not (changed & ~envelope).any()
    assert not extra.coronary_labels.any() and extra.reference["agatston_total"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_optional_calcium_never_changes_the_lesion_plan(seed):
    """Placed after the coronary lesions and clear of them: the same lesions, labels and
    reference with and without it."""
    settings = PhantomSettings(**SMALL, target_agatston=150.0)
    plain = generate_phantom(seed, settings)
    both = generate_phantom(seed, PhantomSettings(**SMALL, target_agatston=150.0, unfamiliar_calcium=True,
                                                  scattered_calcium=True, perivascular_calcium=True))
    assert plain.lesions and both.lesions == plain.lesions and both.reference == plain.reference
    assert (both.coronary_labels == plain.coronary_labels).all()


def test_the_default_phantoms_are_those_of_before_the_optional_calcium():
    """With both options off (training, every cohort), the generator draws what it drew
    before they existed: reference, lesion centres, distractor count and mean HU as
    written by cacflow at commit 7538536 for the same seeds and settings."""
    before = {
        5: (163.66, [[-38.4, -48.3, 13.1], [-62.1, -71.8, 41.5], [-44.5, 3.4, 46.7]], 32, -478.0),
        6: (154.24, [[-115.6, -8.0, -21.4], [-97.1, -57.0, 31.9], [-67.1, -7.1, 14.3], [-93.5, -2.7, -7.0]], 19, -479.72),
    }
    settings = {5: PhantomSettings(rows=256, cols=256, pixel_spacing_mm=0.78, target_agatston=200.0, device_probability=1.0),
                6: PhantomSettings(rows=256, cols=256, pixel_spacing_mm=0.8, gated=False, fov_centre="body",
                                   n_coronary_lesions=4)}
    for seed, expected in before.items():
        p = generate_phantom(seed, settings[seed])
        now = (round(p.reference["agatston_total"], 2), [[round(v, 1) for v in lesion["centre_zyx_mm"]] for lesion in p.lesions],
               len(p.distractors), round(float(p.hu.mean()), 2))
        assert now == expected


def test_each_unfamiliar_kind_lies_where_its_name_says(with_unfamiliar_calcium):
    """Read in the image without them: granulomas in aerated lung, lymph nodes outside
    the blood of the great vessels (in fat or lung), costal flecks in the painted
    cartilage (110 HU), breast arteries in subcutaneous fat."""
    plain, extra = with_unfamiliar_calcium
    visible = [d for d in extra.distractors if d["kind"] in ph.UNFAMILIAR_CALCIUM_KINDS and d["agatston_if_scored"] > 0]
    for entry in visible:
        z, row, col = _centre_voxel(entry)
        around = float(plain.hu[z, row - 1 : row + 2, col - 1 : col + 2].mean())
        if entry["kind"] == "lung_granuloma":
            ring = _object_voxels(extra, entry, 6.0) & ~_object_voxels(extra, entry, 3.0)
            assert np.median(extra.hu[ring]) < -500
        elif entry["kind"] == "lymph_node":
            assert around < -50  # not blood (40 HU) nor a vessel wall
        elif entry["kind"] == "costal_cartilage":
            assert abs(around - 110.0) < 40
        else:
            assert -160 < around < -40  # subcutaneous fat (-95 HU)


def test_called_coronary_names_the_object_the_model_labelled(with_unfamiliar_calcium):
    """The check's attribution: voxels of a lymph node labelled coronary are reported as
    the lymph node; an isolated voxel away from every object as ``other``."""
    from cacflow.training import _called_coronary

    plain, extra = with_unfamiliar_calcium
    node = max((d for d in extra.distractors if d["kind"] == "lymph_node"), key=lambda d: d["agatston_if_scored"])
    labels = np.zeros(extra.hu.shape, np.uint8)
    labels[(extra.hu != plain.hu) & _object_voxels(extra, node, 1.0) & (extra.hu >= 130)] = 2
    assert _called_coronary(extra, labels) == ["lymph_node"]
    labels[:] = 0
    labels[0, 5, extra.hu.shape[2] // 2] = 1  # the lowest slice's anterior edge: no object there
    assert _called_coronary(extra, labels) == ["other"]
    assert _called_coronary(extra, np.zeros_like(labels)) == []


def test_scattered_calcium_keeps_clear_of_the_coronary_arteries():
    """The training negatives of any look are never on an artery's course: no changed
    voxel within 2 mm of a coronary tube, and nothing else about the phantom changes."""
    settings = PhantomSettings(**SMALL)
    plain = generate_phantom(11, settings)
    scattered = generate_phantom(11, PhantomSettings(**SMALL, scattered_calcium=True))
    changed = plain.hu != scattered.hu
    assert any(d["kind"] == "scattered" and d["agatston_if_scored"] > 0 for d in scattered.distractors)
    reach = int(math.ceil(2.0 / SMALL["pixel_spacing_mm"]))
    near_artery = ndimage.binary_dilation(plain.vessel_labels > 0, structure=np.ones((1, 3, 3), bool), iterations=reach)
    assert changed.any() and not (changed & near_artery).any()
    assert (scattered.coronary_labels == plain.coronary_labels).all()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_perivascular_calcium_lies_beside_the_great_vessels_and_clear_of_the_arteries(seed):
    """The training negatives beside the great vessels: each blob outside every great
    vessel's wall and within a group's reach (8 mm gap, three 7 mm steps, its size) of
    the aorta, pulmonary trunk or superior vena cava; no changed voxel within 2 mm of a
    coronary tube, and the lesions and labels as without them."""
    from cacflow.synth.phantom import _make_patient, _segment_distance

    settings = PhantomSettings(**SMALL, perivascular_calcium=True)
    patient = _make_patient(seed, settings)
    blobs = [c for c in patient.calcium if c.kind == "perivascular"]
    assert blobs
    ax, ay = patient.body["aorta_xy"]
    z_low, z_high = patient.z_range
    down = (np.array([ax, ay, z_low - 10]), np.array([ax, ay, z_high + 40]), patient.body["aorta_r"])
    anchors = [(a, b, g["radius"]) for g in patient.great_vessels if g["kind"] != "pulmonary_artery"
               for a, b in zip(g["points"][:-1], g["points"][1:])] + [down]
    walls = anchors + [(*g["points"], g["radius"]) for g in patient.great_vessels if g["kind"] == "pulmonary_artery"]
    for blob in blobs:
        gaps = [_segment_distance(blob.centre, a, b) - r - 1.5 for a, b, r in walls]
        assert min(gaps) >= max(blob.semi) - 1e-9
        assert min(_segment_distance(blob.centre, a, b) - r - 1.5 for a, b, r in anchors) <= 8 + 3 * 7 + 4.5

    plain = generate_phantom(seed, PhantomSettings(**SMALL))
    extra = generate_phantom(seed, settings)
    changed = plain.hu != extra.hu
    reach = int(math.ceil(2.0 / SMALL["pixel_spacing_mm"]))
    near_artery = ndimage.binary_dilation(plain.vessel_labels > 0, structure=np.ones((1, 3, 3), bool), iterations=reach)
    assert not (changed & near_artery).any()
    assert extra.lesions == plain.lesions and (extra.coronary_labels == plain.coronary_labels).all()
    assert [d for d in extra.distractors if d["kind"] != "perivascular"] == plain.distractors


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_speck_lesions_are_tiny_faint_plaques_on_the_arteries_added_to_the_plan(seed):
    """The training positives at the edge of what a scan shows: 1-3 coronary plaques of
    the speck sizes and densities, each on its artery's wall (centre within the
    vessel's radius of its centreline), added after the planned lesions, which keep
    their entries, labels and distractors."""
    from cacflow.synth.phantom import SPECK_PEAK_HU, SPECK_SEMI_AXIS_MM, _make_patient

    plan = dict(**SMALL, target_agatston=60.0)
    patient = _make_patient(seed, PhantomSettings(**plan, speck_lesions=True))
    planned = _make_patient(seed, PhantomSettings(**plan)).calcium
    specks = patient.calcium[len(planned):]
    assert [c.kind for c in patient.calcium[:len(planned)]] == [c.kind for c in planned]
    assert 1 <= len(specks) <= 3 and all(c.kind == "coronary" for c in specks)
    for speck in specks:
        assert SPECK_SEMI_AXIS_MM[0] <= speck.semi[0] <= SPECK_SEMI_AXIS_MM[1]
        assert speck.semi[1] <= speck.semi[0] and speck.semi[2] <= speck.semi[1]
        assert SPECK_PEAK_HU[0] <= speck.peak_hu <= SPECK_PEAK_HU[1]
        vessel = patient.vessels[speck.vessel]
        assert np.min(np.linalg.norm(vessel["points"] - speck.centre, axis=1)) <= max(vessel["radii"]) + 1e-6

    plain = generate_phantom(seed, PhantomSettings(**plan))
    extra = generate_phantom(seed, PhantomSettings(**plan, speck_lesions=True))
    assert extra.lesions[:len(plain.lesions)] == plain.lesions and len(extra.lesions) == len(plain.lesions) + len(specks)
    assert extra.distractors == plain.distractors
    assert (extra.coronary_labels[plain.coronary_labels > 0] == plain.coronary_labels[plain.coronary_labels > 0]).all()


def test_called_coronary_takes_the_nearest_of_two_objects_in_reach():
    """A labelled component between a small node right on it and a larger plaque whose
    reach also covers it goes to the node, whichever the distractor list names first."""
    from types import SimpleNamespace

    from cacflow.training import _called_coronary

    phantom = SimpleNamespace(spacing_mm=(3.0, 1.0, 1.0), z_positions_mm=np.array([0.0, 3.0, 6.0]),
                              origin_xy_mm=(0.0, 0.0), slice_thickness_mm=3.0, distractors=[
                                  {"kind": "aortic_wall", "centre_zyx_mm": [3.0, 10.0, 14.0], "semi_axes_mm": [4.5, 1.0, 1.0]},
                                  {"kind": "lymph_node", "centre_zyx_mm": [3.0, 10.0, 10.0], "semi_axes_mm": [1.0, 1.0, 1.0]}])
    labels = np.zeros((3, 20, 20), np.uint8)
    labels[1, 9:12, 9:12] = 1  # centroid at z 3 mm, y 10 mm, x 10 mm
    assert _called_coronary(phantom, labels) == ["lymph_node"]
    labels[:] = 0
    labels[1, 9:12, 14:17] = 1  # on the plaque's centre, 5 mm from the node
    assert _called_coronary(phantom, labels) == ["aortic_wall"]


# --------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def small_phantom():
    return generate_phantom(9, PhantomSettings(target_agatston=150.0, **SMALL))


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_dicom_round_trip(tmp_path, small_phantom, vendor):
    p = small_phantom
    uids = {"study": uid("test", "study"), "series": uid("test", vendor)}
    paths = write_series(p, tmp_path, series_kind="calcium_score", uids=uids, vendor=vendor, series_number=3)
    assert len(paths) == p.hu.shape[0]
    datasets = sorted((pydicom.dcmread(path) for path in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    assert np.abs(hu - p.hu).max() <= 1.0
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == first.file_meta.MediaStorageSOPClassUID
    assert {d.StudyInstanceUID for d in datasets} == {uids["study"]}
    assert {d.SeriesInstanceUID for d in datasets} == {uids["series"]}
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
    assert all(d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID for d in datasets)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert np.allclose([float(d.ImagePositionPatient[2]) for d in datasets], p.z_positions_mm)
    assert np.allclose([float(v) for v in first.ImagePositionPatient[:2]], p.origin_xy_mm)
    assert [float(v) for v in first.PixelSpacing] == [p.spacing_mm[1], p.spacing_mm[2]]
    assert float(first.SliceThickness) == p.slice_thickness_mm and (first.Rows, first.Columns) == p.hu.shape[1:]
    assert datasets[-1].InstanceNumber == 1 and first.InstanceNumber == len(datasets)  # superior first
    assert float(first.KVP) == 120 and first.CardiacSynchronizationTechnique == "PROSPECTIVE"
    assert first.Manufacturer == VENDORS[vendor].manufacturer and first.SeriesNumber == 3
    # same inputs, same UIDs: cohorts are reproducible file for file
    again = write_series(p, tmp_path / "again", series_kind="calcium_score", uids=uids, vendor=vendor, series_number=3)
    assert [pydicom.dcmread(x).SOPInstanceUID for x in again] == [pydicom.dcmread(x).SOPInstanceUID for x in paths]


def test_dicom_blank_gating_contrast_and_localizer(tmp_path, small_phantom):
    uids = {"study": uid("s"), "series": uid("s", 1)}
    cta = write_series(
        small_phantom, tmp_path / "cta", series_kind="cta", uids=uids,
        acquisition={"contrast": True, "blank_gating": True}, tags={"PatientName": "PLANTED^NAME"},
    )
    ds = pydicom.dcmread(cta[0])
    assert ds.ContrastBolusAgent and ds.ContrastBolusRoute == "IV" and ds.PatientName == "PLANTED^NAME"
    assert "CardiacSynchronizationTechnique" not in ds and "TriggerTime" not in ds
    loc = write_series(localizer_from_phantom(small_phantom), tmp_path / "loc", series_kind="localizer", uids={"study": uid("s"), "series": uid("s", 2)}, naming="bare")
    ds = pydicom.dcmread(loc[0])
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"] and "." not in loc[0].name
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]


# --------------------------------------------------------------------------- cohort

PLANTED = {"PatientName": "CANARY^{participant}", "PatientID": "CANARYID{participant}", "InstitutionName": "CANARY CLINIC"}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return generate_cohort(out, seed=1, size="tiny", planted_identifiers=PLANTED)


def _read_tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_cohort_manifest_and_reference(tiny_cohort):
    manifest = tiny_cohort
    assert manifest.read_text().splitlines()[0] == "participant_id\tvisit\tdicom_dir"
    rows = _read_tsv(manifest)
    assert len(rows) == 4
    for row in rows:
        folder = Path(row["dicom_dir"])
        assert folder.is_absolute() and folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))
        assert "ground_truth" not in str(folder)
    references = {r["participant_id"]: r for r in _read_tsv(manifest.parent / "ground_truth" / "reference_scores.tsv")}
    assert [references[p]["expected_status"] for p in ("P001", "P002", "P003", "P004")] == ["scored", "scored", "scored", "not_scorable"]
    for plan in cohort_module._TINY_PLANS:
        if "calcium_score" in plan.kinds:
            assert references[plan.participant]["risk_category"] == ph.risk_category(plan.target)
            image_total = float(references[plan.participant]["image_agatston_total"])
            assert references[plan.participant]["image_risk_category"] == ph.risk_category(image_total)
            # what the noisy series shows: these plans aim at 0, 40 and 600, far from the
            # 130 HU / 1 mm^2 edge, so the image shows calcium exactly where one is planned
            assert (image_total > 0) == (plan.target > 0)
    assert not any((manifest.parent / "dicom").rglob("*.nii.gz"))  # ground truth never inside the DICOM tree


def test_cohort_labels_match_dicom_geometry(tiny_cohort):
    root = tiny_cohort.parent
    reference = _read_tsv(root / "ground_truth" / "reference_scores.tsv")[2]  # P003, > 400
    series = [s for s in _read_tsv(root / "ground_truth" / "series.tsv") if s["series_instance_uid"] == reference["series_instance_uid"]][0]
    datasets = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in (root / series["folder"]).iterdir()),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    datasets = [d for d in datasets if d.SeriesInstanceUID == series["series_instance_uid"]]
    image = nib.load(root / "ground_truth" / "P003_baseline" / "labels.nii.gz")
    labels = np.asarray(image.dataobj).transpose(2, 1, 0)
    assert labels.shape == (len(datasets), datasets[0].Rows, datasets[0].Columns)
    x0, y0, z0 = (float(v) for v in datasets[0].ImagePositionPatient)
    assert np.allclose(image.affine @ [0, 0, 0, 1], [-x0, -y0, z0, 1])  # RAS = (-L, -P, S)
    zn = float(datasets[-1].ImagePositionPatient[2])
    assert np.allclose((image.affine @ [0, 0, len(datasets) - 1, 1])[2], zn)
    assert np.array_equal(load_nifti(root / "ground_truth" / "P003_baseline" / "labels.nii.gz").hu, labels)
    lesions = [r for r in _read_tsv(root / "ground_truth" / "lesions.tsv") if r["participant_id"] == "P003"]
    assert (labels > 0).sum() == sum(int(r["n_voxels"]) for r in lesions) > 0
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_scan_of_record_is_the_series_the_cohort_scores(tiny_cohort):
    """Analyses re-image a visit's scan of record without the cohort's files: it must
    be the very series the cohort wrote and scored, voxel for voxel."""
    root = tiny_cohort.parent
    references = {r["participant_id"]: r for r in _read_tsv(root / "ground_truth" / "reference_scores.tsv")}
    folders = {s["series_instance_uid"]: s["folder"] for s in _read_tsv(root / "ground_truth" / "series.tsv")}
    for plan in cohort_module.visit_plans(4, "tiny", seed=1):
        record = cohort_module.scan_of_record(plan, seed=1, size="tiny")
        if references[plan.participant]["expected_status"] == "not_scorable":
            assert record is None
            continue
        kind, phantom = record
        assert kind == references[plan.participant]["series_kind"]
        assert phantom.reference["agatston_total"] == float(references[plan.participant]["agatston_total"])
        truth = root / "ground_truth" / f"{plan.participant}_{plan.visit}"
        assert np.array_equal(load_nifti(truth / "labels.nii.gz").hu, phantom.coronary_labels)
        assert np.array_equal(load_nifti(truth / "vessels.nii.gz").hu, phantom.vessel_labels)
        series_uid = references[plan.participant]["series_instance_uid"]
        stored = sorted((d for d in map(pydicom.dcmread, (root / folders[series_uid]).iterdir())
                         if d.SeriesInstanceUID == series_uid),
                        key=lambda d: float(d.ImagePositionPatient[2]))
        hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in stored])
        # the stored integers are the phantom's HU rounded (float32 ties may round either way)
        assert hu.shape == phantom.hu.shape and np.abs(hu - phantom.hu).max() <= 0.5 + 1e-3


def test_planted_identifiers_in_dicom_not_in_ground_truth(tiny_cohort):
    root = tiny_cohort.parent
    for row in _read_tsv(tiny_cohort):
        files = [p for p in Path(row["dicom_dir"]).rglob("*") if p.is_file()]
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.PatientName == f"CANARY^{row['participant_id']}" and ds.InstitutionName == "CANARY CLINIC"
    for path in [tiny_cohort, *(root / "ground_truth").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            assert b"CANARY" not in data, path


def test_cohort_records_noncoronary_calcium(tiny_cohort):
    references = _read_tsv(tiny_cohort.parent / "ground_truth" / "reference_scores.tsv")
    assert all("noncoronary_calcium" in r for r in references)
    plain = ph.generate_phantom(5, ph.PhantomSettings(rows=128, cols=128, pixel_spacing_mm=1.2, n_slices=20,
                                                      n_coronary_lesions=0, include_distractors=False))
    assert cohort_module.noncoronary_calcium(plain) == ""
    found = set()
    for seed in range(6):
        phantom = ph.generate_phantom(seed, ph.PhantomSettings(rows=128, cols=128, pixel_spacing_mm=1.2,
                                                               n_coronary_lesions=0))
        kinds = cohort_module.noncoronary_calcium(phantom)
        listed = set(kinds.split(";")) - {""}
        assert listed <= set(cohort_module.NONCORONARY_CALCIUM_KINDS)
        # every listed kind is a calcified distractor of the phantom with voxels >= 130 HU
        for kind in listed:
            assert any(d["kind"] == kind and d["agatston_if_scored"] > 0 for d in phantom.distractors)
        found |= listed
    assert found  # six patients hold some aortic, valve or mitral calcium


def test_random_participants_mix_nongated_scans_and_zero_calcium():
    plans = cohort_module.visit_plans(412, "demo", seed=7)[len(cohort_module._DEMO_PLANS):]
    assert len(plans) == 400
    chest_only = [p for p in plans if "calcium_score" not in p.kinds]
    assert all("chest" in p.kinds for p in chest_only)
    assert 0.19 < len(chest_only) / len(plans) < 0.31  # a quarter, binomial SD 2.2 %
    assert 0.24 < sum(p.target == 0 for p in plans) / len(plans) < 0.36  # 30 %, SD 2.3 %


def test_demo_plans_cover_every_risk_category():
    gated = [p for p in cohort_module._DEMO_PLANS if "calcium_score" in p.kinds]
    categories = [ph.risk_category(p.target) for p in gated]
    assert set(categories) == set(ph.RISK_CATEGORIES) and categories.count("0") >= 2
    assert len({p.participant for p in cohort_module._DEMO_PLANS}) >= 12
    kinds = {k for p in cohort_module._DEMO_PLANS for k in p.kinds}
    assert kinds == set(cohort_module._ACQUISITIONS["demo"]) | {"localizer"}
    assert any("calcium_score" not in p.kinds and "chest" in p.kinds for p in cohort_module._DEMO_PLANS)
    assert any("calcium_score" not in p.kinds and "chest" not in p.kinds for p in cohort_module._DEMO_PLANS)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CACFLOW_SLOW_TESTS"), reason="~30 s: set CACFLOW_SLOW_TESTS=1")
def test_demo_cohort_renders_every_risk_category(tmp_path):
    manifest = generate_cohort(tmp_path, seed=0, size="demo")  # raises if a plan misses its category
    references = _read_tsv(manifest.parent / "ground_truth" / "reference_scores.tsv")
    scored = [r["risk_category"] for r in references if r["expected_status"] == "scored"]
    assert set(scored) == set(ph.RISK_CATEGORIES) and scored.count("0") >= 2


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_cohort_is_never_written_over_another_cohorts_dicom(tmp_path):
    """Another seed into the same folder would put its series beside the old ones in
    the same visit folders, with ground truth for the new ones only: refused, naming
    the folder. The same recipe again writes the same files."""
    generate_cohort(tmp_path, n_participants=2, seed=1, size="tiny", workers=1)
    first = _files(tmp_path / "dicom")
    with pytest.raises(ValueError, match="would mix its series") as refused:
        generate_cohort(tmp_path, n_participants=2, seed=2, size="tiny", workers=1)
    assert str(tmp_path / "dicom") in str(refused.value)
    assert _files(tmp_path / "dicom") == first  # nothing written
    generate_cohort(tmp_path, n_participants=2, seed=1, size="tiny", workers=1)
    assert _files(tmp_path / "dicom") == first


def test_dicom_of_an_unrecorded_cohort_is_refused_too(tmp_path):
    generate_cohort(tmp_path, n_participants=1, seed=1, size="tiny", workers=1)
    (tmp_path / "cohort.json").unlink()  # as a folder written before the record existed
    with pytest.raises(ValueError, match="DICOM from an earlier cohort"):
        generate_cohort(tmp_path, n_participants=1, seed=1, size="tiny", workers=1)


def test_the_cohort_record_holds_no_planted_identifier(tiny_cohort):
    record = (tiny_cohort.parent / "cohort.json").read_text()
    assert json.loads(record)["seed"] == 1
    assert not [value for value in PLANTED.values() if value.split("{")[0] in record]


def test_cacflow_synth_refuses_a_cohort_the_disk_cannot_hold(tmp_path, monkeypatch):
    """Against the real free space of tmp_path's disk, with participants made too large
    for any disk: refused before any series is written, with what it needs."""
    from cacflow import cli

    monkeypatch.setattr(cohort_module, "BYTES_PER_DEMO_PARTICIPANT", 2**60)
    with pytest.raises(SystemExit, match=r"cacflow synth: 2 participants' DICOM series need about .* GiB are free"):
        cli.main(["synth", str(tmp_path / "cohort"), "--participants", "2", "--workers", "1"])
    assert not list((tmp_path / "cohort").rglob("*.dcm"))


def test_series_already_in_a_cohort_folder_count_as_free_space(tmp_path, monkeypatch):
    """Writing the same cohort again overwrites its series: a folder holding 1 GiB of
    them needs 1 GiB less. Asked for 0.5 GiB less than the real free space, then 1 GiB
    more, once the held GiB is counted."""
    import shutil

    from cacflow.disk import NotEnoughDiskSpace

    held = tmp_path / "dicom" / "P001" / "baseline" / "held.bin"
    held.parent.mkdir(parents=True)
    with held.open("wb") as out:
        out.truncate(2**30)  # sparse: counted by its size, as the series it stands for
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(cohort_module, "BYTES_PER_DEMO_PARTICIPANT", free + 2**30 - 2**29)
    cohort_module._check_disk_space(tmp_path, 1, "demo")  # needs free - 0.5 GiB once the held GiB is counted
    monkeypatch.setattr(cohort_module, "BYTES_PER_DEMO_PARTICIPANT", free + 2**30 + 2**30)
    with pytest.raises(NotEnoughDiskSpace, match="1 participants' DICOM series need about"):
        cohort_module._check_disk_space(tmp_path, 1, "demo")
    cohort_module._check_disk_space(tmp_path, 10**9, "tiny")  # the tests' tiny cohorts are not checked
