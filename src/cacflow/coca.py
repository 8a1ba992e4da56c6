"""COCA gated reference scores: OsiriX ROI exports rasterised and scored.

The Stanford AIMI COCA gated release holds, per patient, a DICOM series in
``patient/<id>/<series>/`` and the readers' calcium ROIs in
``calcium_xml/<id>.xml`` (an OsiriX export, Apple plist). Each ROI is a polygon
drawn around calcium on one slice; calcium is the voxels >= 130 HU inside it.
This module turns the polygons into a per-vessel label volume and scores it
with :func:`cacflow.scoring.score_volume`, so reference and model scores share
one definition. Choices (pixel-centre convention, slice matching, overlaps)
are documented in ``docs/scoring.md``.
"""

from __future__ import annotations

import plistlib
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
from pydicom.errors import InvalidDicomError

from cacflow.nifti_io import save_nifti
from cacflow.scoring import ScanScore, ScoringSettings, score
from cacflow.volume import Volume

# OsiriX ROI names used by COCA -> cacflow label values (1 LM, 2 LAD, 3 LCX, 4 RCA).
VESSEL_BY_ROI_NAME = {
    "left coronary artery": 1,  # the left main
    "left anterior descending artery": 2,
    "left circumflex artery": 3,
    "right coronary artery": 4,
}

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
# Slice positions may deviate this much (fraction of the increment) from even spacing.
_SPACING_TOLERANCE = 0.01


@dataclass
class DicomSeries:
    volume: Volume
    kvp: float | None


def read_dicom_series(folder: str | Path) -> DicomSeries:
    """Read an axial CT series (one file per slice) into a canonical volume.

    Used for COCA series and for calibration phantoms; the workflow itself
    converts with dcm2niix (:mod:`cacflow.convert`).

    Slices are sorted by ImagePositionPatient z (inferior -> superior); HU =
    stored value x RescaleSlope + RescaleIntercept. Raises ValueError for what
    cannot be scored as one volume: no images, non-axial orientation, mixed
    sizes, duplicate or unevenly spaced slice positions.
    """
    datasets = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path)
        except InvalidDicomError:
            continue  # series folders can hold stray files (thumbnails, .DS_Store)
        if "PixelData" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise ValueError(f"no DICOM images in {folder}")
    for dataset in datasets:
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient])
        if not np.allclose(orientation, _AXIAL, atol=1e-3):
            raise ValueError(f"not an axial series in standard orientation: {list(orientation)}")
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    z = np.array([float(d.ImagePositionPatient[2]) for d in datasets])
    if len({(int(d.Rows), int(d.Columns)) for d in datasets}) != 1:
        raise ValueError("slices of different sizes")
    steps = np.diff(z)
    if len(z) > 1:
        if np.any(steps <= 0):
            raise ValueError("duplicate slice positions")
        increment = float(np.median(steps))
        if np.max(np.abs(steps - increment)) > _SPACING_TOLERANCE * increment:
            raise ValueError(f"uneven slice spacing: steps {sorted(set(np.round(steps, 3)))} mm")
    else:
        increment = float(datasets[0].get("SliceThickness") or 1.0)
    hu = np.stack(
        [
            d.pixel_array.astype(np.float32) * float(d.get("RescaleSlope", 1))
            + float(d.get("RescaleIntercept", 0))
            for d in datasets
        ]
    )
    row_mm, col_mm = (float(v) for v in datasets[0].PixelSpacing)
    thickness = datasets[0].get("SliceThickness")
    kvp = datasets[0].get("KVP")
    volume = Volume(
        hu=hu,
        spacing_mm=(increment, row_mm, col_mm),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        z_positions_mm=z,
    )
    return DicomSeries(volume=volume, kvp=float(kvp) if kvp not in (None, "") else None)


@dataclass
class CocaRoi:
    image_index: int
    name: str
    vessel_label: int | None  # None: not one of the four coronary names
    points_px: np.ndarray  # (n, 2) polygon vertices, (x = column, y = row)
    z_mm: float | None  # mean z of Point_mm; None when absent


def _numbers(text) -> list[float]:
    return [float(v) for v in _NUMBER.findall(str(text))]


def read_calcium_xml(path: str | Path) -> list[CocaRoi]:
    """All ROIs of an OsiriX ROI export (``Images`` -> ``ROIs``), in file order."""
    with open(path, "rb") as handle:
        document = plistlib.load(handle)
    rois = []
    for image in document["Images"]:
        for roi in image.get("ROIs", []):
            points = [_numbers(p)[:2] for p in roi.get("Point_px", [])]
            z_values = [_numbers(p)[2] for p in roi.get("Point_mm", []) if len(_numbers(p)) >= 3]
            name = str(roi.get("Name", "")).strip()
            rois.append(
                CocaRoi(
                    image_index=int(image["ImageIndex"]),
                    name=name,
                    vessel_label=VESSEL_BY_ROI_NAME.get(name.casefold()),
                    points_px=np.array(points, dtype=np.float64).reshape(-1, 2),
                    z_mm=float(np.mean(z_values)) if z_values else None,
                )
            )
    return rois


def rasterise_polygon(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule).

    Pixel (row r, column c) has its centre at (x = c, y = r), the convention of
    OsiriX point coordinates as read by public COCA parsers (skimage polygon).
    """
    mask = np.zeros(shape, dtype=bool)
    if len(points_xy) < 3:
        return mask
    x, y = points_xy[:, 0], points_xy[:, 1]
    c0, c1 = max(int(np.ceil(x.min())), 0), min(int(np.floor(x.max())), shape[1] - 1)
    r0, r1 = max(int(np.ceil(y.min())), 0), min(int(np.floor(y.max())), shape[0] - 1)
    if c0 > c1 or r0 > r1:
        return mask
    rows, cols = np.mgrid[r0 : r1 + 1, c0 : c1 + 1].astype(np.float64)
    inside = np.zeros(rows.shape, dtype=bool)
    for xa, ya, xb, yb in zip(x, y, np.roll(x, -1), np.roll(y, -1)):
        if ya == yb:
            continue  # a horizontal edge crosses no horizontal ray
        crosses = (ya > rows) != (yb > rows)
        x_cross = xa + (rows - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (cols < x_cross)
    mask[r0 : r1 + 1, c0 : c1 + 1] = inside
    return mask


def _slice_of(roi: CocaRoi, z_positions: np.ndarray, increment: float) -> int | None:
    """The slice an ROI was drawn on: by z of Point_mm, else by ImageIndex."""
    if roi.z_mm is not None:
        nearest = int(np.argmin(np.abs(z_positions - roi.z_mm)))
        return nearest if abs(z_positions[nearest] - roi.z_mm) <= 0.5 * increment else None
    # ImageIndex counts from the most inferior slice, like the canonical z index.
    return roi.image_index if 0 <= roi.image_index < len(z_positions) else None


def label_volume(rois: list[CocaRoi], volume: Volume) -> tuple[np.ndarray, int]:
    """Per-vessel label volume of the ROIs and the number of coronary ROIs not placed.

    ROIs of one vessel on one slice are united; where polygons of two vessels
    overlap, the lower label value (LM < LAD < LCX < RCA) holds the pixel, so
    the result does not depend on ROI order.
    """
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    unplaced = 0
    for roi in rois:
        if roi.vessel_label is None:
            continue
        z = _slice_of(roi, volume.z_positions_mm, volume.increment_mm)
        inside = None if z is None else rasterise_polygon(roi.points_px, volume.hu.shape[1:])
        if inside is None or not inside.any():
            unplaced += 1
            continue
        plane = labels[z]
        plane[inside & ((plane == 0) | (plane > roi.vessel_label))] = roi.vessel_label
    return labels, unplaced


_SCORE_FIELDS = [f for f in fields(ScanScore) if f.name != "lesions"]
_ARROW_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string(), "bool": pa.bool_()}


def reference_schema() -> pa.Schema:
    """Columns of the COCA reference table, one row per patient."""
    columns = [
        ("coca_id", pa.string()),
        ("series", pa.string()),
        ("status", pa.string()),
        ("status_reason", pa.string()),
        ("n_rois", pa.int64()),
        ("n_unmatched_rois", pa.int64()),
        ("n_unknown_rois", pa.int64()),
    ]
    for f in _SCORE_FIELDS:
        columns.append((f.name, _ARROW_TYPES[str(f.type).split(" |")[0]]))
    return pa.schema(columns)


def _empty_row(coca_id: str) -> dict:
    row = {name: None for name in reference_schema().names}
    row.update(coca_id=coca_id, status="failed")
    return row


def score_patient(
    gated_root: str | Path,
    coca_id: str,
    settings: ScoringSettings = ScoringSettings(),
    labels_dir: str | Path | None = None,
) -> dict:
    """One reference-table row; any problem gives status 'failed' and a reason, never an exception."""
    root = Path(gated_root)
    row = _empty_row(coca_id)
    xml_path = root / "calcium_xml" / f"{coca_id}.xml"
    patient_dir = root / "patient" / coca_id
    if not xml_path.is_file():
        row["status_reason"] = f"no calcium_xml/{coca_id}.xml"
        return row
    if not patient_dir.is_dir():
        row["status_reason"] = f"no patient/{coca_id} folder"
        return row
    series_dirs = sorted(p for p in patient_dir.iterdir() if p.is_dir())
    if len(series_dirs) != 1:
        found = ", ".join(p.name for p in series_dirs) or "none"
        row["status_reason"] = f"expected one series folder in patient/{coca_id}, found: {found}"
        return row
    row["series"] = series_dirs[0].name
    step = "calcium_xml"
    # One patient's broken file must not stop the cohort: record what failed.
    try:
        rois = read_calcium_xml(xml_path)
        step = "DICOM series"
        series = read_dicom_series(series_dirs[0])
        step = "scoring"
        labels, unplaced = label_volume(rois, series.volume)
        scan = score(series.volume, labels, settings, kvp=series.kvp)
        if labels_dir is not None:
            step = "label NIfTI"
            Path(labels_dir).mkdir(parents=True, exist_ok=True)
            save_nifti(
                labels,
                series.volume.spacing_mm,
                Path(labels_dir) / f"{coca_id}.nii.gz",
                z_positions_mm=series.volume.z_positions_mm,
            )
    except Exception as error:
        row["status_reason"] = f"{step} failed: {type(error).__name__}: {error}"
        return row
    row.update({f.name: getattr(scan, f.name) for f in _SCORE_FIELDS})
    row.update(
        status="ok",
        n_rois=len(rois),
        n_unmatched_rois=unplaced,
        n_unknown_rois=sum(1 for roi in rois if roi.vessel_label is None),
    )
    return row


def patient_ids(gated_root: str | Path) -> list[str]:
    """Every id with an XML export or a patient folder (a missing half is reported, not skipped)."""
    root = Path(gated_root)
    ids = {p.stem for p in (root / "calcium_xml").glob("*.xml")}
    if (root / "patient").is_dir():
        ids |= {p.name for p in (root / "patient").iterdir() if p.is_dir()}
    return sorted(ids)


def reference_table(
    gated_root: str | Path,
    settings: ScoringSettings = ScoringSettings(),
    labels_dir: str | Path | None = None,
) -> pa.Table:
    rows = [score_patient(gated_root, coca_id, settings, labels_dir) for coca_id in patient_ids(gated_root)]
    return pa.Table.from_pylist(rows, schema=reference_schema())
