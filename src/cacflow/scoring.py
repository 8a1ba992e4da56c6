"""Agatston, volume and mass scores per lesion, vessel and scan.

The one scoring implementation of cacflow: the workflow, the single-scan
``cacflow agatston`` command, the COCA reference builder and the phantom check
all call :func:`score_volume`. Every definition choice is written up in
``docs/scoring.md``; the comments here say why the code does what it does.

Arrays are canonical ``[z, y, x]`` (see :mod:`cacflow.volume`);
``spacing_mm = (slice increment, row spacing, column spacing)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    """Score calcium inside the vessel labels (1 LM, 2 LAD, 3 LCX, 4 RCA) of a CT volume."""
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
    voxel_count, peak, hu_sum, vessel_label, slice_index, first_voxel = _find_lesions(hu, labels, candidates)
    keep = voxel_count * pixel_area >= settings.min_area_mm2
    order = np.lexsort((first_voxel[keep], vessel_label[keep], slice_index[keep]))
    voxel_count, peak, hu_sum = voxel_count[keep][order], peak[keep][order], hu_sum[keep][order]
    vessel_label, slice_index = vessel_label[keep][order], slice_index[keep][order]

    area = voxel_count * pixel_area
    weight = _weights(peak.astype(np.float64), weight_one_from, cutoffs)
    agatston = area * weight * increment_scale
    volume = voxel_count * voxel_volume
    mean_hu = hu_sum / np.maximum(voxel_count, 1)
    mass = None if c is None else c * (mean_hu - settings.mass_calibration_water_hu) * volume
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
        slice_increment_mm=increment,
        slice_thickness_mm=None if slice_thickness_mm is None else float(slice_thickness_mm),
        increment_scale=float(increment_scale),
        lesions=lesion_list,
    )


def _find_lesions(hu: np.ndarray, labels: np.ndarray, candidates: np.ndarray):
    """Per-slice 8-connected components of the candidate voxels, one row per component.

    Returns (voxel_count, peak_hu, hu_sum, vessel_label, slice_index, first_voxel)
    arrays. ``vessel_label`` is the label holding most of the component's
    voxels, the lowest label value on a tie; ``first_voxel`` is the in-slice
    raster index (y * nx + x) of its first voxel.
    """
    if not candidates.any():
        none = np.zeros(0, dtype=np.int64)
        return none, none.astype(np.float64), none.astype(np.float64), none, none, none
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
    return voxel_count, peak, hu_sum, vessel_label, slice_index, first_voxel


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
