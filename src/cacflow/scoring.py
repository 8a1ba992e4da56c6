"""Agatston, volume and mass scores per lesion, vessel and scan.

The one scoring implementation of cacflow: the workflow, the single-scan
``cacflow agatston`` command, the COCA reference builder and the phantom check
all call :func:`score_volume`. Every definition choice is written up in
``docs/scoring.md``; the comments here say why the code does what it does.

Arrays are canonical ``[z, y, x]`` (see :mod:`cacflow.volume`);
``spacing_mm = (slice increment, row spacing, column spacing)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage

from cacflow import VESSEL_LABELS
from cacflow.volume import Volume

# Agatston et al. 1990, at 120 kVp: lesions from 130 HU; density weight 1 for a
# peak of 130-199 HU, 2 from 200, 3 from 300, 4 from 400.
STANDARD_THRESHOLD_HU = 130.0
STANDARD_WEIGHT_CUTOFFS_HU = (200.0, 300.0, 400.0)  # lowest peak HU of weights 2, 3, 4

# kVp-specific levels (Grani et al. 2018, as in CalciumScoring.jl):
# kVp -> (lesion threshold, last peak HU of weight 1, of weight 2, of weight 3).
# The 120 kVp row reproduces the standard levels when the cut-offs are read as
# the highest HU of the lower weight, so weight k+1 starts at cut-off + 1.
KVP_LEVELS_HU = {
    70: (207.0, 318.0, 477.0, 636.0),
    80: (177.0, 271.0, 408.0, 544.0),
    100: (145.0, 222.0, 334.0, 446.0),
    120: (130.0, 199.0, 299.0, 399.0),
    135: (119.0, 183.0, 274.0, 364.0),
}

RISK_CATEGORIES = ("0", "1-10", "11-100", "101-400", ">400")

# Within-slice 8-connectivity, nothing across slices: Agatston lesions are 2-D.
_IN_SLICE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE_8_CONNECTED[1] = True

_MAX_VESSEL_LABEL = max(VESSEL_LABELS)

# Mass definitions: "integrated" (default) integrates the calcium's excess over the
# local background across the lesion's partial-volume blur; "threshold" is the
# conventional c x (mean HU - water HU) x volume over the >= threshold voxels.
MASS_METHODS = ("integrated", "threshold")


@dataclass(frozen=True)
class ScoringSettings:
    threshold_hu: float = STANDARD_THRESHOLD_HU
    min_area_mm2: float = 1.0
    reference_increment_mm: float = 3.0
    kvp_adjusted_thresholds: bool = False
    # Mass calibration: density = c * (HU - water HU), c in mg HA per HU per mm^3.
    mass_calibration_mg_per_hu_mm3: float | None = None
    mass_calibration_source: str = "none"
    # HU of water measured with the same calibration (0 on a scanner whose water
    # calibration is exact); the zero point of the calibration line.
    mass_calibration_water_hu: float = 0.0
    mass_method: str = "integrated"  # one of MASS_METHODS
    # Integrated mass: the lesion is widened in-plane by mass_margin_mm to take in
    # its blur (the in-plane point spread of calcium-scoring kernels is about
    # 1-1.6 mm FWHM; 1.5 mm, Gaussian sigma 0.65 mm, on the QRM phantom scan: 1 mm
    # beyond the threshold contour leaves about 2.5 % of a 3 mm calcification's
    # mass outside); the local background is the median HU of the ring of width
    # mass_ring_mm just outside the margin.
    mass_margin_mm: float = 1.0
    mass_ring_mm: float = 2.0

    def __post_init__(self) -> None:
        if self.mass_method not in MASS_METHODS:
            raise ValueError(f"mass_method must be one of {MASS_METHODS}, got {self.mass_method!r}")
        if not self.mass_margin_mm >= 0:
            raise ValueError(f"mass_margin_mm must be >= 0, got {self.mass_margin_mm!r}")
        if not self.mass_ring_mm > 0:
            raise ValueError(f"mass_ring_mm must be > 0, got {self.mass_ring_mm!r}")


@dataclass
class Lesion:
    lesion_id: int
    vessel: str
    slice_index: int
    z_mm: float
    area_mm2: float
    peak_hu: float
    mean_hu: float
    density_weight: int
    agatston: float
    volume_mm3: float
    mass_mg: float | None
    voxel_count: int
    # Integrated mass: the local background HU subtracted on the lesion's own slice.
    mass_background_hu: float | None = None


@dataclass
class ScanScore:
    agatston_total: float
    agatston_lm: float
    agatston_lad: float
    agatston_lcx: float
    agatston_rca: float
    volume_mm3: float
    mass_mg: float | None
    lesion_count: int
    risk_category: str
    cac_drs: str
    threshold_hu: float
    kvp_adjusted: bool
    kvp: float | None
    min_area_mm2: float
    mass_calibration_mg_per_hu_mm3: float | None
    mass_calibration_source: str
    mass_calibration_water_hu: float
    mass_method: str
    mass_margin_mm: float | None
    mass_ring_mm: float | None
    mass_adjacent_slices: int | None
    slice_increment_mm: float
    slice_thickness_mm: float | None
    increment_scale: float
    lesions: list[Lesion] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dictionary; ``lesions`` becomes a list of dictionaries."""
        return asdict(self)


def kvp_adjusted_levels(kvp: float) -> tuple[float, tuple[float, float, float]]:
    """Lesion threshold and lowest peak HU of weights 2, 3, 4 at a tube voltage.

    Linear interpolation between the tabulated voltages; outside 70-135 kVp the
    nearest tabulated row is used.
    """
    voltages = sorted(KVP_LEVELS_HU)
    rows = np.array([KVP_LEVELS_HU[v] for v in voltages])
    threshold, *last_of_lower = (float(np.interp(kvp, voltages, rows[:, i])) for i in range(4))
    return threshold, tuple(level + 1.0 for level in last_of_lower)


def _weight_levels(kvp: float | None, adjusted: bool) -> tuple[float, tuple[float, float, float]]:
    if adjusted and kvp is not None:
        return kvp_adjusted_levels(kvp)
    return STANDARD_THRESHOLD_HU, STANDARD_WEIGHT_CUTOFFS_HU


def _weights(peaks: np.ndarray, weight_one_from: float, cutoffs: tuple[float, ...]) -> np.ndarray:
    weights = 1 + np.searchsorted(np.asarray(cutoffs), peaks, side="right")
    # A lesion found with a custom threshold below the Agatston level scores 0.
    return np.where(peaks >= weight_one_from, weights, 0)


def density_weight(peak_hu: float, kvp: float | None = None, adjusted: bool = False) -> int:
    """Agatston density weight (0-4) of a lesion with this peak HU."""
    weight_one_from, cutoffs = _weight_levels(kvp, adjusted)
    return int(_weights(np.array([peak_hu], dtype=np.float64), weight_one_from, cutoffs)[0])


def _check_score(agatston_total: float) -> None:
    if not agatston_total >= 0:  # also rejects NaN
        raise ValueError(f"Agatston score must be a number >= 0, got {agatston_total!r}")


def risk_category(agatston_total: float) -> str:
    """Rumberger category, intervals closed above: 0, (0,10], (10,100], (100,400], >400."""
    _check_score(agatston_total)
    if agatston_total == 0:
        return RISK_CATEGORIES[0]
    for upper, category in zip((10, 100, 400), RISK_CATEGORIES[1:]):
        if agatston_total <= upper:
            return category
    return RISK_CATEGORIES[-1]


def cac_drs(agatston_total: float, n_vessels: int) -> str:
    """CAC-DRS (SCCT 2018): A0; A1 below 100; A2 from 100 below 300; A3 from 300; '/N<vessels>'."""
    _check_score(agatston_total)
    if agatston_total == 0:
        return "A0"
    grade = 1 if agatston_total < 100 else 2 if agatston_total < 300 else 3
    return f"A{grade}/N{n_vessels}"


def agatston_range(
    hu: np.ndarray,
    labels: np.ndarray,
    flipped_labels: np.ndarray,
    spacing_mm: tuple[float, float, float],
    settings: ScoringSettings = ScoringSettings(),
    *,
    kvp: float | None = None,
    z_positions_mm: np.ndarray | None = None,
) -> tuple[float, float]:
    """Total Agatston if every calcium candidate the model was unsure about is not
    coronary, and if every one is coronary. ``flipped_labels`` is ``labels`` with each
    unsure decision reversed (``cacflow.inference``), so the lowest labelling keeps a
    candidate only where both agree and the highest takes either's vessel."""
    if labels.shape != flipped_labels.shape:
        raise ValueError(f"flipped labels shape {flipped_labels.shape} differs from labels shape {labels.shape}")
    without_mass = replace(settings, mass_calibration_mg_per_hu_mm3=None)  # Agatston only: skip the mass work

    def total(chosen: np.ndarray) -> float:
        return score_volume(hu, chosen, spacing_mm, without_mass, kvp=kvp, z_positions_mm=z_positions_mm).agatston_total

    if np.array_equal(labels, flipped_labels):  # no unsure call (most scans): one scoring pass, not two
        only = total(labels)
        return only, only
    lowest = np.where(flipped_labels == 0, 0, labels).astype(labels.dtype)
    return total(lowest), total(np.maximum(labels, flipped_labels))


def _check_inputs(hu: np.ndarray, labels: np.ndarray, spacing_mm, z_positions_mm) -> None:
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D [z, y, x], got shape {hu.shape}")
    if labels.shape != hu.shape:
        raise ValueError(f"labels shape {labels.shape} differs from CT shape {hu.shape}")
    if len(spacing_mm) != 3 or not all(s > 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    if z_positions_mm is not None and len(z_positions_mm) != hu.shape[0]:
        raise ValueError(f"{len(z_positions_mm)} z positions for {hu.shape[0]} slices")


def score_volume(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_mm: tuple[float, float, float],
    settings: ScoringSettings = ScoringSettings(),
    *,
    kvp: float | None = None,
    slice_thickness_mm: float | None = None,
    z_positions_mm: np.ndarray | None = None,
) -> ScanScore:
    """Score calcium inside the vessel labels (1 LM, 2 LAD, 3 LCX, 4 RCA) of a CT volume.

    The mass needs ``settings.mass_calibration_mg_per_hu_mm3``; the integrated
    mass also uses ``slice_thickness_mm`` (how many adjacent slices it takes in,
    :func:`adjacent_slices`).
    """
    _check_inputs(hu, labels, spacing_mm, z_positions_mm)
    increment, row_mm, col_mm = (float(s) for s in spacing_mm)
    pixel_area = row_mm * col_mm
    voxel_volume = pixel_area * increment
    increment_scale = increment / settings.reference_increment_mm
    adjusted = settings.kvp_adjusted_thresholds and kvp is not None
    weight_one_from, cutoffs = _weight_levels(kvp, adjusted)
    threshold = weight_one_from if adjusted else float(settings.threshold_hu)
    c = settings.mass_calibration_mg_per_hu_mm3

    # Label values other than 1-4 (e.g. a model's "other calcium") are not coronary.
    candidates = (hu >= threshold) & (labels >= 1) & (labels <= _MAX_VESSEL_LABEL)
    found = _find_lesions(hu, labels, candidates)
    keep = found.voxel_count * pixel_area >= settings.min_area_mm2
    order = np.lexsort((found.first_voxel[keep], found.vessel_label[keep], found.slice_index[keep]))
    voxel_count, peak, hu_sum = found.voxel_count[keep][order], found.peak[keep][order], found.hu_sum[keep][order]
    vessel_label, slice_index = found.vessel_label[keep][order], found.slice_index[keep][order]
    component = found.component[keep][order]

    area = voxel_count * pixel_area
    weight = _weights(peak.astype(np.float64), weight_one_from, cutoffs)
    agatston = area * weight * increment_scale
    volume = voxel_count * voxel_volume
    mean_hu = hu_sum / np.maximum(voxel_count, 1)
    integrated = settings.mass_method == "integrated"
    adjacent = adjacent_slices(increment, slice_thickness_mm) if integrated else None
    mass = background = None
    if c is not None and integrated:
        excess, background = _integrated_excess(
            hu, labels, found, component, slice_index, threshold, (row_mm, col_mm),
            settings.mass_margin_mm, settings.mass_ring_mm, adjacent, settings.mass_calibration_water_hu,
        )
        mass = c * np.maximum(excess, 0.0) * voxel_volume
    elif c is not None:
        mass = c * (mean_hu - settings.mass_calibration_water_hu) * volume
    if z_positions_mm is None:
        z_mm = slice_index * increment
    else:
        z_mm = np.asarray(z_positions_mm, dtype=np.float64)[slice_index]

    lesion_list = [
        Lesion(
            lesion_id=i + 1,
            vessel=VESSEL_LABELS[int(vessel_label[i])],
            slice_index=int(slice_index[i]),
            z_mm=float(z_mm[i]),
            area_mm2=float(area[i]),
            peak_hu=float(peak[i]),
            mean_hu=float(mean_hu[i]),
            density_weight=int(weight[i]),
            agatston=float(agatston[i]),
            volume_mm3=float(volume[i]),
            mass_mg=None if mass is None else float(mass[i]),
            voxel_count=int(voxel_count[i]),
            mass_background_hu=None if background is None else float(background[i]),
        )
        for i in range(len(voxel_count))
    ]
    per_vessel = {
        name: float(agatston[vessel_label == value].sum()) for value, name in VESSEL_LABELS.items()
    }
    total = float(agatston.sum())
    n_vessels = sum(1 for score in per_vessel.values() if score > 0)
    return ScanScore(
        agatston_total=total,
        agatston_lm=per_vessel["lm"],
        agatston_lad=per_vessel["lad"],
        agatston_lcx=per_vessel["lcx"],
        agatston_rca=per_vessel["rca"],
        volume_mm3=float(volume.sum()),
        mass_mg=None if mass is None else float(mass.sum()),
        lesion_count=len(lesion_list),
        risk_category=risk_category(total),
        cac_drs=cac_drs(total, n_vessels),
        threshold_hu=float(threshold),
        kvp_adjusted=bool(adjusted),
        kvp=None if kvp is None else float(kvp),
        min_area_mm2=float(settings.min_area_mm2),
        mass_calibration_mg_per_hu_mm3=None if c is None else float(c),
        mass_calibration_source=settings.mass_calibration_source,
        mass_calibration_water_hu=float(settings.mass_calibration_water_hu),
        mass_method=settings.mass_method,
        mass_margin_mm=float(settings.mass_margin_mm) if integrated else None,
        mass_ring_mm=float(settings.mass_ring_mm) if integrated else None,
        mass_adjacent_slices=adjacent,
        slice_increment_mm=increment,
        slice_thickness_mm=None if slice_thickness_mm is None else float(slice_thickness_mm),
        increment_scale=float(increment_scale),
        lesions=lesion_list,
    )


@dataclass
class _Components:
    """Per-slice 8-connected components of the calcium candidates, one row per component.

    ``labelled`` holds the component number (1..n) of every candidate voxel inside
    ``box``, the bounding box of all candidates; ``objects[k - 1]`` is the box of
    component k within it. ``vessel_label`` is the label holding most of the
    component's voxels, the lowest label value on a tie; ``first_voxel`` is the
    in-slice raster index (y * nx + x) of its first voxel.
    """

    voxel_count: np.ndarray
    peak: np.ndarray
    hu_sum: np.ndarray
    vessel_label: np.ndarray
    slice_index: np.ndarray
    first_voxel: np.ndarray
    component: np.ndarray
    labelled: np.ndarray | None = None
    box: tuple[slice, ...] | None = None
    objects: list | None = None


def _find_lesions(hu: np.ndarray, labels: np.ndarray, candidates: np.ndarray) -> _Components:
    """Per-slice 8-connected components of the candidate voxels (see :class:`_Components`)."""
    if not candidates.any():
        none = np.zeros(0, dtype=np.int64)
        return _Components(none, none.astype(np.float64), none.astype(np.float64), none, none, none, none)
    # Label only the bounding box of the candidates: calcium is sparse.
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(candidates))
    components, n = ndimage.label(candidates[box], structure=_IN_SLICE_8_CONNECTED)
    flat = components.ravel()
    voxels = np.flatnonzero(flat)  # raster order, so the first of each component comes first
    component = flat[voxels]
    order = np.argsort(component, kind="stable")
    voxels, component = voxels[order], component[order]
    starts = np.flatnonzero(np.r_[True, component[1:] != component[:-1]])

    values = hu[box].ravel()[voxels]
    peak = np.maximum.reduceat(values, starts)
    hu_sum = np.add.reduceat(values.astype(np.float64), starts)
    voxel_count = np.diff(np.r_[starts, len(voxels)])

    vessel_of_voxel = labels[box].ravel()[voxels].astype(np.int64)
    votes = np.bincount(
        (component - 1) * (_MAX_VESSEL_LABEL + 1) + vessel_of_voxel,
        minlength=n * (_MAX_VESSEL_LABEL + 1),
    ).reshape(n, _MAX_VESSEL_LABEL + 1)
    vessel_label = np.argmax(votes[:, 1:], axis=1) + 1  # argmax takes the first, i.e. lowest, label

    z, y, x = np.unravel_index(voxels[starts], components.shape)
    slice_index = z + box[0].start
    first_voxel = (y + box[1].start) * hu.shape[2] + (x + box[2].start)
    return _Components(
        voxel_count, peak, hu_sum, vessel_label, slice_index, first_voxel,
        component=component[starts], labelled=components, box=box, objects=ndimage.find_objects(components),
    )


def adjacent_slices(increment_mm: float, thickness_mm: float | None = None) -> int:
    """Slices on each side of a lesion's slice that the integrated mass takes in.

    Calcium that ends inside a slab shows on the next slice below the threshold
    (through-plane partial volume); the slab of a slice reaches one slice
    thickness from the centre of its neighbours' slabs, so the slices whose
    centres lie within one thickness count: 1 for contiguous slices, 2 for 3 mm
    every 1.5 mm. Without a known thickness, slices are taken as contiguous.
    """
    if thickness_mm is None or not thickness_mm > 0:
        return 1
    return max(1, int(math.floor(thickness_mm / increment_mm + 1e-6)))


def _integrated_excess(
    hu: np.ndarray,
    labels: np.ndarray,
    found: _Components,
    component: np.ndarray,
    slice_index: np.ndarray,
    threshold: float,
    pixel_mm: tuple[float, float],
    margin_mm: float,
    ring_mm: float,
    adjacent: int,
    water_hu: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of (HU - local background) over each lesion's integration region, in HU x voxels.

    Returns (excess, own-slice background HU) per kept lesion (in lesion order).
    A lesion's region on its own slice is the set of voxels within ``margin_mm``
    of its pixels and nearer to them than to any other lesion's on that slice; on
    the ``adjacent`` slices on each side, the same footprint less the voxels that
    belong to a lesion there (within the margin of its pixels) or to a lesion on a
    nearer slice (a tie goes to the lower slice). Voxels at or above the threshold
    outside the coronary labels (other calcium, bone) are never counted. Each
    slice's background is the median HU of the lesion's ring (``margin_mm`` to
    ``margin_mm + ring_mm`` from its pixels) on that slice, less the voxels at or
    above the threshold and those within the margin of any lesion on that slice or
    within ``adjacent`` slices of it; it is at least ``water_hu``.
    Works on a small window around each lesion.
    """
    n = len(component)
    excess = np.zeros(n, dtype=np.float64)
    background = np.zeros(n, dtype=np.float64)
    if n == 0:
        return excess, background
    nz, ny, nx = hu.shape
    row_mm, col_mm = pixel_mm
    sampling = (row_mm, col_mm)
    # Component number -> lesion number (1..n in lesion order); 0 for dropped components.
    lookup = np.zeros(len(found.objects) + 1, dtype=np.int32)
    lookup[component] = np.arange(1, n + 1, dtype=np.int32)
    box, labelled = found.box, found.labelled
    # Other lesions within the margin of this lesion's ring voxels lie within this reach.
    reach_y = int(math.ceil((2 * margin_mm + ring_mm) / row_mm)) + 1
    reach_x = int(math.ceil((2 * margin_mm + ring_mm) / col_mm)) + 1

    for index in range(n):
        lesion = index + 1
        z = int(slice_index[index])
        obj = found.objects[component[index] - 1]
        ys = slice(max(obj[1].start + box[1].start - reach_y, 0), min(obj[1].stop + box[1].start + reach_y, ny))
        xs = slice(max(obj[2].start + box[2].start - reach_x, 0), min(obj[2].stop + box[2].start + reach_x, nx))
        shape = (ys.stop - ys.start, xs.stop - xs.start)
        first, last = max(z - 2 * adjacent, 0), min(z + 2 * adjacent, nz - 1)

        def lesions_on(s: int) -> np.ndarray:
            out = np.zeros(shape, dtype=np.int32)
            bz = s - box[0].start
            if not 0 <= bz < labelled.shape[0]:
                return out
            y0, y1 = max(ys.start, box[1].start), min(ys.stop, box[1].stop)
            x0, x1 = max(xs.start, box[2].start), min(xs.stop, box[2].stop)
            if y0 < y1 and x0 < x1:
                part = labelled[bz, y0 - box[1].start : y1 - box[1].start, x0 - box[2].start : x1 - box[2].start]
                out[y0 - ys.start : y1 - ys.start, x0 - xs.start : x1 - xs.start] = lookup[part]
            return out

        owners = {s: lesions_on(s) for s in range(first, last + 1)}
        # Voxels within the margin of any lesion's pixels, per slice.
        near = {
            s: (ndimage.distance_transform_edt(o == 0, sampling=sampling) <= margin_mm) if o.any()
            else np.zeros(shape, dtype=bool)
            for s, o in owners.items()
        }
        distance, (iy, ix) = ndimage.distance_transform_edt(owners[z] == 0, sampling=sampling, return_indices=True)
        footprint = (owners[z][iy, ix] == lesion) & (distance <= margin_mm)
        to_lesion = ndimage.distance_transform_edt(owners[z] != lesion, sampling=sampling)
        ring = (to_lesion > margin_mm) & (to_lesion <= margin_mm + ring_mm)

        window = hu[first : last + 1, ys, xs]
        lab = labels[first : last + 1, ys, xs]
        bright = window >= threshold
        other_calcium = bright & ((lab < 1) | (lab > _MAX_VESSEL_LABEL))

        own_background = None
        total = 0.0
        for step in [0] + [d for k in range(1, adjacent + 1) for d in (-k, k)]:
            s = z + step
            if not first <= s <= last:
                continue
            i = s - first
            region = footprint & ~other_calcium[i]
            if step:
                region &= ~near[s]
                for k in range(1, abs(step)):  # lesions on slices nearer to s own its voxels
                    for t in (s - k, s + k):
                        if t in near:
                            region &= ~near[t]
                tie = s + step  # as far from s as this lesion; the lower slice wins
                if tie < z and tie in near:
                    region &= ~near[tie]
            if not region.any():
                continue
            ring_s = ring & ~bright[i]
            for t in range(s - adjacent, s + adjacent + 1):
                if t in near:
                    ring_s &= ~near[t]
            if ring_s.any():
                level = float(np.median(window[i][ring_s]))
            elif own_background is not None:
                level = own_background
            else:
                level = water_hu
            level = max(level, water_hu)
            if step == 0:
                own_background = level
            total += float(window[i][region].sum(dtype=np.float64)) - level * int(region.sum())
        excess[index] = total
        background[index] = own_background if own_background is not None else water_hu
    return excess, background


def score(
    volume: Volume,
    labels: np.ndarray,
    settings: ScoringSettings = ScoringSettings(),
    kvp: float | None = None,
) -> ScanScore:
    """Score a :class:`~cacflow.volume.Volume` with its label volume."""
    return score_volume(
        volume.hu,
        labels,
        volume.spacing_mm,
        settings,
        kvp=kvp,
        slice_thickness_mm=volume.slice_thickness_mm,
        z_positions_mm=volume.z_positions_mm,
    )
