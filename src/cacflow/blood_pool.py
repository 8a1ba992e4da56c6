"""Contrast from the image itself: the Hounsfield units of the cardiac blood pool.

Many archives blank the contrast tags, so after conversion the chosen series'
volume is measured too. Unenhanced blood is 30-60 HU; iodinated blood in a CTA
is 250-600 HU. The measurement needs no model:

1. work on a ~3 mm grid of block means (speed, and less noise; the blood pool
   is large);
2. find the lungs (-975..-400 HU: lung parenchyma, not true air or the padding
   outside the reconstruction circle, so lungs cut by a cardiac field of view
   are still found) and, in each axial slice, the span between their outer edges: the mediastinum, where the heart and great vessels
   lie. Only the anterior 60 % of the lungs' front-to-back extent is used, which
   leaves out the spine (its cancellous bone is 150-300 HU, like contrast);
3. an enhanced blood pool is the set of 3-D blobs of 150-800 HU voxels there
   that survive a ~6 mm in-plane opening (calcium and thin bone do not) and hold
   at least ``MIN_CHAMBER_ML`` each (chambers and great vessels are separate
   blobs), when together they are large: at least ``MIN_ENHANCED_ML`` and
   ``MIN_ENHANCED_FRACTION`` of the region's soft tissue. Their median HU is the
   blood-pool value;
4. otherwise the blood pool is unenhanced and its value is the median of the
   region's -50..150 HU voxels (blood and myocardium, which have the same HU
   without contrast).

A volume without two lungs (a phantom, a field of view cut to the heart) is
``unmeasured``: QC then warns instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID_MM = 3.0  # working grid
LUNG_HU = (-975.0, -400.0)  # parenchyma; outside air and padding are below
MIN_LUNG_ML = 30.0  # each lung, within the scanned range and field of view
ANTERIOR_FRACTION = 0.6  # of the lungs' front-to-back extent
ENHANCED_HU = (150.0, 800.0)
UNENHANCED_HU = (-50.0, 150.0)
OPENING_MM = 6.0
MIN_CHAMBER_ML = 5.0  # chambers and great vessels are separate blobs; each counts from this size
MIN_ENHANCED_ML = 20.0
MIN_ENHANCED_FRACTION = 0.2
MIN_REGION_ML = 30.0


@dataclass(frozen=True)
class BloodPool:
    hu: float | None  # the blood pool's median HU; None when unmeasured
    enhanced: bool  # a large enhanced blob was found
    volume_ml: float  # of the voxels the value was taken from
    note: str  # how it was measured, or why it could not be


def measure_blood_pool(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> BloodPool:
    """Blood-pool HU of a canonical volume ``hu[z, y, x]`` (see ``cacflow.volume``)."""
    steps = [max(1, int(round(GRID_MM / float(s)))) for s in spacing_mm]
    coarse = _block_means(np.asarray(hu, dtype=np.float32), steps)
    voxel_ml = float(np.prod([s * n for s, n in zip(spacing_mm, steps)])) / 1000.0

    lungs = _lungs(coarse, voxel_ml)
    if lungs is None:
        return BloodPool(None, False, 0.0, "no pair of lungs in the volume, so no mediastinum to measure")
    region = _mediastinum(lungs) & (coarse > LUNG_HU[1])
    if region.sum() * voxel_ml < MIN_REGION_ML:
        return BloodPool(None, False, 0.0, "the mediastinum between the lungs is too small to measure")

    soft = region & (coarse >= UNENHANCED_HU[0]) & (coarse <= ENHANCED_HU[1])
    enhanced = region & (coarse >= ENHANCED_HU[0]) & (coarse <= ENHANCED_HU[1])
    radius = [max(1, int(round(OPENING_MM / (s * n)))) for s, n in zip(spacing_mm[1:], steps[1:])]
    disc = _disc(*radius)[None]  # in-plane only: thick slices make z openings meaningless
    enhanced = ndimage.binary_opening(enhanced, structure=disc)
    labelled, n = ndimage.label(enhanced)
    if n:
        sizes_ml = np.bincount(labelled.ravel())[1:] * voxel_ml
        chambers = np.isin(labelled, np.nonzero(sizes_ml >= MIN_CHAMBER_ML)[0] + 1)
        pool_ml = float(chambers.sum()) * voxel_ml
        if pool_ml >= MIN_ENHANCED_ML and pool_ml >= MIN_ENHANCED_FRACTION * soft.sum() * voxel_ml:
            value = float(np.median(coarse[chambers]))
            return BloodPool(value, True, pool_ml, f"enhanced blood pool of {pool_ml:.0f} mL")

    unenhanced = region & (coarse >= UNENHANCED_HU[0]) & (coarse <= UNENHANCED_HU[1])
    if unenhanced.sum() * voxel_ml < MIN_REGION_ML:
        return BloodPool(None, False, 0.0, "too little soft tissue between the lungs to measure")
    volume_ml = float(unenhanced.sum()) * voxel_ml
    value = float(np.median(coarse[unenhanced]))
    return BloodPool(value, False, volume_ml, f"unenhanced mediastinum of {volume_ml:.0f} mL")


def _block_means(hu: np.ndarray, steps: list[int]) -> np.ndarray:
    shape = [size // step for size, step in zip(hu.shape, steps)]
    cropped = hu[: shape[0] * steps[0], : shape[1] * steps[1], : shape[2] * steps[2]]
    return cropped.reshape(shape[0], steps[0], shape[1], steps[1], shape[2], steps[2]).mean(axis=(1, 3, 5))


def _lungs(coarse: np.ndarray, voxel_ml: float) -> np.ndarray | None:
    """The two largest parenchyma regions, if both are lung-sized and on either side."""
    labelled, n = ndimage.label((coarse >= LUNG_HU[0]) & (coarse <= LUNG_HU[1]))
    if n < 2:
        return None
    sizes = np.bincount(labelled.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    if sizes[order[1]] * voxel_ml < MIN_LUNG_ML:
        return None
    # the two lungs must lie on either side of the midline, not be one lung cut in two
    columns = [np.nonzero(labelled == label + 1)[2].mean() for label in order]
    if abs(columns[0] - columns[1]) < 0.15 * coarse.shape[2]:
        return None
    return np.isin(labelled, order + 1)


def _mediastinum(lungs: np.ndarray) -> np.ndarray:
    """Per slice and row, the span between the lungs' outer edges, front part only."""
    region = np.zeros(lungs.shape, dtype=bool)
    rows = np.nonzero(lungs.any(axis=(0, 2)))[0]
    front, back = rows.min(), rows.max()
    last_row = front + int(ANTERIOR_FRACTION * (back - front))
    for z in range(lungs.shape[0]):
        for y in range(front, last_row + 1):
            columns = np.nonzero(lungs[z, y])[0]
            if columns.size:
                region[z, y, columns[0]: columns[-1] + 1] = True
    return region & ~lungs


def _disc(radius_y: int, radius_x: int) -> np.ndarray:
    y, x = np.ogrid[-radius_y: radius_y + 1, -radius_x: radius_x + 1]
    return (y / max(radius_y, 1)) ** 2 + (x / max(radius_x, 1)) ** 2 <= 1.0
