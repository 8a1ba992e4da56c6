"""Synthetic cardiac CT phantoms with exact coronary calcium ground truth.

A phantom is a patient (anatomy, coronary tree, calcified lesions, distractors),
all drawn from ``seed`` alone, imaged by an acquisition (matrix, pixel spacing,
slice thickness and increment, kVp, noise, gating, contrast) described by
``PhantomSettings``. The same seed with different acquisition settings therefore
images the same patient, which is how a cohort visit holds several consistent
series.

Coordinates: patient (DICOM LPS) millimetres, x towards patient left, y towards
posterior, z towards superior. Arrays use the canonical ``[z, y, x]`` order of
``cacflow.volume``: column index grows with x, row index with y, slice index with z.

Calcified objects (coronary lesions and calcified distractors) are rendered with
partial volume: sampled on a fine grid inside their bounding box and averaged over
each pixel and over the slice thickness. The reference score is computed from that
noise-free rendering, per lesion, without any scoring code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from cacflow import VESSEL_LABELS
from cacflow.volume import Volume

AGATSTON_THRESHOLD_HU = 130.0
AGATSTON_MIN_AREA_MM2 = 1.0
RISK_CATEGORIES = ("0", "1-10", "11-100", "101-400", ">400")
VESSEL_IDS = {name: label for label, name in VESSEL_LABELS.items()}

HU_MIN, HU_MAX = -1024.0, 3071.0  # what 12-bit storage with intercept -1024 holds

# Default risk mix of a drawn patient, and the score each category aims at
# (inside the category with a margin, so rendering differences keep the category).
_RISK_MIX = {"0": 0.30, "1-10": 0.12, "11-100": 0.25, "101-400": 0.18, ">400": 0.15}
_TARGET_RANGES = {"1-10": (3.5, 7.0), "11-100": (20.0, 70.0), "101-400": (150.0, 320.0), ">400": (550.0, 1400.0)}
_VESSEL_LESION_ODDS = {"lm": 0.12, "lad": 0.42, "lcx": 0.18, "rca": 0.28}

# Tissue HU (at 120 kVp).
_AIR, _LUNG, _FAT, _SKIN, _MUSCLE, _MYOCARDIUM, _BLOOD = -1000.0, -850.0, -95.0, 20.0, 50.0, 45.0, 40.0
_LIVER, _SPLEEN_STOMACH, _CSF, _DISC, _CARTILAGE = 58.0, 35.0, 12.0, 80.0, 110.0
_CORTICAL, _TRABECULAR = 900.0, 250.0


@dataclass(frozen=True)
class LesionSpec:
    """An explicitly placed coronary lesion (tests, hand-made cases)."""

    vessel: str  # 'lm', 'lad', 'lcx', 'rca'
    position: float  # fraction of the vessel length from its ostium, 0..1
    semi_axes_mm: tuple[float, float, float]  # along the vessel, then two across it
    peak_hu: float  # material density at the lesion core, at 120 kVp
    offset_mm: float = 0.0  # from the centreline towards the vessel wall


@dataclass
class PhantomSettings:
    """Everything that varies, so training can randomise and evaluation hold out.

    Acquisition fields change how the patient is imaged; patient fields (lesions,
    distractors) change who is imaged. The patient depends on the seed and the
    patient fields only.
    """

    # acquisition
    rows: int = 512
    cols: int = 512
    pixel_spacing_mm: float = 0.39  # zoomed cardiac FOV ~200 mm; full chest ~0.7-0.8 mm
    slice_thickness_mm: float = 3.0
    slice_increment_mm: float = 3.0
    n_slices: int | None = None  # None: cover the heart with a margin at the increment
    kvp: int = 120
    noise_hu: float = 20.0  # std of the correlated noise
    noise_grain_mm: float = 0.7  # noise correlation length: soft kernel ~0.8, sharp ~0.3
    white_noise_fraction: float = 0.15  # share of unfiltered (fine-grain) noise
    gated: bool = True  # False: coronary lesions are motion-blurred
    motion_blur_mm: float | None = None  # non-gated blur length; None draws 1.5-5 mm
    fov_centre: str = "heart"  # 'heart' (cardiac recon) or 'body' (chest recon)
    contrast: bool = False  # iodine in the blood pool (CTA), ~350 HU
    acquisition_seed: int = 0  # another value: a repeat acquisition (new noise, FOV offset)
    # patient
    n_coronary_lesions: int | None = None  # None: drawn from the risk mix; 0 allowed
    target_agatston: float | None = None  # aim the lesion plan at this score
    lesions: tuple[LesionSpec, ...] | None = None  # explicit lesions instead of drawn ones
    lesion_seed: int = 0  # another value: same anatomy, another lesion plan
    include_distractors: bool = True  # aortic/valve/mitral calcium, noise spikes, devices
    device_probability: float = 0.15  # chance of each device: stent, sternal wires, pacemaker lead
    # Calcium kinds training never shows (UNFAMILIAR_CALCIUM_KINDS), for checks of how
    # the model meets calcium it has not learnt; drawn from a stream of their own after
    # the lesions, so the rest of the patient and the image stay as without them.
    # Independent of include_distractors.
    unfamiliar_calcium: bool = False
    # Calcified blobs of any size and density scattered through the chest away from the
    # coronary arteries (kind "scattered"): negatives that tie "coronary" to the
    # arteries' course rather than to how a blob looks, for training. Their own stream too.
    scattered_calcium: bool = False
    # Calcified blobs, alone or in clusters and chains, in the fat just outside the
    # ascending and descending aorta, the pulmonary trunk and the superior vena cava
    # (kind "perivascular"): negatives where calcium outside the heart looks most like
    # the left main and proximal arteries, for training. No group starts beside the
    # right pulmonary artery, so the check's hilar nodes lie where training seldom
    # puts calcium (a chain can still reach it: docs/synth.md).
    perivascular_calcium: bool = False
    # 1 to 3 extra faint, tiny coronary plaques ("specks", SPECK_SEMI_AXIS_MM and
    # SPECK_PEAK_HU), on top of the lesion plan and from a stream of their own: positives
    # at the edge of what a scan shows, which the risk mix holds only in a few 1-10
    # scans, for training. They are coronary lesions in the ground truth like any other.
    speck_lesions: bool = False

    def __post_init__(self) -> None:
        chosen = [self.n_coronary_lesions is not None, self.target_agatston is not None, self.lesions is not None]
        if sum(chosen) > 1:
            raise ValueError("set at most one of n_coronary_lesions, target_agatston, lesions")
        if self.fov_centre not in ("heart", "body"):
            raise ValueError(f"fov_centre must be 'heart' or 'body', got {self.fov_centre!r}")
        if self.slice_increment_mm <= 0 or self.slice_thickness_mm <= 0:
            raise ValueError("slice thickness and increment must be positive")


@dataclass
class Phantom:
    hu: np.ndarray  # float32 [z, y, x], HU, with noise
    spacing_mm: tuple[float, float, float]  # (increment, row, col)
    slice_thickness_mm: float
    z_positions_mm: np.ndarray  # slice centres along z (patient superior), ascending
    origin_xy_mm: tuple[float, float]  # patient (x, y) of the centre of pixel [row 0, col 0]
    coronary_labels: np.ndarray  # uint8 [z, y, x]: vessel label on coronary lesion voxels
    vessel_labels: np.ndarray  # uint8 [z, y, x]: vessel label on the coronary tubes
    lesions: list[dict]  # ground truth per coronary lesion
    distractors: list[dict]  # calcified non-coronary objects, devices, noise spikes
    reference: dict  # reference scores from the lesion renderings
    metadata: dict  # settings used and patient facts, JSON-ready

    def volume(self) -> Volume:
        return Volume(self.hu, self.spacing_mm, self.slice_thickness_mm, self.z_positions_mm)


# --------------------------------------------------------------------------- geometry


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of v about the unit vector axis."""
    return v * math.cos(angle) + np.cross(axis, v) * math.sin(angle) + axis * (axis @ v) * (1 - math.cos(angle))


def _frame_along(direction) -> np.ndarray:
    """Rows: direction and two unit vectors perpendicular to it."""
    d = _unit(direction)
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    p = _unit(np.cross(d, helper))
    return np.stack([d, p, np.cross(d, p)])


def _resample(points: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced points along a polyline, with their arc length."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0.0, arc[-1], max(2, int(math.ceil(arc[-1] / step)) + 1))
    return np.stack([np.interp(s, arc, points[:, k]) for k in range(3)], axis=1), s


@dataclass
class _Grid:
    """Voxel centre coordinates of an acquisition, patient mm."""

    x: np.ndarray  # column centres
    y: np.ndarray  # row centres
    z: np.ndarray  # slice centres, ascending
    thickness: float

    @property
    def pixel(self) -> float:
        return float(self.x[1] - self.x[0])

    @property
    def increment(self) -> float:
        return float(self.z[1] - self.z[0]) if len(self.z) > 1 else self.thickness

    def box(self, centre, half) -> tuple[slice, slice, slice] | None:
        """Index ranges of voxels within centre +- half (x, y, z), or None if empty."""
        ranges = []
        for coords, c, h in ((self.z, centre[2], half[2]), (self.y, centre[1], half[1]), (self.x, centre[0], half[0])):
            lo, hi = np.searchsorted(coords, (c - h, c + h), side="left")
            if hi <= lo:
                return None
            ranges.append(slice(int(lo), int(hi)))
        return tuple(ranges)


def _quadratic_form(axes: np.ndarray, semi) -> np.ndarray:
    """M with d.M.d <= 1 inside the ellipsoid whose unit axes are the rows of axes."""
    return sum(np.outer(a, a) / (s * s) for a, s in zip(axes, semi))


def _half_extent(axes: np.ndarray, semi) -> np.ndarray:
    return np.sqrt(((axes * np.asarray(semi)[:, None]) ** 2).sum(axis=0))


def _q(m: np.ndarray, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """d.M.d on the [z, y, x] grid of offsets, summing small broadcast terms (fast)."""
    zy = (m[2, 2] * dz * dz)[:, None] + 2 * m[2, 1] * dz[:, None] * dy[None, :]
    zx = 2 * m[2, 0] * dz[:, None] * dx[None, :]
    yx = m[1, 1] * (dy * dy)[:, None] + m[0, 0] * (dx * dx)[None, :] + 2 * m[1, 0] * dy[:, None] * dx[None, :]
    return zy[:, :, None] + zx[:, None, :] + yx[None, :, :]


def _paint_ellipsoid(vol, grid: _Grid, centre, axes, semi, value, only_below: float | None = None) -> None:
    """Fill an ellipsoid (sampled at voxel centres); only_below keeps brighter tissue."""
    box = grid.box(centre, _half_extent(axes, semi))
    if box is None:
        return
    zs, ys, xs = box
    inside = _q(_quadratic_form(axes, semi), grid.x[xs] - centre[0], grid.y[ys] - centre[1], grid.z[zs] - centre[2]) <= 1
    sub = vol[zs, ys, xs]
    if only_below is not None:
        inside &= sub < only_below
    np.copyto(sub, np.float32(value), where=inside)


def _paint_tube(vol, grid: _Grid, points, radii, value, labels=None, label=0, z_pad=0.0) -> None:
    """Fill the union of balls along a densely sampled centreline.

    z_pad widens the tube along z by that much: thin metal shows in every slice it
    crosses because of partial volume, even away from the slice centre.
    """
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
    for p, r in zip(points, radii):
        box = grid.box(p, (r, r, r + z_pad))
        if box is None:
            continue
        zs, ys, xs = box
        dz = np.maximum(np.abs(grid.z[zs] - p[2]) - z_pad, 0.0)
        d2 = (dz * dz)[:, None, None] + ((grid.y[ys] - p[1]) ** 2)[None, :, None] + ((grid.x[xs] - p[0]) ** 2)[None, None, :]
        inside = d2 <= r * r
        np.copyto(vol[zs, ys, xs], np.float32(value), where=inside)
        if labels is not None:
            np.copyto(labels[zs, ys, xs], np.uint8(label), where=inside)


# --------------------------------------------------------------------------- calcium


@dataclass
class _Calcium:
    """A calcified ellipsoid: coronary lesion or calcified distractor."""

    centre: np.ndarray  # x, y, z mm
    axes: np.ndarray  # rows: unit axes
    semi: tuple[float, float, float]
    peak_hu: float  # material density at the core (120 kVp)
    kind: str  # 'coronary' or a distractor kind
    vessel: str = ""
    arc_mm: float = 0.0  # distance from the ostium along the vessel

    @property
    def radius(self) -> float:
        return max(self.semi)


def _render_calcium(vol, grid: _Grid, obj: _Calcium, peak_hu: float, motion=(0.0, 0.0)):
    """Add a calcified object with partial volume; return (box, fraction inside).

    The object replaces what it covers: voxel = background + mean over the voxel's
    fine samples of (density - background) where inside. Fine samples: ~0.13 mm
    in-plane, ~0.15 mm along z across the slice thickness, and along the motion path.
    """
    motion = np.asarray(motion, dtype=np.float64)
    reach = obj.radius + np.abs(motion) / 2 + grid.pixel
    half = np.array([reach[0], reach[1], obj.radius + grid.thickness / 2])
    box = grid.box(obj.centre, half)
    if box is None:
        return None, None
    zs, ys, xs = box
    px, t = grid.pixel, grid.thickness
    sub_xy = max(2, math.ceil(px / 0.13))
    sub_z = max(2, math.ceil(t / 0.15))
    off_xy = ((np.arange(sub_xy) + 0.5) / sub_xy - 0.5) * px
    off_z = ((np.arange(sub_z) + 0.5) / sub_z - 0.5) * t
    n_motion = 1 if not motion.any() else max(3, math.ceil(np.hypot(*motion) / 0.3))
    m = _quadratic_form(obj.axes, obj.semi)
    shape = (zs.stop - zs.start, sub_z, ys.stop - ys.start, sub_xy, xs.stop - xs.start, sub_xy)
    density_sum = np.zeros((shape[0], shape[2], shape[4]))
    inside_sum = np.zeros_like(density_sum)
    for k in range(n_motion):
        shift = motion * ((k + 0.5) / n_motion - 0.5) if n_motion > 1 else np.zeros(2)
        dz = (grid.z[zs, None] + off_z[None, :] - obj.centre[2]).ravel()
        dy = (grid.y[ys, None] + off_xy[None, :] - obj.centre[1] - shift[1]).ravel()
        dx = (grid.x[xs, None] + off_xy[None, :] - obj.centre[0] - shift[0]).ravel()
        q = _q(m, dx, dy, dz).reshape(shape)
        inside = q <= 1
        # dense core, softer rim: real plaques are not uniform
        density_sum += np.where(inside, peak_hu * (1 - 0.4 * q), 0.0).mean(axis=(1, 3, 5))
        inside_sum += inside.mean(axis=(1, 3, 5))
    density, fraction = density_sum / n_motion, inside_sum / n_motion
    sub = vol[zs, ys, xs]
    sub += (density - fraction * sub).astype(np.float32)
    return box, fraction


def _weight(peak_hu: float) -> int:
    return 1 if peak_hu < 200 else 2 if peak_hu < 300 else 3 if peak_hu < 400 else 4


def _score_rendering(clean: np.ndarray, fraction: np.ndarray, z_mm: np.ndarray, first_slice: int, pixel_area: float):
    """Agatston pieces of one rendered object, slice by slice, from its own voxels.

    Object voxels: covered by the object and >= 130 HU noise-free. Per slice, each
    8-connected group of them of at least 1 mm^2 scores area x weight(peak HU).
    Returns (object voxel mask, counted voxel mask, per-slice records).
    """
    voxels = (fraction > 0) & (clean >= AGATSTON_THRESHOLD_HU)
    counted = np.zeros_like(voxels)
    records = []
    for s in range(voxels.shape[0]):
        groups, n = ndimage.label(voxels[s], structure=np.ones((3, 3)))
        area = peak = score = 0.0
        for g in range(1, n + 1):
            member = groups == g
            g_area = member.sum() * pixel_area
            if g_area < AGATSTON_MIN_AREA_MM2:
                continue
            g_peak = float(clean[s][member].max())
            counted[s] |= member
            area += g_area
            peak = max(peak, g_peak)
            score += g_area * _weight(g_peak)
        if voxels[s].any():
            records.append(
                {
                    "slice_index": first_slice + s,
                    "z_mm": round(float(z_mm[s]), 3),
                    "area_mm2": round(float(area), 4),
                    "peak_hu": round(peak if area else float(clean[s][voxels[s]].max()), 2),
                    "agatston": round(float(score), 4),
                }
            )
    return voxels, counted, records


def risk_category(agatston: float) -> str:
    if agatston <= 0:
        return "0"
    return "1-10" if agatston <= 10 else "11-100" if agatston <= 100 else "101-400" if agatston <= 400 else ">400"


def cac_drs(agatston: float, n_vessels: int) -> str:
    """SCCT 2018 CAC-DRS: A0 = 0, A1 = 1-99, A2 = 100-299, A3 >= 300, with /N vessels."""
    if agatston <= 0:
        return "A0"
    grade = 1 if agatston < 100 else 2 if agatston < 300 else 3
    return f"A{grade}/N{n_vessels}"


def _kvp_factor(kvp: float, material: str) -> float:
    """HU of calcium/bone and of iodine rise at lower tube voltage."""
    exponent = {"calcium": 0.75, "iodine": 1.3}[material]
    return (120.0 / kvp) ** exponent


# --------------------------------------------------------------------------- patient


@dataclass
class _Patient:
    body: dict
    heart: dict
    vessels: dict  # name -> dict(points, radii, arc)
    great_vessels: list  # dicts(points, radius, kind)
    lung_vessels: list  # (centre, axes, semi)
    calcium: list[_Calcium]  # coronary lesions then calcified distractors
    devices: list[dict]
    z_range: tuple[float, float]  # heart bottom, heart top


def _draw_body(rng) -> dict:
    wx, wy = rng.uniform(140, 180), rng.uniform(108, 130)
    fat, muscle = rng.uniform(5, 25), rng.uniform(6, 10)
    inner = fat + muscle
    cav_x, cav_y = wx - inner - 8, wy - inner - 8
    vb_semi = (rng.uniform(17, 22), rng.uniform(14, 17))
    vb_y = cav_y - 0.6 * vb_semi[1]  # vertebral body bulges into the posterior cavity
    aorta_r = rng.uniform(11, 14)
    return {
        "wx": wx, "wy": wy, "fat": fat, "muscle": muscle, "cav_x": cav_x, "cav_y": cav_y,
        "vb_y": vb_y, "vb_semi": vb_semi,
        "vertebra_period": rng.uniform(24, 28), "vertebra_phase": rng.uniform(0, 28),
        "rib_period": rng.uniform(22, 28), "rib_phase": rng.uniform(0, 28),
        "rib_drop": rng.uniform(110, 140), "rib_height": rng.uniform(9, 12),
        "mediastinum_half_width": rng.uniform(28, 40),
        "sternum_half_width": rng.uniform(13, 18), "sternum_half_depth": rng.uniform(5, 7),
        # descending aorta: left anterolateral of the vertebral body
        "aorta_xy": (vb_semi[0] + 0.6 * aorta_r, vb_y - 0.8 * vb_semi[1]), "aorta_r": aorta_r,
    }


def _draw_heart(rng, body: dict) -> dict:
    azimuth, elevation = math.radians(rng.uniform(35, 55)), math.radians(rng.uniform(15, 35))
    e_u = _unit([math.sin(azimuth) * math.cos(elevation), -math.cos(azimuth) * math.cos(elevation), -math.sin(elevation)])
    anterior = np.array([0.0, -1.0, 0.0])
    e_ant = _unit(anterior - (anterior @ e_u) * e_u)
    e_lat = _unit(np.cross(e_u, e_ant))
    if e_lat[0] < 0:  # the lateral axis points to the left ventricle, patient left
        e_lat = -e_lat
    roll = math.radians(rng.uniform(-15, 15))
    e_ant, e_lat = _rotate(e_ant, e_u, roll), _rotate(e_lat, e_u, roll)
    axes = np.stack([e_u, e_ant, e_lat])
    scale = rng.uniform(0.88, 1.12)
    semi = np.array([rng.uniform(56, 66), rng.uniform(42, 50), rng.uniform(45, 53)]) * scale
    half = _half_extent(axes, semi)
    # keep the heart and its fat between the sternum and the vertebral body
    front = -body["cav_y"] + 2 * body["sternum_half_depth"]
    back = body["vb_y"] - body["vb_semi"][1] - 3
    room = back - front
    if 2 * (half[1] + 6) > room:
        shrink = room / (2 * (half[1] + 6))
        semi, half = semi * shrink, half * shrink
    y = float(min(front + half[1] + 6 + rng.uniform(0, 10), back - half[1] - 6))
    centre = np.array([rng.uniform(15, 32), y, rng.uniform(-180, -60)])
    return {"centre": centre, "axes": axes, "semi": semi, "u_av": rng.uniform(-0.45, -0.32)}


def _surface(heart: dict, u_frac, phi, out_mm=0.0) -> np.ndarray:
    """Points on (or out_mm outside) the heart ellipsoid at long-axis fraction and angle."""
    u_frac, phi = np.broadcast_arrays(np.asarray(u_frac, float), np.asarray(phi, float))
    e_u, e_ant, e_lat = heart["axes"]
    a, b, c = heart["semi"]
    rad = np.sqrt(np.clip(1 - u_frac**2, 0, None))[..., None]
    return (
        heart["centre"]
        + (u_frac * a)[..., None] * e_u
        + rad * ((b + out_mm) * np.cos(phi)[..., None] * e_ant + (c + out_mm) * np.sin(phi)[..., None] * e_lat)
    )


def _wiggle(rng, t: np.ndarray, amplitude: float) -> np.ndarray:
    """Smooth random perturbation along a path parameter t in [0, 1]."""
    out = np.zeros_like(t)
    for k in (1, 2, 3):
        out += rng.normal(0, amplitude / k) * np.sin(k * math.pi * t + rng.uniform(0, 2 * math.pi))
    return out - out[0]  # starts where the path starts


def _draw_vessels(rng, heart: dict) -> tuple[dict, list]:
    """Coronary centrelines on the heart surface, plus aorta, pulmonary trunk, SVC."""
    a = heart["semi"][0]
    u_av = heart["u_av"]
    out = 2.5  # centreline this far outside the myocardium, in the epicardial fat
    root_r = rng.uniform(12, 15)
    root = _surface(heart, u_av - 0.25, math.radians(rng.uniform(-25, -5)), 0.0) - 0.45 * root_r * heart["axes"][1]
    root = root + np.array([0, 0, 0.15 * a])
    ascending_top = root + np.array([rng.uniform(-12, -4), rng.uniform(-8, 0), 140.0])
    great = [
        {"kind": "aorta", "points": np.stack([root - np.array([0, 0, 8.0]), root, ascending_top]), "radius": root_r},
    ]
    # pulmonary trunk: from the right ventricular outflow, left of the aorta, up and back;
    # the right pulmonary artery then crosses behind the ascending aorta
    pa_start = _surface(heart, u_av - 0.15, math.radians(rng.uniform(45, 65)), -8.0)
    pa_top = pa_start + np.array([rng.uniform(5, 15), rng.uniform(15, 25), rng.uniform(35, 50)])
    rpa_end = np.array([root[0] - 45, root[1] + 2 * root_r + 10, pa_top[2] + rng.uniform(-8, 0)])
    great.append({"kind": "pulmonary_trunk", "points": np.stack([pa_start, pa_top]), "radius": rng.uniform(12, 14)})
    great.append({"kind": "pulmonary_artery", "points": np.stack([pa_top, rpa_end]), "radius": rng.uniform(8, 10)})
    svc_bottom = _surface(heart, u_av - 0.35, -math.pi / 2, -10.0)
    svc_top = np.array([ascending_top[0] - root_r - 12, ascending_top[1] + 8, ascending_top[2]])
    great.append({"kind": "svc", "points": np.stack([svc_bottom, svc_top]), "radius": rng.uniform(8, 10)})

    t = np.linspace(0, 1, 120)
    phi_bif = math.radians(rng.uniform(25, 45))
    bif = _surface(heart, u_av, phi_bif, out)
    lm_dir = _unit((bif - root) * np.array([1, 1, 0.3]))
    lm_start = root + root_r * lm_dir
    lm = np.stack([lm_start, 0.5 * (lm_start + bif) + rng.normal(0, 1.0, 3), bif])
    lad_u = u_av + (rng.uniform(0.85, 0.95) - u_av) * t
    lad_phi = phi_bif + (math.radians(rng.uniform(15, 30)) - phi_bif) * t + _wiggle(rng, t, 0.08)
    lad = _surface(heart, lad_u, lad_phi, out)
    lcx_phi = phi_bif + (math.radians(rng.uniform(140, 185)) - phi_bif) * t
    lcx = _surface(heart, u_av + _wiggle(rng, t, 0.03), lcx_phi, out)
    phi_rca = math.radians(rng.uniform(-35, -15))
    rca_start = _surface(heart, u_av, phi_rca, out)
    rca_dir = _unit((rca_start - root) * np.array([1, 1, 0.3]))
    rca_ostium = root + root_r * rca_dir
    groove_phi = np.linspace(phi_rca, -math.pi, 100)
    rca_groove = _surface(heart, u_av + _wiggle(rng, np.linspace(0, 1, 100), 0.03), groove_phi, out)
    pda = _surface(heart, np.linspace(u_av, rng.uniform(0.2, 0.5), 40), -math.pi + _wiggle(rng, np.linspace(0, 1, 40), 0.05), out)
    rca = np.concatenate([rca_ostium[None], rca_groove, pda[1:]])
    vessels = {}
    for name, pts, r0, r1 in (
        ("lm", lm, rng.uniform(1.9, 2.3), None),
        ("lad", np.concatenate([bif[None], lad[1:]]), rng.uniform(1.6, 1.9), 0.8),
        ("lcx", np.concatenate([bif[None], lcx[1:]]), rng.uniform(1.4, 1.7), 0.8),
        ("rca", rca, rng.uniform(1.7, 2.0), 0.9),
    ):
        points, arc = _resample(pts, 0.4)
        taper = np.ones_like(arc) if r1 is None else 1 - (1 - r1) * arc / arc[-1]
        vessels[name] = {"points": points, "radii": r0 * taper, "arc": arc}
    return vessels, great


def _draw_lung_vessels(rng, body: dict, z_lo: float, z_hi: float) -> list:
    out = []
    for _ in range(int((z_hi - z_lo) * 0.8)):
        side = rng.choice((-1.0, 1.0))
        centre = np.array(
            [side * body["cav_x"] * rng.uniform(0.15, 0.9), body["cav_y"] * rng.uniform(-0.8, 0.85), rng.uniform(z_lo, z_hi)]
        )
        r = rng.uniform(0.8, 3.5)
        out.append((centre, _frame_along(rng.normal(size=3)), (r * rng.uniform(2, 6), r, r)))
    return out


def _place_lesion(vessels: dict, spec: LesionSpec, spin: float = 0.0) -> _Calcium:
    """Lesion centred on the vessel, offset towards the wall on the side given by spin."""
    v = vessels[spec.vessel]
    i = int(round(spec.position * (len(v["arc"]) - 1)))
    tangent = v["points"][min(i + 1, len(v["arc"]) - 1)] - v["points"][max(i - 1, 0)]
    d, p, q = _frame_along(tangent)
    axes = np.stack([d, _rotate(p, d, spin), _rotate(q, d, spin)])
    centre = v["points"][i] + spec.offset_mm * axes[1]
    return _Calcium(centre, axes, tuple(spec.semi_axes_mm), spec.peak_hu, "coronary", spec.vessel, float(v["arc"][i]))


def _draw_lesion(rng, vessels: dict, length_mm: tuple[float, float], peak_hu: tuple[float, float]) -> _Calcium:
    """A random plaque on the wall of a random vessel; length_mm is its semi-axis range along it."""
    name = str(rng.choice(list(_VESSEL_LESION_ODDS), p=list(_VESSEL_LESION_ODDS.values())))
    # proximal segments calcify more often
    position = float(rng.beta(1.3, 2.8)) if name != "lm" else float(rng.uniform(0, 1))
    length = rng.uniform(*length_mm)
    width = min(2.5, length * rng.uniform(0.45, 0.9))  # plaques grow along the vessel
    radius = vessels[name]["radii"][int(round(position * (len(vessels[name]["arc"]) - 1)))]
    spec = LesionSpec(name, position, (length, width, width * rng.uniform(0.7, 1.0)), rng.uniform(*peak_hu), radius * rng.uniform(0.3, 1.0))
    return _place_lesion(vessels, spec, rng.uniform(0, 2 * math.pi))


def _separated(obj: _Calcium, others: list, blur_mm: float = 5.0) -> bool:
    """True if obj cannot share a 2-D connected group with any other object.

    blur_mm covers what spreads objects: motion blur in-plane, slices up to 5 mm
    thick along z (the reference scores each object on its own).
    """
    for other in others:
        gap = obj.radius + other.radius + 1.5
        d = obj.centre - other.centre
        if np.hypot(d[0], d[1]) < gap + blur_mm and abs(d[2]) < gap + blur_mm:
            return False
    return True


def _standard_score(obj: _Calcium, vessel: dict) -> tuple[float, float]:
    """Agatston of obj alone in a standard gated acquisition (3 mm, 0.39 mm, 120 kVp).

    Used to aim lesion plans at a target independently of the acquisition actually
    requested: the lesion sits on its vessel (blood in a wall, in fat) as in the
    full rendering, at three slice phases. Returns the mean score and the smallest,
    over the phases, of the lesion's largest scored area in one slice.
    """
    scores, largest_areas = [], []
    for phase in (0.0, 1.0, 2.0):
        half = obj.radius + 1.0
        xy = np.arange(-half, half + 0.39, 0.39)
        z = np.arange(-half - 3.0, half + 3.0 + 1e-6, 3.0) + phase
        grid = _Grid(obj.centre[0] + xy, obj.centre[1] + xy, obj.centre[2] + z, 3.0)
        vol = np.full((len(z), len(xy), len(xy)), _FAT, dtype=np.float32)
        near = np.linalg.norm(vessel["points"] - obj.centre, axis=1) < half + 3.0
        _paint_tube(vol, grid, vessel["points"][near], vessel["radii"][near] + 0.5, _MYOCARDIUM)
        _paint_tube(vol, grid, vessel["points"][near], vessel["radii"][near], _BLOOD)
        box, fraction = _render_calcium(vol, grid, obj, obj.peak_hu)
        _, _, records = _score_rendering(vol[box], fraction, grid.z[box[0]], box[0].start, 0.39 * 0.39)
        scores.append(sum(r["agatston"] for r in records))
        largest_areas.append(max((r["area_mm2"] for r in records), default=0.0))
    return float(np.mean(scores)), min(largest_areas)


def _plan_lesions(rng, vessels: dict, settings: PhantomSettings, taken: list) -> list[_Calcium]:
    """Coronary lesions: explicit, a fixed count, or aimed at a target score."""
    if settings.lesions is not None:
        return [_place_lesion(vessels, spec) for spec in settings.lesions]
    if settings.n_coronary_lesions is not None:
        lesions: list[_Calcium] = []
        for _ in range(200 * max(1, settings.n_coronary_lesions)):
            if len(lesions) == settings.n_coronary_lesions:
                break
            lesion = _draw_lesion(rng, vessels, (0.5, 3.0), (150.0, 1000.0))
            if _separated(lesion, lesions + taken):
                lesions.append(lesion)
        return lesions
    target = settings.target_agatston
    if target is None:
        category = str(rng.choice(list(_RISK_MIX), p=list(_RISK_MIX.values())))
        target = 0.0 if category == "0" else math.exp(rng.uniform(*np.log(_TARGET_RANGES[category])))
    if target <= 0:
        return []
    category = risk_category(target)
    bounds = {"1-10": (1.0, 10.0), "11-100": (10.0, 100.0), "101-400": (100.0, 400.0), ">400": (400.0, math.inf)}[category]
    lo, hi = max(bounds[0] * 1.15, target * 0.8), min(bounds[1] * 0.85, target * 1.2)
    lesions, total = [], 0.0
    for _ in range(2000):
        if total >= lo:
            break
        remaining = hi - total
        # small budgets need small, faint plaques; big ones allow long dense ones
        if remaining < 15:
            lesion = _draw_lesion(rng, vessels, (1.2, 2.2), (250.0, 450.0))
        else:
            size = float(np.clip(1.6 + 0.35 * remaining ** (1 / 3), 2.2, 5.0))
            lesion = _draw_lesion(rng, vessels, (0.5 * size, size), (200.0, float(np.clip(500 + 5 * remaining, 600, 1100))))
        if not _separated(lesion, lesions + taken):
            continue
        score, area = _standard_score(lesion, vessels[lesion.vessel])
        # well above the 1 mm^2 minimum, so it scores wherever the slices and pixels fall
        if area < 2.0 or total + score > hi:
            continue
        lesions.append(lesion)
        total += score
    return lesions


def _draw_distractors(rng, body: dict, heart: dict, vessels: dict, great: list, settings: PhantomSettings):
    """Calcified non-coronary objects and devices: the hard negatives."""
    calcium: list[_Calcium] = []
    devices: list[dict] = []
    if not settings.include_distractors:
        return calcium, devices
    root, root_r = great[0]["points"][1], great[0]["radius"]

    def blob(centre, along, semi, peak, kind):
        axes = _frame_along(along)
        axes = np.stack([axes[0], *(_rotate(a, axes[0], rng.uniform(0, math.pi)) for a in axes[1:])])
        obj = _Calcium(np.asarray(centre, float), axes, semi, peak, kind)
        if _separated(obj, calcium, 0.0):
            calcium.append(obj)

    if rng.random() < 0.5:  # aortic valve cusps, right next to the coronary ostia
        for _ in range(rng.integers(1, 4)):
            angle = rng.uniform(0, 2 * math.pi)
            p = root - np.array([0, 0, rng.uniform(2, 7)]) + 0.7 * root_r * np.array([math.cos(angle), math.sin(angle), 0])
            blob(p, rng.normal(size=3), (rng.uniform(1.0, 3.5), rng.uniform(0.8, 2.0), rng.uniform(0.8, 2.0)), rng.uniform(200, 900), "aortic_valve")
    if rng.random() < 0.35:  # mitral annulus: under the circumflex in the left AV groove
        for _ in range(rng.integers(1, 4)):
            phi = math.radians(rng.uniform(70, 190))
            p = _surface(heart, heart["u_av"] - 0.05, phi, -rng.uniform(6, 10))
            tangent = _surface(heart, heart["u_av"] - 0.05, phi + 0.05, -8) - p
            blob(p, tangent, (rng.uniform(2.0, 5.0), rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0)), rng.uniform(250, 900), "mitral_annulus")
    if rng.random() < 0.6:  # aortic wall plaques: ascending and descending
        ax, ay = body["aorta_xy"]
        for _ in range(rng.integers(1, 7)):
            angle = rng.uniform(0, 2 * math.pi)
            if rng.random() < 0.6:
                centre = np.array([ax, ay, heart["centre"][2] + rng.uniform(-70, 70)])
                radius = body["aorta_r"]
            else:
                centre, radius = root + np.array([0, 0, rng.uniform(10, 50)]), root_r
            p = centre + radius * np.array([math.cos(angle), math.sin(angle), 0])
            blob(p, [0, 0, 1], (rng.uniform(1.5, 5.0), rng.uniform(0.8, 1.5), rng.uniform(1.0, 2.5)), rng.uniform(250, 1000), "aortic_wall")
    if rng.random() < settings.device_probability:
        name = str(rng.choice(["lad", "rca"]))
        v = vessels[name]
        start = int(rng.uniform(0.05, 0.3) * len(v["arc"]))
        stop = min(len(v["arc"]), start + int(rng.uniform(12, 25) / 0.4))
        devices.append({"kind": "stent", "vessel": name, "points": v["points"][start:stop], "radius": float(v["radii"][start])})
    if rng.random() < settings.device_probability:
        z0 = heart["centre"][2] + rng.uniform(-20, 40)
        levels = [z0 - k * rng.uniform(22, 30) for k in range(int(rng.integers(3, 6)))]
        devices.append({"kind": "sternal_wires", "z_mm": levels})
    if rng.random() < settings.device_probability:
        svc_top = great[3]["points"][1]
        ra = _surface(heart, heart["u_av"] - 0.3, -math.pi / 2, -15)
        rv_apex = _surface(heart, 0.75, math.radians(-10), -10)
        path, _ = _resample(np.stack([svc_top, great[3]["points"][0], ra, rv_apex]), 0.4)
        devices.append({"kind": "pacemaker_lead", "points": path})
    return calcium, devices


# Common outside the heart in real chest CT, and never in the training phantoms: calcified
# lung granulomas, calcified hilar lymph nodes, costal cartilage calcification and
# breast arterial calcification (the last two only in a chest field of view).
UNFAMILIAR_CALCIUM_KINDS = ("lung_granuloma", "lymph_node", "costal_cartilage", "breast_arterial")


def _segment_distance(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    t = np.clip((point - a) @ (b - a) / max((b - a) @ (b - a), 1e-9), 0.0, 1.0)
    return float(np.linalg.norm(point - (a + t * (b - a))))


def _lung_ellipse(body: dict, side: float) -> tuple[float, float, float, float]:
    """(centre x, centre y, semi x, semi y) of the lung on ``side`` (-1 right, +1 left)
    within the thoracic cavity, as ``_paint_body`` paints it."""
    cav_x, cav_y = body["cav_x"], body["cav_y"]
    return side * cav_x * 0.5, cav_y * 0.03, cav_x * 0.52, cav_y * 0.95


def _diaphragm_top(body: dict, x, y):
    """z (mm) of the diaphragm dome above (x, y): the right dome over the liver, the
    left over spleen and stomach, falling away from each dome's top."""
    dome_r, dome_l = body["dome_z"]
    return np.where(x < 0, dome_r, dome_l) - 60 * ((np.abs(x) - 60) ** 2 / 110**2 + (y / 100) ** 2)


def _rib_z_offset(body: dict, th):
    """Along-z offset of the rib band at polar angle ``th`` * pi (0 at the spine, 1 at
    the sternum): each rib descends from the spine towards the front."""
    return body["rib_drop"] * th**1.2 + body["rib_phase"]


def _in_lung(body: dict, point: np.ndarray, margin: float) -> bool:
    """Whether ``point`` (x, y, z mm) lies ``margin`` deep in a lung as ``_paint_body``
    paints it: in a lung's ellipse, lateral to the mediastinum, above the diaphragm."""
    x, y, z = point
    centre_x, centre_y, semi_x, semi_y = _lung_ellipse(body, 1.0 if x > 0 else -1.0)
    in_cavity = (x / (body["cav_x"] - margin)) ** 2 + (y / (body["cav_y"] - margin)) ** 2 <= 1
    in_ellipse = ((x - centre_x) / (semi_x - margin)) ** 2 + ((y - centre_y) / (semi_y - margin)) ** 2 <= 1
    lateral = abs(x - 5) > body["mediastinum_half_width"] + margin
    return bool(in_cavity and in_ellipse and lateral and z - margin > _diaphragm_top(body, x, y))


def _draw_unfamiliar_calcium(rng, body: dict, heart: dict, great: list, taken: list, z_range) -> list[_Calcium]:
    """Up to three objects of each kind in ``UNFAMILIAR_CALCIUM_KINDS`` (fewer where a
    draw lands too close to something; breast arteries only with enough subcutaneous
    fat), clear of the heart, of ``taken`` and, for lymph nodes, of the great vessels."""
    placed: list[_Calcium] = []
    heart_form = _quadratic_form(heart["axes"], heart["semi"] + 10.0)  # 10 mm clear of the heart

    def add(centre, along, semi, peak, kind) -> None:
        centre = np.asarray(centre, float)
        d = centre - heart["centre"]
        obj = _Calcium(centre, _frame_along(along), tuple(semi), peak, kind)
        # The beads of one breast artery may touch: together they are one calcification.
        others = taken + [p for p in placed if not (kind == p.kind == "breast_arterial")]
        if d @ heart_form @ d > 1 and _separated(obj, others, 0.0):
            placed.append(obj)

    z_lo, z_hi = z_range[0] - 5, z_range[1] + 30
    cav_x, cav_y = body["cav_x"], body["cav_y"]
    for _ in range(rng.integers(1, 4)):  # dense nodules in the lung parenchyma
        r = rng.uniform(1.5, 4.0)
        for _attempt in range(20):
            side = rng.choice((-1.0, 1.0))
            centre = np.array([side * cav_x * rng.uniform(0.2, 0.95), cav_y * rng.uniform(-0.9, 0.9),
                               rng.uniform(z_lo, z_hi)])
            if _in_lung(body, centre, r + 2.0):
                add(centre, rng.normal(size=3), (r, r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.0)),
                    rng.uniform(500, 1200), "lung_granuloma")
                break
    pa_top, rpa_end = great[2]["points"]
    pa_r = great[2]["radius"]
    tubes = [(a, b, g["radius"]) for g in great for a, b in zip(g["points"][:-1], g["points"][1:])]
    ax, ay = body["aorta_xy"]
    tubes.append((np.array([ax, ay, z_lo - 100]), np.array([ax, ay, z_hi + 100]), body["aorta_r"]))
    for _ in range(rng.integers(1, 4)):  # beside the right pulmonary artery, in the hilum
        on_artery = pa_top + rng.uniform(0.3, 0.9) * (rpa_end - pa_top)
        out = _unit(np.cross(rpa_end - pa_top, rng.normal(size=3)))
        semi = (rng.uniform(2, 5), rng.uniform(2, 4), rng.uniform(2, 4))
        centre = on_artery + out * (pa_r + rng.uniform(3, 8))
        # outside every great vessel's wall, where it would pass for aortic calcium
        if all(_segment_distance(centre, a, b) >= radius + max(semi) + 1.0 for a, b, radius in tubes):
            add(centre, rng.normal(size=3), semi, rng.uniform(300, 900), "lymph_node")
    # Costal cartilage as _paint_body paints it: the anterior part of the rib band
    # (polar angle over 0.75 pi), inside a rib's height along z.
    t_out = body["wx"] - body["fat"] - body["muscle"] - 4  # middle of the 8 mm rib band
    t_in = body["wy"] - body["fat"] - body["muscle"] - 4
    for _ in range(rng.integers(1, 4)):
        polar, side = rng.uniform(0.77, 0.86) * math.pi, rng.choice((-1.0, 1.0))
        r = 1.0 / math.hypot(math.sin(polar) / t_out, math.cos(polar) / t_in)
        z = rng.uniform(z_lo, z_hi)
        z += -np.mod(z + _rib_z_offset(body, polar / math.pi), body["rib_period"]) + rng.uniform(1.5, body["rib_height"] - 1.5)
        add((side * r * math.sin(polar), r * math.cos(polar), z), (side * math.cos(polar), -math.sin(polar), 0.0),
            (rng.uniform(2, 5), rng.uniform(1, 2), rng.uniform(1, 2)), rng.uniform(250, 700), "costal_cartilage")
    if body["fat"] >= 10:  # a beaded artery in the subcutaneous fat of the anterior chest
        theta, side = rng.uniform(0.65, 0.85) * math.pi, rng.choice((-1.0, 1.0))
        depth = body["fat"] * rng.uniform(0.3, 0.7)
        start = np.array([side * (body["wx"] - depth) * math.sin(theta), (body["wy"] - depth) * math.cos(theta),
                          rng.uniform(z_lo, z_hi)])
        along = _unit([rng.uniform(-0.5, 0.5), 0.0, 1.0])
        for k in range(int(rng.integers(4, 9))):
            add(start + along * k * rng.uniform(2.5, 3.5), along,
                (rng.uniform(1.5, 2.5), rng.uniform(0.8, 1.3), rng.uniform(0.8, 1.3)), rng.uniform(400, 900),
                "breast_arterial")
    return placed


SCATTERED_CLEARANCE_MM = 6.0  # from every coronary centreline (the arteries are 1.4-2.3 mm in radius)


def _draw_scattered_calcium(rng, body: dict, vessels: dict, taken: list, z_range) -> list[_Calcium]:
    """4 to 12 calcified ellipsoids anywhere in the thoracic cavity or chest wall (lung,
    mediastinum, around the great vessels, in and on the heart) at least
    ``SCATTERED_CLEARANCE_MM`` from every coronary centreline and clear of ``taken``."""
    placed: list[_Calcium] = []
    centreline = np.concatenate([v["points"] for v in vessels.values()])
    for _ in range(int(rng.integers(4, 13))):
        semi = np.sort(rng.uniform(0.8, 5.0, 3))[::-1]
        angle, depth = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1))
        centre = np.array([(body["cav_x"] + 10) * depth * math.cos(angle), (body["cav_y"] + 10) * depth * math.sin(angle),
                           rng.uniform(z_range[0] - 10, z_range[1] + 40)])
        obj = _Calcium(centre, _frame_along(rng.normal(size=3)), tuple(semi), rng.uniform(180, 1200), "scattered")
        clear = np.min(np.linalg.norm(centreline - centre, axis=1)) - semi[0] >= SCATTERED_CLEARANCE_MM
        if clear and _separated(obj, taken + placed, 0.0):
            placed.append(obj)
    return placed


def _draw_perivascular_calcium(rng, body: dict, vessels: dict, great: list, taken: list, z_range) -> list[_Calcium]:
    """2 to 6 groups of 1 to 4 calcified ellipsoids (a group is a cluster, or a chain
    along one direction) 2-8 mm outside the wall of the ascending aorta above its root,
    the descending aorta, the pulmonary trunk above the outflow tract or the superior
    vena cava; none starts beside the right pulmonary artery. Each blob lies outside every great
    vessel's wall, ``SCATTERED_CLEARANCE_MM`` from every coronary centreline and clear
    of ``taken``; blobs of one group may touch (together they are one calcification)."""
    placed: list[_Calcium] = []
    centreline = np.concatenate([v["points"] for v in vessels.values()])
    by_kind = {g["kind"]: g for g in great}
    root, ascending_top = by_kind["aorta"]["points"][1:]
    ax, ay = body["aorta_xy"]
    descending = (np.array([ax, ay, z_range[0] - 10]), np.array([ax, ay, z_range[1] + 40]), body["aorta_r"])
    # (start, end, radius, first usable fraction of the segment, lies against the spine)
    anchors = [(root, ascending_top, by_kind["aorta"]["radius"], 0.15, False),
               (*by_kind["pulmonary_trunk"]["points"], by_kind["pulmonary_trunk"]["radius"], 0.35, False),
               (*by_kind["svc"]["points"], by_kind["svc"]["radius"], 0.2, False),
               (*descending, 0.0, True)]
    tubes = [(a, b, g["radius"]) for g in great for a, b in zip(g["points"][:-1], g["points"][1:])]
    tubes.append(descending)
    for _ in range(int(rng.integers(2, 7))):
        start, end, radius, first, by_spine = anchors[int(rng.integers(len(anchors)))]
        on_vessel = start + rng.uniform(first, 1.0) * (end - start)
        out = _unit(np.cross(end - start, rng.normal(size=3)))
        if by_spine and out[:2] @ (np.array([ax, ay]) - (0.0, body["vb_y"])) < 0:
            out = -out  # away from the vertebral body, into the posterior mediastinum
        centre = on_vessel + out * (radius + 1.5 + rng.uniform(2, 8))
        chain = _unit(rng.normal(size=3)) if rng.random() < 0.5 else None
        group: list[_Calcium] = []
        for _member in range(int(rng.integers(1, 5))):
            semi = np.sort(rng.uniform(1.2, 4.5, 3))[::-1]
            obj = _Calcium(centre, _frame_along(rng.normal(size=3)), tuple(semi), rng.uniform(250, 1000), "perivascular")
            outside_walls = all(_segment_distance(centre, a, b) >= r + 1.5 + semi[0] for a, b, r in tubes)
            clear = np.min(np.linalg.norm(centreline - centre, axis=1)) - semi[0] >= SCATTERED_CLEARANCE_MM
            if outside_walls and clear and _separated(obj, taken + placed, 0.0):
                group.append(obj)
            step = chain if chain is not None else _unit(rng.normal(size=3))
            centre = (group[-1].centre if group else centre) + step * rng.uniform(3, 7)
        placed += group
    return placed


SPECK_SEMI_AXIS_MM = (0.9, 1.8)  # along the vessel; planned lesions of small budgets: 1.2-2.2
SPECK_PEAK_HU = (200.0, 450.0)  # about 40 % then score 0, 45 % 0.5-5 Agatston (docs/synth.md)


def _draw_speck_lesions(rng, vessels: dict, taken: list) -> list[_Calcium]:
    """1 to 3 tiny, faint coronary plaques, each clear of ``taken`` and of each other
    (a speck that cannot be placed so after 50 draws is left out)."""
    placed: list[_Calcium] = []
    for _ in range(int(rng.integers(1, 4))):
        for _ in range(50):
            speck = _draw_lesion(rng, vessels, SPECK_SEMI_AXIS_MM, SPECK_PEAK_HU)
            if _separated(speck, taken + placed):
                placed.append(speck)
                break
    return placed


_PATIENT_FIELDS = ("n_coronary_lesions", "target_agatston", "lesions", "lesion_seed", "include_distractors",
                   "device_probability", "unfamiliar_calcium", "scattered_calcium", "perivascular_calcium",
                   "speck_lesions")


@functools.lru_cache(maxsize=8)
def _cached_patient(seed: int, patient_fields: tuple) -> _Patient:
    """Series of one visit image the same patient: draw (and aim) it once."""
    return _make_patient(seed, PhantomSettings(**dict(zip(_PATIENT_FIELDS, patient_fields))))


def _make_patient(seed: int, settings: PhantomSettings) -> _Patient:
    rng = np.random.default_rng([seed, 0])
    body = _draw_body(rng)
    heart = _draw_heart(rng, body)
    vessels, great = _draw_vessels(rng, heart)
    half_z = _half_extent(heart["axes"], heart["semi"])[2]
    z_range = (float(heart["centre"][2] - half_z), float(heart["centre"][2] + half_z))
    body["dome_z"] = (z_range[0] + rng.uniform(8, 22), z_range[0] + rng.uniform(-8, 5))  # right, left
    lung_vessels = _draw_lung_vessels(rng, body, z_range[0] - 40, z_range[1] + 70)
    distractors, devices = _draw_distractors(rng, body, heart, vessels, great, settings)
    keep_clear = distractors + [
        _Calcium(p, np.eye(3), (d["radius"] + 1,) * 3, 0, "stent") for d in devices if d["kind"] == "stent" for p in d["points"][::5]
    ]
    lesions = _plan_lesions(np.random.default_rng([seed, 2, settings.lesion_seed]), vessels, settings, keep_clear)
    # Only when asked for, each from a stream of its own, and placed after the lesions
    # and clear of them, so that the rest of the patient is what it is without them.
    extra: list[_Calcium] = []
    if settings.unfamiliar_calcium:
        extra += _draw_unfamiliar_calcium(np.random.default_rng([seed, 3]), body, heart, great,
                                          keep_clear + lesions, z_range)
    if settings.scattered_calcium:
        extra += _draw_scattered_calcium(np.random.default_rng([seed, 4]), body, vessels,
                                         keep_clear + lesions + extra, z_range)
    if settings.perivascular_calcium:
        extra += _draw_perivascular_calcium(np.random.default_rng([seed, 5]), body, vessels, great,
                                            keep_clear + lesions + extra, z_range)
    if settings.speck_lesions:
        extra += _draw_speck_lesions(np.random.default_rng([seed, 6]), vessels, keep_clear + lesions + extra)
    return _Patient(body, heart, vessels, great, lung_vessels, lesions + distractors + extra, devices, z_range)


# --------------------------------------------------------------------------- rendering


def _paint_body(vol, grid: _Grid, body: dict, blood: float, bone: float) -> None:
    """Torso cross-section (same on every slice), then z-dependent ribs, spine, diaphragm."""
    x, y = grid.x[None, :], grid.y[:, None]

    def inside(semi_x, semi_y, cx=0.0, cy=0.0):
        return ((x - cx) / semi_x) ** 2 + ((y - cy) / semi_y) ** 2 <= 1

    wx, wy, fat, muscle = body["wx"], body["wy"], body["fat"], body["muscle"]
    cav_x, cav_y = body["cav_x"], body["cav_y"]
    sl = np.full((len(grid.y), len(grid.x)), _AIR, dtype=np.float32)
    sl[inside(wx, wy)] = _SKIN
    sl[inside(wx - 1.5, wy - 1.5)] = _FAT
    sl[inside(wx - fat, wy - fat)] = _MUSCLE
    cavity = inside(cav_x, cav_y)
    sl[cavity] = _FAT  # mediastinal fat
    lung_hu = (_LUNG + 70 * (y + cav_y) / (2 * cav_y)).astype(np.float32)  # dependent lung is denser
    for side in (-1, 1):
        centre_x, centre_y, semi_x, semi_y = _lung_ellipse(body, side)
        lung = cavity & inside(semi_x, semi_y, centre_x, centre_y)
        sl[:] = np.where(lung, lung_hu, sl)
    sl[cavity & inside(body["mediastinum_half_width"], cav_y, 5, 0)] = _FAT  # mediastinum between the lungs
    vb_y = body["vb_y"]
    sl[inside(48, 38, 0, vb_y + 26)] = _MUSCLE  # paraspinal muscles
    # posterior elements: lamina ring and spinous process
    sl[inside(13, 12, 0, vb_y + 27) | inside(5, 14, 0, vb_y + 45)] = bone * _CORTICAL
    sl[inside(8, 7.5, 0, vb_y + 27)] = _CSF
    sw, sd = body["sternum_half_width"], body["sternum_half_depth"]
    st_y = -cav_y + sd - 4
    sl[inside(sw, sd, 0, st_y)] = bone * _CORTICAL
    sl[inside(sw - 1.5, sd - 1.5, 0, st_y)] = bone * _TRABECULAR
    vol[:] = sl

    vb_semi = body["vb_semi"]
    vb_outer, vb_inner = inside(*vb_semi, 0, vb_y), inside(vb_semi[0] - 1.5, vb_semi[1] - 1.5, 0, vb_y)
    # ribs: each rib descends from the spine towards the front, so an axial slice
    # cuts it obliquely; angle theta = 0 at the back, pi at the front
    t_out, t_in = wx - fat - muscle, wy - fat - muscle
    band = inside(t_out, t_in) & ~inside(t_out - 8, t_in - 8)
    theta = np.abs(np.arctan2(x, y))  # 0 at the posterior midline, pi anterior
    rows, cols = np.nonzero(band & (theta > 0.12 * math.pi) & (theta < 0.88 * math.pi))
    th = theta[rows, cols] / math.pi
    q_out = (grid.x[cols] / t_out) ** 2 + (grid.y[rows] / t_in) ** 2
    q_in = (grid.x[cols] / (t_out - 8)) ** 2 + (grid.y[rows] / (t_in - 8)) ** 2
    radial = (1 - np.sqrt(q_out)) / ((1 - np.sqrt(q_out)) + (np.sqrt(q_in) - 1) + 1e-9)
    rib_z = _rib_z_offset(body, th)
    cartilage = th > 0.75  # costal cartilage towards the sternum
    height, period = body["rib_height"], body["rib_period"]
    dome_r = body["dome_z"][0]
    below_candidates = cavity & (sl < -50)  # lung and fat give way to the abdomen
    dome_top = _diaphragm_top(body, x, y)
    abdomen = np.where(x < 0, _LIVER, _SPLEEN_STOMACH).astype(np.float32)
    for k, z in enumerate(grid.z):
        phase = np.mod(z + rib_z, period)
        in_rib = phase < height
        edge = (phase < 1.2) | (phase > height - 1.2) | (radial < 0.2) | (radial > 0.8)
        values = np.where(cartilage, _CARTILAGE, np.where(edge, bone * _CORTICAL, bone * _TRABECULAR))
        vol[k, rows[in_rib], cols[in_rib]] = values[in_rib]
        is_disc = np.mod(z - body["vertebra_phase"], body["vertebra_period"]) < 5
        vol[k][vb_outer] = _DISC if is_disc else bone * _CORTICAL
        if not is_disc:
            vol[k][vb_inner] = bone * _TRABECULAR
        if z < dome_r:  # below the diaphragm dome: liver (right), spleen/stomach (left)
            below = below_candidates & (z < dome_top)
            vol[k][below] = np.broadcast_to(abdomen, below.shape)[below]


def _paint_posterior_mediastinum(vol, grid: _Grid, body: dict, blood: float) -> None:
    """Descending aorta and oesophagus, painted after the heart that may touch them."""
    x, y = grid.x[None, :], grid.y[:, None]
    ax, ay = body["aorta_xy"]
    r = body["aorta_r"]
    for semi_x, semi_y, cx, cy, value in (
        (r + 1.5, r + 1.5, ax, ay, _MUSCLE),
        (r, r, ax, ay, blood),
        (7, 6, 3, ay - 2, _MUSCLE),  # oesophagus with a little air, right of the aorta
        (2.5, 2, 3, ay - 2, _AIR),
    ):
        mask = ((x - cx) / semi_x) ** 2 + ((y - cy) / semi_y) ** 2 <= 1
        vol[:, mask] = value


def _paint_heart(vol, grid: _Grid, patient: _Patient, blood: float, vessel_labels) -> None:
    heart = patient.heart
    centre, axes, semi = heart["centre"], heart["axes"], heart["semi"]
    _paint_ellipsoid(vol, grid, centre, axes, semi + 6, _FAT, only_below=150)
    _paint_ellipsoid(vol, grid, centre, axes, semi, _MYOCARDIUM, only_below=150)
    a, b, c = semi
    e_u, e_ant, e_lat = axes
    chambers = (  # (centre offset along e_u, e_ant, e_lat as fractions; semi-axis fractions)
        ((0.12, -0.05, 0.25), (0.62, 0.48, 0.45)),  # left ventricle
        ((0.05, 0.45, -0.15), (0.55, 0.28, 0.5)),  # right ventricle
        ((-0.62, -0.3, 0.3), (0.28, 0.38, 0.38)),  # left atrium
        ((-0.55, 0.1, -0.45), (0.32, 0.38, 0.32)),  # right atrium
    )
    for (fu, fa, fl), (su, sa, sl) in chambers:
        _paint_ellipsoid(vol, grid, centre + fu * a * e_u + fa * b * e_ant + fl * c * e_lat, axes, (su * a, sa * b, sl * c), blood)
    for g in patient.great_vessels:
        points, _ = _resample(g["points"], g["radius"] / 3)
        _paint_tube(vol, grid, points, g["radius"] + 5, _FAT)  # mediastinal fat sleeve
        _paint_tube(vol, grid, points, g["radius"] + 1.5, _MUSCLE)
        _paint_tube(vol, grid, points, g["radius"], blood)
    for name, v in patient.vessels.items():
        _paint_tube(vol, grid, v["points"], v["radii"] + 2.3, _FAT)  # groove fat
    for name, v in patient.vessels.items():
        _paint_tube(vol, grid, v["points"], v["radii"] + 0.5, _MYOCARDIUM, vessel_labels, VESSEL_IDS[name])  # wall
        _paint_tube(vol, grid, v["points"], v["radii"], blood)


def _paint_devices(vol, grid: _Grid, patient: _Patient, blood: float) -> list[tuple[np.ndarray, float]]:
    """Stents, sternal wires, pacemaker lead; returns metal points that cause streaks."""
    metal = []
    for d in patient.devices:
        if d["kind"] == "stent":
            _paint_tube(vol, grid, d["points"], d["radius"] + 0.35, 1400.0, z_pad=grid.thickness / 4)
            _paint_tube(vol, grid, d["points"], d["radius"] - 0.25, blood + 60)  # blooming into the lumen
        elif d["kind"] == "sternal_wires":
            body = patient.body
            sw, sd = body["sternum_half_width"] + 2.5, body["sternum_half_depth"] + 2.5
            st_y = -body["cav_y"] + body["sternum_half_depth"] - 4
            angle = np.linspace(0, 2 * math.pi, 400)
            for z in d["z_mm"]:
                ring = np.stack([sw * np.cos(angle), st_y + sd * np.sin(angle), np.full_like(angle, z)], axis=1)
                _paint_tube(vol, grid, ring, 0.6, 2500.0, z_pad=grid.thickness / 2)
                metal.append((np.array([0.0, st_y, z]), 250.0))
        elif d["kind"] == "pacemaker_lead":
            _paint_tube(vol, grid, d["points"], 0.9, 2500.0, z_pad=grid.thickness / 3)
            metal.append((d["points"][-1], 300.0))
    return metal


def _add_streaks(vol, grid: _Grid, metal, rng) -> None:
    """Bright/dark streaks through metal in the slices that contain it."""
    x, y = grid.x[None, :], grid.y[:, None]
    for point, strength in metal:
        for k in np.nonzero(np.abs(grid.z - point[2]) <= grid.thickness / 2)[0]:
            dist = np.hypot(x - point[0], y - point[1])
            streak = np.zeros_like(dist)
            for _ in range(int(rng.integers(2, 5))):
                angle = rng.uniform(0, math.pi)
                across = np.abs(-(x - point[0]) * math.sin(angle) + (y - point[1]) * math.cos(angle))
                streak += rng.choice((-1, 1)) * strength * rng.uniform(0.4, 1.0) * np.exp(-((across / 1.2) ** 2))
            vol[k] += (streak * np.exp(-dist / 80.0)).astype(np.float32)


def _correlated_noise(rng, shape, settings: PhantomSettings) -> np.ndarray:
    """Kernel-like noise: white noise filtered in-plane by a Gaussian plus some identity.

    The identity share (white_noise_fraction) keeps the fine grain a sharper kernel
    has; the result is scaled to noise_hu standard deviation.
    """
    if settings.noise_hu <= 0:
        return np.zeros(shape, dtype=np.float32)
    white = rng.standard_normal(shape, dtype=np.float32)
    sample = slice(None, None, max(1, shape[0] // 8))  # std from a few slices is enough
    sigma = settings.noise_grain_mm / settings.pixel_spacing_mm / 2
    noise = white
    if sigma > 0.3:
        noise = ndimage.gaussian_filter1d(white, sigma, axis=1, truncate=2.5)
        ndimage.gaussian_filter1d(noise, sigma, axis=2, truncate=2.5, output=noise)
        share = settings.white_noise_fraction
        noise *= math.sqrt(1 - share) / noise[sample].std()
        noise += math.sqrt(share) * white
    noise *= settings.noise_hu / noise[sample].std()
    return noise


def generate_phantom(seed: int, settings: PhantomSettings | None = None) -> Phantom:
    """Image the patient drawn from seed with the acquisition in settings."""
    settings = settings or PhantomSettings()
    patient = _cached_patient(int(seed), tuple(getattr(settings, f) for f in _PATIENT_FIELDS))
    acq = np.random.default_rng([seed, 1, settings.acquisition_seed])
    heart = patient.heart
    inc, thick, ps = settings.slice_increment_mm, settings.slice_thickness_mm, settings.pixel_spacing_mm

    # from below the apex up to about the carina, like a calcium-score scan
    z_lo = patient.z_range[0] - acq.uniform(10, 20)
    z_hi = patient.z_range[1] + acq.uniform(30, 45)
    n_slices = settings.n_slices or int(math.ceil((z_hi - z_lo) / inc)) + 1
    z0 = round(0.5 * (z_lo + z_hi) - 0.5 * (n_slices - 1) * inc, 1)  # tables report ~0.1 mm positions
    z = z0 + inc * np.arange(n_slices)
    if settings.fov_centre == "heart":
        centre_xy = heart["centre"][:2] + acq.uniform(-8, 8, 2)
    else:
        centre_xy = acq.uniform((-10, -5), (10, 15))
    origin = (round(centre_xy[0] - (settings.cols - 1) / 2 * ps, 3), round(centre_xy[1] - (settings.rows - 1) / 2 * ps, 3))
    grid = _Grid(origin[0] + ps * np.arange(settings.cols), origin[1] + ps * np.arange(settings.rows), z, thick)

    calcium_scale = _kvp_factor(settings.kvp, "calcium")
    blood = _BLOOD + (310.0 * _kvp_factor(settings.kvp, "iodine") if settings.contrast else 0.0)
    hu = np.empty((n_slices, settings.rows, settings.cols), dtype=np.float32)
    vessel_labels = np.zeros(hu.shape, dtype=np.uint8)
    _paint_body(hu, grid, patient.body, blood, calcium_scale)
    lung_vessel_hu = 0.8 * blood if settings.contrast else 30.0
    for centre, axes, semi in patient.lung_vessels:
        _paint_ellipsoid(hu, grid, centre, axes, semi, lung_vessel_hu, only_below=-500)
    _paint_heart(hu, grid, patient, blood, vessel_labels)
    _paint_posterior_mediastinum(hu, grid, patient.body, blood)
    metal = _paint_devices(hu, grid, patient, blood)

    motion = np.zeros(2)
    if not settings.gated:
        length = settings.motion_blur_mm if settings.motion_blur_mm is not None else acq.uniform(1.5, 5.0)
        angle = acq.uniform(0, math.pi)
        motion = length * np.array([math.cos(angle), math.sin(angle)])

    rendered = []
    for obj in patient.calcium:
        blur = motion if obj.kind == "coronary" else (0.0, 0.0)
        rendered.append((obj, *_render_calcium(hu, grid, obj, obj.peak_hu * calcium_scale, blur)))
    outside = (np.arange(settings.rows)[:, None] - (settings.rows - 1) / 2) ** 2 + (
        np.arange(settings.cols)[None, :] - (settings.cols - 1) / 2
    ) ** 2 > (min(settings.rows, settings.cols) / 2) ** 2
    hu[:, outside] = HU_MIN  # outside the reconstruction circle: nothing to see, label or score
    vessel_labels[:, outside] = 0
    coronary_labels = np.zeros(hu.shape, dtype=np.uint8)
    lesions, distractors = [], []
    for obj, box, fraction in rendered:
        entry = _ground_truth_entry(obj, hu, box, fraction, grid, calcium_scale, coronary_labels)
        if obj.kind == "coronary":
            lesions.append(
                {"lesion_id": len(lesions) + 1, "vessel": obj.vessel, "vessel_label": VESSEL_IDS[obj.vessel],
                 "distance_from_ostium_mm": round(obj.arc_mm, 2), "motion_blur_mm": round(float(np.hypot(*motion)), 3), **entry}
            )
        else:
            agatston_if_scored = entry.pop("agatston")
            distractors.append({"kind": obj.kind, **entry, "agatston_if_scored": agatston_if_scored})
    distractors += [{"kind": d["kind"], **({"vessel": d["vessel"]} if "vessel" in d else {})} for d in patient.devices]

    hu += _correlated_noise(acq, hu.shape, settings)
    if settings.include_distractors:
        _add_streaks(hu, grid, metal, acq)
        distractors += _add_noise_spikes(hu, acq)
    hu[:, outside] = HU_MIN
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    footprints = [(box, fraction > 0, VESSEL_IDS[obj.vessel])
                  for obj, box, fraction in rendered if obj.kind == "coronary" and box is not None]

    return Phantom(
        hu=hu,
        spacing_mm=(float(inc), float(ps), float(ps)),
        slice_thickness_mm=float(thick),
        z_positions_mm=z,
        origin_xy_mm=origin,
        coronary_labels=coronary_labels,
        vessel_labels=vessel_labels,
        lesions=lesions,
        distractors=distractors,
        reference={**_reference(lesions, settings), **image_reference(hu, footprints, ps, inc)},
        metadata=_metadata(seed, settings, patient, motion),
    )


def _ground_truth_entry(obj: _Calcium, clean, box, fraction, grid: _Grid, calcium_scale: float, coronary_labels) -> dict:
    """Ground truth of one rendered calcified object, from the noise-free image.

    Coronary lesions also write their vessel label on their voxels.
    """
    ps, inc = grid.pixel, grid.increment
    records, n_voxels, n_counted = [], 0, 0
    if box is not None:
        voxels, counted, records = _score_rendering(clean[box], fraction, grid.z[box[0]], box[0].start, ps * ps)
        n_voxels, n_counted = int(voxels.sum()), int(counted.sum())
        if obj.kind == "coronary":
            np.copyto(coronary_labels[box], np.uint8(VESSEL_IDS[obj.vessel]), where=voxels)
    return {
        "centre_zyx_mm": [round(float(v), 3) for v in obj.centre[::-1]],
        "centre_voxel_zyx": [
            round(float(np.interp(obj.centre[2], grid.z, np.arange(len(grid.z)))), 3),
            round(float((obj.centre[1] - grid.y[0]) / ps), 3),
            round(float((obj.centre[0] - grid.x[0]) / ps), 3),
        ],
        "semi_axes_mm": [round(float(s), 3) for s in obj.semi],
        "long_axis_zyx": [round(float(v), 4) for v in obj.axes[0][::-1]],
        "density_hu": round(obj.peak_hu * calcium_scale, 2),
        "slices": records,
        "agatston": round(sum(r["agatston"] for r in records) * inc / 3.0, 4),
        "volume_mm3": round(n_counted * ps * ps * inc, 4),
        "n_voxels": n_voxels,
    }


def _add_noise_spikes(hu, rng) -> list[dict]:
    """Isolated bright pixels and tiny clusters (detector/quantum spikes) above 130 HU."""
    spikes = []
    nz, ny, nx = hu.shape
    for _ in range(int(rng.integers(10, 40))):
        k, r, c = int(rng.integers(nz)), int(rng.integers(ny // 4, 3 * ny // 4)), int(rng.integers(nx // 4, 3 * nx // 4))
        h, w = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        value = float(rng.uniform(150, 450))
        hu[k, r : r + h, c : c + w] += value
        spikes.append({"kind": "noise_spike", "voxel_zyx": [k, r, c], "size_px": [h, w], "added_hu": round(value, 1)})
    return spikes


def _reference(lesions: list[dict], settings: PhantomSettings) -> dict:
    per_vessel = {name: 0.0 for name in VESSEL_IDS}
    volume = {name: 0.0 for name in VESSEL_IDS}
    for lesion in lesions:
        per_vessel[lesion["vessel"]] += lesion["agatston"]
        volume[lesion["vessel"]] += lesion["volume_mm3"]
    total = sum(per_vessel.values())
    n_vessels = sum(1 for v in per_vessel.values() if v > 0)
    return {
        "agatston_total": round(total, 4),
        **{f"agatston_{name}": round(v, 4) for name, v in per_vessel.items()},
        "volume_mm3": round(sum(volume.values()), 4),
        **{f"volume_mm3_{name}": round(v, 4) for name, v in volume.items()},
        "lesion_count": sum(1 for lesion in lesions if lesion["agatston"] > 0),
        "risk_category": risk_category(total),
        "cac_drs": cac_drs(total, n_vessels),
        "n_vessels_calcified": n_vessels,
        "threshold_hu": AGATSTON_THRESHOLD_HU,
        "min_area_mm2": AGATSTON_MIN_AREA_MM2,
        "increment_factor": settings.slice_increment_mm / 3.0,
        "volume_basis": "voxel count x pixel area x slice increment",
    }


IMAGE_REFERENCE_KEYS = ("image_agatston_total", *(f"image_agatston_{name}" for name in VESSEL_IDS),
                        "image_risk_category")


def image_reference(hu: np.ndarray, footprints: list[tuple], pixel_mm: float, increment_mm: float) -> dict:
    """Agatston scores read from the image itself, as a reader with perfect knowledge
    of where the coronary plaques lie would score it (the paper's reference is readers
    scoring the scan, not the noise-free object).

    ``footprints``: (box, mask, vessel label) per coronary lesion, the voxels its
    rendering covers at all. The image is what the DICOM stores (HU rounded to
    integers). Per slice, each 8-connected group of pixels >= 130 HU that overlaps a
    footprint (shares a pixel with it) is a lesion of the footprint's vessel (the
    vessel most of its overlapping pixels carry); groups of at least 1 mm^2 score
    area x weight(peak HU), times increment / 3 mm like the noise-free reference. Where noise pushes a faint plaque
    under the threshold this scores 0 although the noise-free reference does not;
    where noise lifts one over it, the reverse.
    """
    footprint = np.zeros(hu.shape, dtype=np.uint8)
    for box, mask, vessel in footprints:
        np.copyto(footprint[box], np.uint8(vessel), where=mask)
    per_vessel = {name: 0.0 for name in VESSEL_IDS}
    for s in np.flatnonzero(footprint.any(axis=(1, 2))):
        image = np.rint(hu[s])  # as the DICOM stores it
        calcified = image >= AGATSTON_THRESHOLD_HU
        groups, _ = ndimage.label(calcified, structure=np.ones((3, 3)))
        for g in np.unique(groups[(footprint[s] > 0) & calcified]):
            member = groups == g
            area = float(member.sum()) * pixel_mm * pixel_mm
            if area < AGATSTON_MIN_AREA_MM2:
                continue
            vessel = int(np.bincount(footprint[s][member], minlength=len(VESSEL_IDS) + 1)[1:].argmax() + 1)
            per_vessel[VESSEL_LABELS[vessel]] += area * _weight(float(image[member].max()))
    factor = increment_mm / 3.0
    total = sum(per_vessel.values()) * factor
    return {
        "image_agatston_total": round(total, 4),
        **{f"image_agatston_{name}": round(v * factor, 4) for name, v in per_vessel.items()},
        "image_risk_category": risk_category(total),
    }


def _metadata(seed: int, settings: PhantomSettings, patient: _Patient, motion) -> dict:
    heart = patient.heart
    return {
        "seed": int(seed),
        "settings": asdict(settings),
        "kvp": settings.kvp,
        "gated": settings.gated,
        "contrast": settings.contrast,
        "slice_thickness_mm": settings.slice_thickness_mm,
        "slice_increment_mm": settings.slice_increment_mm,
        "pixel_spacing_mm": settings.pixel_spacing_mm,
        "motion_blur_mm": round(float(np.hypot(*motion)), 3),
        "heart_centre_zyx_mm": [round(float(v), 3) for v in heart["centre"][::-1]],
        "heart_semi_axes_mm": [round(float(v), 3) for v in heart["semi"]],
        "body_semi_axes_xy_mm": [round(patient.body["wx"], 3), round(patient.body["wy"], 3)],
        "devices": [d["kind"] for d in patient.devices],
    }
