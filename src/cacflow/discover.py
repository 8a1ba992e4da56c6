"""Walk one visit's DICOM folder and describe each series it holds.

Every regular file is tried (DICOM files often have no extension and odd names);
each is opened once and only its header is read (:mod:`cacflow.dicom_headers`).
Files that cannot be used are listed with a reason, never silently dropped.

Files are grouped by SeriesInstanceUID only. A series that mixes orientations,
image types or matrices is *not* split here: guessing how to split it would hide an
archive problem, so it is recorded (``mixed_*`` fields) and QC fails it with a reason.
Exact copies of a file (same SOPInstanceUID) are kept once and counted.

With a :class:`cacflow.header_cache.HeaderCache`, files whose path, size and
modification time are unchanged since the cache was written are not opened: their
header comes from the cache.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.uid import UID

from cacflow.dicom_headers import HeaderRecord, read_header

if TYPE_CHECKING:
    from cacflow.header_cache import HeaderCache

# Geometry constants (documented in docs/qc.md).
AXIAL_TOLERANCE_DEG = 5.0  # slice normal within this angle of an axis counts as that axis
GAP_FACTOR = 1.5  # a step > 1.5 x the median increment means slices are missing
UNEVEN_TOLERANCE = 0.10  # a step deviating > 10 % from the median is uneven spacing
DUPLICATE_TOLERANCE_MM = 0.01  # positions closer than this are the same slice

# Why a visit yielded no series.
REASON_DIR_MISSING = "dicom_dir_missing"
REASON_NOT_A_DIR = "dicom_dir_not_a_directory"
REASON_DIR_EMPTY = "dicom_dir_empty"
REASON_NO_DICOM = "no_dicom_files"
# Per-file reasons added here (the others come from read_header).
REASON_DIR_UNREADABLE = "directory_unreadable"
REASON_TRUNCATED_PIXELS = "truncated_pixel_data"


@dataclass
class SeriesRecord:
    """One series of a visit, with geometry measured from the slice positions.

    ``to_row()`` gives a flat row keyed by field name, so a row read back from a table
    rebuilds the record; ``files`` (sorted along the slice normal, which points to the
    patient's head for axial series) and ``duplicate_files`` stay out of the row.
    """

    series_uid: str
    study_uid: str | None
    series_number: int | None
    sop_class_uid: str | None
    modality: str | None
    image_type: tuple[str, ...]
    series_description: str | None
    protocol_name: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    convolution_kernel: str | None
    transfer_syntax: str | None
    compressed: bool
    multiframe: bool
    kvp: float | None
    slice_thickness_mm: float | None
    spacing_between_slices_mm: float | None  # the tag, often absent; see slice_increment_mm
    gantry_tilt_deg: float | None  # the tag
    contrast_agent: str | None
    contrast_route: str | None
    cardiac_sync_technique: str | None
    trigger_time_ms: float | None  # median over files
    nominal_cardiac_phase_pct: float | None
    heart_rate_bpm: float | None
    scan_options: str | None
    rows: int | None
    columns: int | None
    pixel_spacing_row_mm: float | None  # PixelSpacing value 1 (between rows)
    pixel_spacing_col_mm: float | None
    fov_mm: float | None  # largest in-plane extent, columns x spacing or rows x spacing
    rescale_slope: float | None
    rescale_intercept: float | None
    n_missing_rescale: int  # files without RescaleSlope or RescaleIntercept
    rescale_varies: bool
    pixel_representation: int | None
    bits_allocated: int | None
    orientation: str | None  # axial | tilted_axial | oblique | coronal | sagittal
    orientation_axial: bool  # slice normal within AXIAL_TOLERANCE_DEG of the z axis
    normal_angle_deg: float | None  # angle between slice normal and z axis
    tilt_geometry_deg: float | None  # tilt of the slice plane in y-z (gantry tilt)
    tilt_deg: float | None  # max of |tag| and geometry
    mixed_orientation: bool
    mixed_image_type: bool
    mixed_matrix: bool  # rows, columns or pixel spacing differ between files
    n_files: int  # usable files
    n_slices: int  # slices (frames for multi-frame files)
    n_missing_position: int  # slices without a usable position (no ImagePositionPatient or orientation)
    n_duplicate_positions: int  # extra slices at an already occupied position
    n_duplicate_files: int  # exact copies (same SOPInstanceUID) skipped
    n_unreadable_files: int  # files of this series whose pixel data is cut short
    slice_increment_mm: float | None  # median step along the normal
    increment_min_mm: float | None
    increment_max_mm: float | None
    spacing_deviation_pct: float | None  # largest |step - median| / median, in %
    n_gaps: int  # steps > GAP_FACTOR x median
    uneven_spacing: bool  # spacing_deviation_pct > UNEVEN_TOLERANCE (and not only gaps)
    z_extent_mm: float | None  # first to last slice centre along the normal
    files: list[str] = field(default_factory=list, repr=False)
    duplicate_files: list[str] = field(default_factory=list, repr=False)

    @property
    def native(self) -> bool:
        return bool(self.image_type) and self.image_type[0] == "ORIGINAL"

    def to_row(self) -> dict:
        """Flat dict of JSON/Parquet-friendly scalars (no file lists)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("files", "duplicate_files")}
        row["image_type"] = "\\".join(self.image_type) or None
        return row


@dataclass
class VisitDiscovery:
    """Everything found in one visit folder."""

    dicom_dir: str
    series: list[SeriesRecord]
    unreadable: list[tuple[str, str]]  # (path, reason) for every file not in a series
    n_files_seen: int
    reason: str | None = None  # set when no series was found

    def unreadable_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.unreadable))

    def to_row(self) -> dict:
        return {
            "dicom_dir": self.dicom_dir,
            "n_series": len(self.series),
            "n_files_seen": self.n_files_seen,
            "n_unreadable": len(self.unreadable),
            "discovery_reason": self.reason,
        }


def discover_visit(dicom_dir: str | os.PathLike, cache: HeaderCache | None = None) -> VisitDiscovery:
    """Find every DICOM series under ``dicom_dir`` (any depth). Never raises.

    ``cache``: headers of unchanged files are taken from it, and the headers read are
    added to it (the caller saves it). The result is the same with or without it.
    """
    root = Path(dicom_dir)
    if not root.exists():
        return VisitDiscovery(str(root), [], [], 0, REASON_DIR_MISSING)
    if not root.is_dir():
        return VisitDiscovery(str(root), [], [], 0, REASON_NOT_A_DIR)

    files, unreadable = _list_files(root)
    paths = [path for path, _ in files]
    folder_cache = cache.folder(root) if cache is not None else None
    headers: dict[str, list[HeaderRecord]] = defaultdict(list)
    for path, file_stat in files:
        cached = folder_cache.get(path, file_stat) if folder_cache is not None else None
        if cached is not None:
            record, reason = cached
        else:
            read_started_ns = time.time_ns()
            record, reason = read_header(path)
            if folder_cache is not None:
                folder_cache.put(path, file_stat, (record, reason), read_started_ns)
        if record is None:
            unreadable.append((path, reason))
        else:
            headers[record.series_uid].append(record)

    series = []
    for uid, records in headers.items():
        usable = [r for r in records if not r.pixel_data_truncated]
        unreadable.extend((r.path, REASON_TRUNCATED_PIXELS) for r in records if r.pixel_data_truncated)
        series.append(_build_series(uid, usable or records, n_truncated=len(records) - len(usable),
                                    usable=bool(usable)))
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))

    reason = None
    if not series:
        if (str(root), REASON_DIR_UNREADABLE) in unreadable:
            reason = REASON_DIR_UNREADABLE
        else:
            reason = REASON_DIR_EMPTY if not paths and not unreadable else REASON_NO_DICOM
    if folder_cache is not None:
        cache.finish(folder_cache)
    return VisitDiscovery(str(root), series, sorted(unreadable), len(paths), reason)


def _list_files(root: Path) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, str]]]:
    """Regular files under root with their stat, sorted by path; unreadable sub-folders
    are reported, not skipped silently.

    Symlinked folders are not followed (they can loop); symlinked files are read (and
    stat'ed through the link).
    """
    unreadable: list[tuple[str, str]] = []
    files = []

    def report(error: OSError) -> None:
        unreadable.append((str(error.filename), REASON_DIR_UNREADABLE))

    for folder, _, names in os.walk(root, onerror=report):
        for name in names:
            path = os.path.join(folder, name)
            try:
                file_stat = os.stat(path)
            except (OSError, ValueError):  # a broken link, or gone since the listing
                continue
            if stat.S_ISREG(file_stat.st_mode):
                files.append((path, file_stat))
    files.sort(key=lambda item: item[0])
    return files, unreadable


def _build_series(uid: str, records: list[HeaderRecord], n_truncated: int, usable: bool) -> SeriesRecord:
    # Exact copies of one instance (same SOPInstanceUID) are kept once.
    unique: dict[str, HeaderRecord] = {}
    duplicates = []
    for record in records:  # records arrive in sorted path order: the first copy wins
        if record.sop_instance_uid in unique:
            duplicates.append(record.path)
        else:
            unique[record.sop_instance_uid] = record
    files = list(unique.values())

    orientations = Counter(_rounded(r.image_orientation, 3) for r in files if r.image_orientation)
    iop = orientations.most_common(1)[0][0] if orientations else None
    normal = _slice_normal(iop) if iop else None
    geometry = _orientation_geometry(normal)
    tag_tilt = _most_common(r.gantry_tilt_deg for r in files)
    tilts = [abs(t) for t in (tag_tilt, geometry["tilt_geometry_deg"]) if t is not None]

    # A series whose every file is truncated keeps its metadata but has no usable slice.
    ordered, projections, n_missing_position = _order_along_normal(files if usable else [], normal)
    spacing = _spacing_stats(projections)

    rows = _most_common(r.rows for r in files)
    columns = _most_common(r.columns for r in files)
    pixel_spacing = _most_common(r.pixel_spacing_mm for r in files)
    fov = None
    if pixel_spacing and rows and columns:
        fov = max(rows * pixel_spacing[0], columns * pixel_spacing[1])
    slopes = {r.rescale_slope for r in files if r.rescale_slope is not None}
    intercepts = {r.rescale_intercept for r in files if r.rescale_intercept is not None}
    trigger_times = [r.trigger_time_ms for r in files if r.trigger_time_ms is not None]
    transfer_syntax = _most_common(r.transfer_syntax for r in files)
    image_types = Counter(r.image_type for r in files)

    return SeriesRecord(
        series_uid=uid,
        study_uid=_most_common(r.study_uid for r in files),
        series_number=_most_common(r.series_number for r in files),
        sop_class_uid=_most_common(r.sop_class_uid for r in files),
        modality=_most_common(r.modality for r in files),
        image_type=image_types.most_common(1)[0][0],
        series_description=_most_common(r.series_description for r in files),
        protocol_name=_most_common(r.protocol_name for r in files),
        manufacturer=_most_common(r.manufacturer for r in files),
        manufacturer_model=_most_common(r.manufacturer_model for r in files),
        convolution_kernel=_most_common(r.convolution_kernel for r in files),
        transfer_syntax=transfer_syntax,
        compressed=_is_compressed(transfer_syntax),
        multiframe=any(r.multiframe for r in files),
        kvp=_most_common(r.kvp for r in files),
        slice_thickness_mm=_most_common(r.slice_thickness_mm for r in files),
        spacing_between_slices_mm=_most_common(r.spacing_between_slices_mm for r in files),
        gantry_tilt_deg=tag_tilt,
        contrast_agent=_most_common(r.contrast_agent for r in files),
        contrast_route=_most_common(r.contrast_route for r in files),
        cardiac_sync_technique=_most_common(r.cardiac_sync_technique for r in files),
        trigger_time_ms=float(np.median(trigger_times)) if trigger_times else None,
        nominal_cardiac_phase_pct=_most_common(r.nominal_cardiac_phase_pct for r in files),
        heart_rate_bpm=_most_common(r.heart_rate_bpm for r in files),
        scan_options=_most_common(r.scan_options for r in files),
        rows=rows,
        columns=columns,
        pixel_spacing_row_mm=pixel_spacing[0] if pixel_spacing else None,
        pixel_spacing_col_mm=pixel_spacing[1] if pixel_spacing else None,
        fov_mm=fov,
        rescale_slope=_most_common(r.rescale_slope for r in files),
        rescale_intercept=_most_common(r.rescale_intercept for r in files),
        n_missing_rescale=sum(r.rescale_slope is None or r.rescale_intercept is None for r in files),
        rescale_varies=len(slopes) > 1 or len(intercepts) > 1,
        pixel_representation=_most_common(r.pixel_representation for r in files),
        bits_allocated=_most_common(r.bits_allocated for r in files),
        **geometry,
        tilt_deg=max(tilts) if tilts else None,
        mixed_orientation=len(orientations) > 1,
        # Only the first three values (original/derived, primary/secondary, kind):
        # vendors vary the free-text fourth value slice by slice.
        mixed_image_type=len({t[:3] for t in image_types}) > 1,
        mixed_matrix=len({(r.rows, r.columns, _rounded(r.pixel_spacing_mm, 3)) for r in files}) > 1,
        n_files=len(ordered),
        n_slices=len(projections) + n_missing_position,
        n_missing_position=n_missing_position,
        n_duplicate_files=len(duplicates),
        n_unreadable_files=n_truncated,
        **spacing,
        files=[r.path for r in ordered],
        duplicate_files=duplicates,
    )


def _most_common(values):
    """Most frequent non-None value (the first seen wins ties), or None."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _is_compressed(transfer_syntax: str | None) -> bool:
    try:
        return bool(transfer_syntax) and UID(transfer_syntax).is_compressed
    except ValueError:  # a malformed UID string
        return False


def _rounded(values, digits: int):
    return tuple(round(v, digits) + 0.0 for v in values) if values else None  # + 0.0 folds -0.0


def _slice_normal(iop) -> np.ndarray | None:
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    length = np.linalg.norm(normal)
    if length < 1e-6:
        return None
    normal /= length
    # Point the normal along the positive direction of its dominant axis, so files
    # sort inferior -> superior (axial), right -> left (sagittal), anterior -> posterior.
    if normal[np.argmax(np.abs(normal))] < 0:
        normal = -normal
    return normal


def _orientation_geometry(normal: np.ndarray | None) -> dict:
    if normal is None:
        return {"orientation": None, "orientation_axial": False, "normal_angle_deg": None,
                "tilt_geometry_deg": None}
    nx, ny, nz = np.abs(normal)
    angle_to_z = math.degrees(math.acos(min(1.0, nz)))
    axis = int(np.argmax([nx, ny, nz]))
    tilt = None
    if axis == 2:
        tilt = math.degrees(math.atan2(ny, nz))
        if angle_to_z <= AXIAL_TOLERANCE_DEG:
            label = "axial"
        # Gantry tilt rotates the slice plane about the x axis only (normal in y-z).
        elif math.degrees(math.atan2(nx, nz)) <= AXIAL_TOLERANCE_DEG:
            label = "tilted_axial"
        else:
            label = "oblique"
    else:
        angle_to_axis = math.degrees(math.acos(min(1.0, (nx, ny)[axis])))
        label = ("sagittal", "coronal")[axis] if angle_to_axis <= AXIAL_TOLERANCE_DEG else "oblique"
    return {"orientation": label, "orientation_axial": label == "axial",
            "normal_angle_deg": round(angle_to_z, 3), "tilt_geometry_deg": None if tilt is None else round(tilt, 3)}


def _order_along_normal(files: list[HeaderRecord], normal: np.ndarray | None):
    """Files sorted by their (first) slice position along the normal; all slice projections sorted."""
    projections = []
    keyed = []
    n_missing = 0
    for record in files:
        positions = record.positions
        if normal is None or not positions:
            n_missing += len(positions) or record.number_of_frames
            keyed.append((math.inf, record))
            continue
        values = np.asarray(positions, float) @ normal
        projections.extend(values.tolist())
        keyed.append((float(values.min()), record))
    keyed.sort(key=lambda kv: (kv[0], kv[1].instance_number if kv[1].instance_number is not None else 0,
                               kv[1].path))
    return [record for _, record in keyed], sorted(projections), n_missing


def _spacing_stats(projections: list[float]) -> dict:
    stats = {"n_duplicate_positions": 0, "slice_increment_mm": None, "increment_min_mm": None,
             "increment_max_mm": None, "spacing_deviation_pct": None, "n_gaps": 0,
             "uneven_spacing": False, "z_extent_mm": None}
    if not projections:
        return stats
    positions = np.asarray(projections)
    stats["z_extent_mm"] = round(float(positions[-1] - positions[0]), 3)
    steps = np.diff(positions)
    duplicate = steps < DUPLICATE_TOLERANCE_MM
    stats["n_duplicate_positions"] = int(duplicate.sum())
    steps = steps[~duplicate]
    if steps.size == 0:
        return stats
    median = float(np.median(steps))
    deviation = np.abs(steps - median) / median
    gaps = steps > GAP_FACTOR * median
    stats.update(
        slice_increment_mm=round(median, 4),
        increment_min_mm=round(float(steps.min()), 4),
        increment_max_mm=round(float(steps.max()), 4),
        spacing_deviation_pct=round(float(deviation.max()) * 100, 2),
        n_gaps=int(gaps.sum()),
        # Missing slices are reported as gaps; "uneven" means irregular steps beyond those.
        uneven_spacing=bool((deviation[~gaps] > UNEVEN_TOLERANCE).any()),
    )
    return stats


