"""Mass calibration from a phantom scan, and the phantom insert check.

A calibration phantom holds a rod of known hydroxyapatite (HA) density and a
water-equivalent rod. Their mean HU give the calibration line
``density = c x (HU - HU_water)`` with ``c = rho_HA / (HU_rod - HU_water)``
(mg HA per HU per mm^3). :func:`measure_phantom_inserts` scores the QRM
cardiac calcification insert (CCI) with that calibration through
:func:`cacflow.scoring.score_volume` and compares with the physical masses.
Methods and results: ``docs/scoring.md``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from cacflow.coca import read_dicom_series
from cacflow.scoring import ScoringSettings, ScanScore, score_volume
from cacflow.volume import Volume

# Detection works on images smoothed in-plane with this sigma: it removes the
# isolated noise voxels above 130 HU that would otherwise join objects.
_DETECTION_SIGMA_MM = 0.75
_DETECTION_HU = 130.0
# HU are measured inside this fraction of a rod's radius, clear of its blurred edge.
_ROD_CORE_FRACTION = 0.6
# A slice counts as fully inside the rod when its rod-water contrast is at
# least this fraction of the best slice's; partial-volume end slices fall below.
_FULL_CONTRAST_FRACTION = 0.9
# Slices where the body around the rod is darker than the brightest by more
# than this are shaded by the cone-beam edge artefact at a phantom's end.
_SHADING_TOLERANCE_HU = 15.0
# The water rod must be this much darker than the surrounding body to be found.
_WATER_ROD_MIN_CONTRAST_HU = 15.0


@dataclass
class CircularRoi:
    centre_x_px: float  # column index in the axial image
    centre_y_px: float  # row index
    radius_mm: float
    slices: list[int]
    kind: str


@dataclass
class MassCalibration:
    mg_per_hu_mm3: float
    rod_hu: float
    water_hu: float
    rod_density_mg_cm3: float
    rod_radius_mm: float
    rod_roi: CircularRoi
    water_roi: CircularRoi
    source: str

    def scoring_settings(self, base: ScoringSettings = ScoringSettings()) -> ScoringSettings:
        return replace(
            base,
            mass_calibration_mg_per_hu_mm3=self.mg_per_hu_mm3,
            mass_calibration_water_hu=self.water_hu,
            mass_calibration_source=self.source,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _disc(radius_px: float) -> np.ndarray:
    r = int(math.ceil(radius_px))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius_px * radius_px


def _distance_px(shape, centre_yx) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return np.hypot(rows - centre_yx[0], cols - centre_yx[1])


def _bright_objects(volume: Volume) -> tuple[np.ndarray, list[tuple[slice, ...]], np.ndarray]:
    """3-D components of the in-plane smoothed volume above 130 HU, with their boxes."""
    sigma_px = _DETECTION_SIGMA_MM / volume.spacing_mm[1]
    smoothed = ndimage.gaussian_filter(volume.hu, (0, sigma_px, sigma_px))
    objects, _ = ndimage.label(smoothed >= _DETECTION_HU, structure=np.ones((3, 3, 3)))
    return objects, ndimage.find_objects(objects), np.bincount(objects.ravel())


def find_calibration_rod(volume: Volume) -> tuple[tuple[float, float], float, list[int]]:
    """Centre (row, column), radius in mm and slices of the HA rod.

    The rod is the largest bright object that is a straight cylinder along z:
    10-40 mm across, round (the two in-plane extents within 20 %), and filling
    at least 70 % of the cylinder its extents describe. Bone and the phantom
    shell are not round; calcium inserts are smaller.
    """
    objects, boxes, counts = _bright_objects(volume)
    pixel_mm = volume.spacing_mm[1]
    best = None
    for index, box in enumerate(boxes, start=1):
        n_slices = box[0].stop - box[0].start
        height_mm, width_mm = (box[1].stop - box[1].start) * pixel_mm, (box[2].stop - box[2].start) * pixel_mm
        if n_slices < 2 or not (10 <= min(height_mm, width_mm) and max(height_mm, width_mm) <= 40):
            continue
        if max(height_mm, width_mm) > 1.2 * min(height_mm, width_mm):
            continue
        cylinder_px = n_slices * math.pi * (height_mm * width_mm / 4) / pixel_mm**2
        if counts[index] < 0.7 * cylinder_px:
            continue
        if best is None or counts[index] > counts[best]:
            best = index
    if best is None:
        raise ValueError("no calibration rod found; give its centre and radius")
    box = boxes[best - 1]
    mask = objects[box] == best
    areas = mask.sum(axis=(1, 2))
    _, rows, cols = np.nonzero(mask[areas >= 0.9 * areas.max()])
    centre = (float(rows.mean()) + box[1].start, float(cols.mean()) + box[2].start)
    radius_mm = math.sqrt(areas.max() / math.pi) * pixel_mm
    slices = list(range(box[0].start, box[0].stop))
    return centre, radius_mm, slices


def find_water_rod(
    volume: Volume, rod_centre: tuple[float, float], rod_radius_mm: float, rod_slices: list[int]
) -> tuple[float, float] | None:
    """Centre (row, column) of the water-equivalent rod beside the HA rod, or None.

    It is the darkest disc of the measurement ROI's size within 40 mm of the
    HA rod (both sit near the middle of a calibration insert), clear of it and
    of air, in the mean image over the rod's slices; it must be at least 15 HU
    darker than the body around the HA rod.
    """
    pixel_mm = volume.spacing_mm[1]
    radius_px = rod_radius_mm / pixel_mm
    image = volume.hu[rod_slices].mean(axis=0)
    core = _disc(_ROD_CORE_FRACTION * radius_px)
    disc_mean = signal.fftconvolve(image, core / core.sum(), mode="same")
    in_material = ndimage.distance_transform_edt(image > -300) > 1.5 * radius_px  # no air nearby
    distance = _distance_px(image.shape, rod_centre)
    # Its measurement disc must stay clear of the HA rod's blurred edge.
    clear = distance >= (1 + _ROD_CORE_FRACTION) * radius_px + 1 / pixel_mm
    candidates = in_material & clear & (distance <= 40 / pixel_mm)
    if not candidates.any():
        return None
    row, col = np.unravel_index(np.argmin(np.where(candidates, disc_mean, np.inf)), image.shape)
    body = np.median(image[(distance > radius_px + 3 / pixel_mm) & (distance < radius_px + 10 / pixel_mm)])
    if disc_mean[row, col] > body - _WATER_ROD_MIN_CONTRAST_HU:
        return None
    # The darkest disc position is noisy; the rod's centre is the centroid of the
    # dark region around it, cut halfway between the disc mean and the body.
    dark, _ = ndimage.label(in_material & (disc_mean <= (disc_mean[row, col] + body) / 2))
    rows, cols = np.nonzero(dark == dark[row, col])
    return float(rows.mean()), float(cols.mean())


def calibrate_volume(
    volume: Volume,
    rod_density_mg_cm3: float = 200.0,
    rod_centre_yx: tuple[float, float] | None = None,
    rod_radius_mm: float | None = None,
    water_centre_yx: tuple[float, float] | None = None,
    source: str = "phantom",
) -> MassCalibration:
    """Calibration factor c from the HA and water-equivalent rods of a phantom volume.

    Rod centre and radius are found automatically unless given. Without a
    water-equivalent rod the body around the HA rod is the water reference.
    HU are pooled over the slices fully inside the rod and free of shading.
    """
    if (rod_centre_yx is None) != (rod_radius_mm is None):
        raise ValueError("give both the rod centre and its radius, or neither")
    rod_slices = None
    if rod_centre_yx is None:
        rod_centre_yx, rod_radius_mm, rod_slices = find_calibration_rod(volume)
    pixel_mm = volume.spacing_mm[1]
    radius_px = rod_radius_mm / pixel_mm
    shape = volume.hu.shape[1:]
    to_rod = _distance_px(shape, rod_centre_yx)
    rod_core = to_rod <= _ROD_CORE_FRACTION * radius_px
    if rod_slices is None:
        # A 200 mg/cm^3 HA rod is some 250 HU above water on any CT.
        rod_slices = [int(z) for z in np.flatnonzero(volume.hu[:, rod_core].mean(axis=1) >= _DETECTION_HU)]
        if not rod_slices:
            raise ValueError("no slice is brighter than 130 HU at the given rod centre")
    if water_centre_yx is None:
        water_centre_yx = find_water_rod(volume, rod_centre_yx, rod_radius_mm, rod_slices)

    body = (to_rod > radius_px + 3 / pixel_mm) & (to_rod < radius_px + 8 / pixel_mm)
    if water_centre_yx is not None:
        to_water = _distance_px(shape, water_centre_yx)
        water_region = to_water <= _ROD_CORE_FRACTION * radius_px
        body &= to_water > radius_px + 2 / pixel_mm
        water_kind = "water-equivalent rod"
    else:
        water_region = body
        water_kind = "phantom body around the HA rod"

    rod_hu_slices = volume.hu[rod_slices]
    contrast = rod_hu_slices[:, rod_core].mean(axis=1) - rod_hu_slices[:, water_region].mean(axis=1)
    body_level = np.median(rod_hu_slices[:, body], axis=1)
    full = contrast >= _FULL_CONTRAST_FRACTION * contrast.max()
    used = full & (body_level >= body_level[full].max() - _SHADING_TOLERANCE_HU)
    slices = [rod_slices[i] for i in np.flatnonzero(used)]
    rod_hu = float(volume.hu[slices][:, rod_core].mean())
    water_hu = float(volume.hu[slices][:, water_region].mean())
    if rod_hu - water_hu <= 0:
        raise ValueError(f"HA rod ({rod_hu:.1f} HU) is not brighter than water ({water_hu:.1f} HU)")
    measure_radius_mm = _ROD_CORE_FRACTION * rod_radius_mm

    def roi(centre_yx, radius_mm, kind):
        return CircularRoi(float(centre_yx[1]), float(centre_yx[0]), float(radius_mm), slices, kind)

    if water_centre_yx is not None:
        water_roi = roi(water_centre_yx, measure_radius_mm, water_kind)
    else:
        water_roi = roi(rod_centre_yx, rod_radius_mm + 8, water_kind)
    return MassCalibration(
        mg_per_hu_mm3=rod_density_mg_cm3 / 1000.0 / (rod_hu - water_hu),
        rod_hu=rod_hu,
        water_hu=water_hu,
        rod_density_mg_cm3=float(rod_density_mg_cm3),
        rod_radius_mm=float(rod_radius_mm),
        rod_roi=roi(rod_centre_yx, measure_radius_mm, "hydroxyapatite rod"),
        water_roi=water_roi,
        source=source,
    )


def calibrate_dicom(dicom_dir: str | Path, **options) -> MassCalibration:
    """:func:`calibrate_volume` on a phantom DICOM series; source 'phantom:<dir>'."""
    series = read_dicom_series(dicom_dir)
    return calibrate_volume(series.volume, source=f"phantom:{dicom_dir}", **options)


# QRM cardiac calcification insert: cylinders whose length equals their
# diameter (5, 3, 1 mm), nominal densities 200/400/800 mg HA/cm^3; each density
# lies on one radius of the insert, the medium and small cylinders at 2/3 and
# 1/3 of the large one's distance from the centre.
CCI_DIAMETER_MM = {"large": 5.0, "medium": 3.0, "small": 1.0}
CCI_RADIAL_FRACTION = {"large": 1.0, "medium": 2 / 3, "small": 1 / 3}
CCI_DENSITY_MG_CM3 = {"low": 200.0, "medium": 400.0, "high": 800.0}
# Search margin around an insert's nominal radius for voxels of its blur.
_INSERT_ROI_MARGIN_MM = 2.0


def _circumcentre(points: np.ndarray) -> np.ndarray:
    (ay, ax), (by, bx), (cy, cx) = points
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    ux = ((ax**2 + ay**2) * (by - cy) + (bx**2 + by**2) * (cy - ay) + (cx**2 + cy**2) * (ay - by)) / d
    uy = ((ax**2 + ay**2) * (cx - bx) + (bx**2 + by**2) * (ax - cx) + (cx**2 + cy**2) * (bx - ax)) / d
    return np.array([uy, ux])


def _insert_labels(
    volume: Volume, threshold_hu: float, centre_yx: np.ndarray, radius_mm: float, slab: range
) -> np.ndarray:
    """Label volume marking the voxels >= threshold connected to one insert.

    Inside a cylinder of the insert's radius + 2 mm over the insert slices
    (one more above and below), keep the 3-D connected groups of voxels at or
    above the threshold that reach into the insert's nominal cross-section.
    """
    pixel_mm = volume.spacing_mm[1]
    reach_px = (radius_mm + _INSERT_ROI_MARGIN_MM) / pixel_mm
    # Work in the cylinder's bounding box: labelling the whole volume per insert is slow.
    box = (
        slice(max(slab.start - 1, 0), min(slab.stop + 1, volume.hu.shape[0])),
        slice(max(int(centre_yx[0] - reach_px), 0), int(centre_yx[0] + reach_px) + 2),
        slice(max(int(centre_yx[1] - reach_px), 0), int(centre_yx[1] + reach_px) + 2),
    )
    hu = volume.hu[box]
    distance = _distance_px(hu.shape[1:], (centre_yx[0] - box[1].start, centre_yx[1] - box[2].start))
    groups, _ = ndimage.label((hu >= threshold_hu) & (distance <= reach_px), structure=np.ones((3, 3, 3)))
    seed = np.zeros(hu.shape, dtype=bool)
    seed[slab.start - box[0].start : slab.stop - box[0].start] = distance <= radius_mm / pixel_mm
    touching = np.unique(groups[seed & (groups > 0)])
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    labels[box] = np.isin(groups, touching)
    return labels


def _reference_masses(reference_csv: str | Path) -> dict[tuple[str, str], float]:
    masses = {}
    with open(reference_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            density = row["inserts"].split()[0].lower()
            for size in CCI_DIAMETER_MM:
                masses[(size, density)] = float(row[f"ground_truth_mass_{size}"])
    return masses


def measure_phantom_inserts(
    dicom_dir: str | Path,
    reference_csv: str | Path | None = None,
    calibration: MassCalibration | None = None,
    settings: ScoringSettings = ScoringSettings(),
) -> list[dict]:
    """:func:`measure_inserts` on a QRM phantom DICOM series.

    The calibration comes from the phantom's own rods unless given. With
    ``reference_csv`` (MolloiLab layout: one row per density, columns
    ``ground_truth_mass_<size>``) each row gains the physical mass and the error.
    """
    series = read_dicom_series(dicom_dir)
    if calibration is None:
        calibration = calibrate_volume(series.volume, source=f"phantom:{dicom_dir}")
    reference = _reference_masses(reference_csv) if reference_csv is not None else None
    return measure_inserts(series.volume, calibration.scoring_settings(settings), series.kvp, reference)


def measure_inserts(
    volume: Volume,
    settings: ScoringSettings,
    kvp: float | None = None,
    reference: dict[tuple[str, str], float] | None = None,
) -> list[dict]:
    """Volume and mass of the nine CCI inserts, scored with :func:`score_volume`.

    Each row gives the mass by ``settings.mass_method`` (``mass_mg``) and, for
    comparison, by the threshold definition (``threshold_mass_mg``) and the
    conventional c x mean HU x volume (``conventional_mass_mg``).
    The three large inserts are the three largest compact bright objects; their
    mean HU orders them low, medium, high density; the insert centre is their
    circumcentre, and the layout gives the medium and small inserts' places.
    ``reference`` maps (size, density) to the physical mass in mg.
    """
    if settings.mass_calibration_mg_per_hu_mm3 is None:
        raise ValueError("measuring insert masses needs a mass calibration factor")
    pixel_mm = volume.spacing_mm[1]

    objects, boxes, counts = _bright_objects(volume)
    # Inserts are at most 5 mm; with blur and noise their objects stay within 12 mm.
    compact = [
        index
        for index, box in enumerate(boxes, start=1)
        if (box[0].stop - box[0].start) * volume.spacing_mm[0] <= 12
        and max(box[1].stop - box[1].start, box[2].stop - box[2].start) * pixel_mm <= 12
    ]
    if len(compact) < 3:
        raise ValueError("fewer than three calcium inserts found")
    compact_centroids = {
        index: np.array(centroid[1:])
        for index, centroid in zip(compact, ndimage.center_of_mass(objects > 0, objects, compact))
    }
    large = sorted(compact, key=lambda i: counts[i], reverse=True)[:3]
    large_mean_hu = ndimage.mean(volume.hu, objects, large)
    large = [i for _, i in sorted(zip(large_mean_hu, large))]
    centroids = np.array([compact_centroids[i] for i in large])
    insert_centre = _circumcentre(centroids)
    slab = range(min(boxes[i - 1][0].start for i in large), max(boxes[i - 1][0].stop for i in large))
    reference = reference or {}

    results = []
    for density, large_centroid in zip(CCI_DENSITY_MG_CM3, centroids):
        for size, diameter in CCI_DIAMETER_MM.items():
            predicted = insert_centre + CCI_RADIAL_FRACTION[size] * (large_centroid - insert_centre)
            # Snap to a detected object within 2 mm of where the layout puts the insert.
            nearby = [c for c in compact_centroids.values() if np.hypot(*(c - predicted)) * pixel_mm <= 2]
            centre = min(nearby, key=lambda c: np.hypot(*(c - predicted))) if nearby else predicted
            labels = _insert_labels(volume, settings.threshold_hu, centre, diameter / 2, slab)

            def scored(mass_method: str) -> ScanScore:
                return score_volume(
                    volume.hu,
                    labels,
                    volume.spacing_mm,
                    replace(settings, mass_method=mass_method),
                    kvp=kvp,
                    slice_thickness_mm=volume.slice_thickness_mm,
                    z_positions_mm=volume.z_positions_mm,
                )

            scan = scored(settings.mass_method)
            # The threshold definition, for comparison: c x (mean HU - water HU) x volume.
            threshold_mass = scan.mass_mg if settings.mass_method == "threshold" else scored("threshold").mass_mg
            nominal_volume = math.pi * (diameter / 2) ** 2 * diameter
            row = {
                "insert": f"{size}-{density}",
                "size": size,
                "density": density,
                "nominal_density_mg_cm3": CCI_DENSITY_MG_CM3[density],
                "centre_x_px": round(float(centre[1]), 1),
                "centre_y_px": round(float(centre[0]), 1),
                "detected": scan.lesion_count > 0,
                "lesion_count": scan.lesion_count,
                "agatston": scan.agatston_total,
                "volume_mm3": scan.volume_mm3,
                "nominal_volume_mm3": nominal_volume,
                "mass_mg": scan.mass_mg,
                "mass_method": scan.mass_method,
                "threshold_mass_mg": threshold_mass,
                # The conventional c x mean HU x volume (no water offset), as the MolloiLab software.
                "conventional_mass_mg": threshold_mass
                + settings.mass_calibration_mg_per_hu_mm3 * settings.mass_calibration_water_hu * scan.volume_mm3,
            }
            if (size, density) in reference:
                physical = reference[(size, density)]
                row["physical_mass_mg"] = physical
                row["mass_error_pct"] = 100.0 * (scan.mass_mg - physical) / physical
                row["threshold_mass_error_pct"] = 100.0 * (threshold_mass - physical) / physical
                row["conventional_mass_error_pct"] = 100.0 * (row["conventional_mass_mg"] - physical) / physical
            results.append(row)
    return results
