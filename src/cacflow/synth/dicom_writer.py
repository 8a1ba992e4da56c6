"""Write phantoms as real DICOM CT series, the way an archive export holds them.

CT Image Storage, Explicit VR Little Endian, one file per slice, with the geometry,
acquisition, gating and contrast tags that series selection and QC read, vendor
flavours (Siemens, GE, Philips, Canon) and patient/study identifiers passed in by the
caller, so a de-identification leak test can plant distinctive values.

UIDs are deterministic (``uid(*parts)``), so the same cohort seed writes the same files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID, generate_uid

from cacflow.synth.phantom import HU_MAX, HU_MIN, Phantom

RESCALE_INTERCEPT = -1024.0
SERIES_KINDS = ("calcium_score", "thin", "low_kvp", "cta", "chest", "localizer")

# Realistic stand-ins, overridden by the caller's tags (planted identifiers).
DEFAULT_IDENTIFIERS = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN4471203",
    "PatientBirthDate": "19580214",
    "PatientSex": "F",
    "PatientAge": "061Y",
    "AccessionNumber": "A20190412001",
    "StudyID": "4471",
    "StudyDate": "20190412",
    "StudyTime": "093012",
    "StudyDescription": "CT HEART CALCIUM SCORE",
    "InstitutionName": "Springfield General Hospital",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "ReferringPhysicianName": "SMITH^JOHN",
    "OperatorsName": "TECH^ALEX",
    "StationName": "CTAWP71234",
    "DeviceSerialNumber": "71234",
}


@dataclass(frozen=True)
class _Vendor:
    manufacturer: str
    model: str
    software: str
    signed: bool  # int16 storage (PixelRepresentation 1) rather than 12-bit unsigned
    kernels: dict  # series kind -> ConvolutionKernel (str or list: multi-valued)
    descriptions: dict  # series kind -> SeriesDescription pattern ({t}: thickness)
    gated_scan_options: list | None  # where the vendor also records gating
    spacing_between_slices: bool  # whether it writes (0018,0088)


VENDORS = {
    "siemens": _Vendor(
        "SIEMENS", "SOMATOM Force", "syngo CT VA50A", False,
        {"calcium_score": ["Qr36d", "3"], "thin": ["Qr36d", "3"], "low_kvp": ["Qr36d", "3"], "cta": ["Bv40d", "3"],
         "chest": ["Br40d", "3"], "localizer": "T20s"},
        {"calcium_score": "CaSc {t} Qr36 70%", "thin": "CaSc {t} Qr36 70%", "low_kvp": "CaSc {t} Qr36 100kV",
         "cta": "CorCTA {t} Bv40 75%", "chest": "Thorax {t} Br40", "localizer": "Topogram 0.6 T20s"},
        ["TP70PC", "OSCRATEAVG062BPM"], False,
    ),
    "ge": _Vendor(
        "GE MEDICAL SYSTEMS", "Revolution CT", "revo_ct_22.1", True,
        {"calcium_score": "STANDARD", "thin": "STANDARD", "low_kvp": "STANDARD", "cta": "STANDARD", "chest": "LUNG",
         "localizer": "STANDARD"},
        {"calcium_score": "SmartScore - Gated {t}mm", "thin": "SmartScore - Gated {t}mm", "low_kvp": "SmartScore 100kV {t}mm",
         "cta": "Cardiac CTA {t}mm 75%", "chest": "CHEST {t}mm", "localizer": "Scout"},
        ["CARDIAC GATING"], True,
    ),
    "philips": _Vendor(
        "Philips", "iCT 256", "4.1.6", False,
        {"calcium_score": "B", "thin": "B", "low_kvp": "B", "cta": "XCB", "chest": "YA", "localizer": "B"},
        {"calcium_score": "CaScoring {t}mm", "thin": "CaScoring {t}mm", "low_kvp": "CaScoring 100kV {t}mm",
         "cta": "Cardiac {t}mm 75%", "chest": "Chest {t}mm", "localizer": "Survey"},
        None, True,
    ),
    "canon": _Vendor(
        "CANON_MEC", "Aquilion ONE", "V10.6", True,
        {"calcium_score": "FC12", "thin": "FC12", "low_kvp": "FC12", "cta": "FC43", "chest": "FC08", "localizer": "FC10"},
        {"calcium_score": "CaScore {t} FC12", "thin": "CaScore {t} FC12", "low_kvp": "CaScore 100kV {t}",
         "cta": "CTA Heart {t} 75%", "chest": "CHEST {t} FC08", "localizer": "Scanogram"},
        None, False,
    ),
}


@dataclass
class SliceStack:
    """Pixels and geometry of a series, whatever produced it."""

    hu: np.ndarray  # [n, rows, cols]
    positions_mm: np.ndarray  # [n, 3] patient (LPS) position of the centre of pixel [0, 0]
    orientation: tuple[float, float, float, float, float, float]  # row then column direction cosines
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    slice_thickness_mm: float
    spacing_between_slices_mm: float | None = None


def stack_from_phantom(phantom: Phantom) -> SliceStack:
    """Axial slices: row direction +x (patient left), column direction +y (posterior)."""
    x0, y0 = phantom.origin_xy_mm
    z = np.asarray(phantom.z_positions_mm, dtype=np.float64)
    positions = np.stack([np.full_like(z, x0), np.full_like(z, y0), z], axis=1)
    return SliceStack(
        phantom.hu, positions, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (phantom.spacing_mm[1], phantom.spacing_mm[2]),
        phantom.slice_thickness_mm, phantom.spacing_mm[0],
    )


def localizer_from_phantom(phantom: Phantom, view: str = "frontal") -> SliceStack:
    """A projection radiograph (topogram/scout) of the phantom, superior at the top.

    frontal: averaged front to back, columns run to patient left;
    lateral: averaged right to left, columns run to posterior.
    """
    axis, row_dir = {"frontal": (1, (1.0, 0.0, 0.0)), "lateral": (2, (0.0, 1.0, 0.0))}[view]
    image = phantom.hu.mean(axis=axis)[::-1]  # [z from superior, columns]
    x0, y0 = phantom.origin_xy_mm
    z_top = float(phantom.z_positions_mm[-1])
    if view == "frontal":
        corner = (x0, y0 + phantom.spacing_mm[1] * (phantom.hu.shape[1] - 1) / 2, z_top)
    else:
        corner = (x0 + phantom.spacing_mm[2] * (phantom.hu.shape[2] - 1) / 2, y0, z_top)
    return SliceStack(
        image[None].astype(np.float32), np.array([corner]), (*row_dir, 0.0, 0.0, -1.0),
        (phantom.spacing_mm[0], phantom.spacing_mm[1]), 1.0, None,
    )


def uid(*parts) -> UID:
    """Deterministic UID from the given parts (the same parts give the same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _time(seconds: float) -> str:
    seconds = int(seconds) % 86400
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _file_name(naming: str, series_number: int, instance: int, sop_uid: str) -> str:
    if naming == "IM":
        return f"IM-{series_number:04d}-{instance:04d}.dcm"
    if naming == "uid":
        return f"{sop_uid}.dcm"
    if naming == "bare":  # archive exports with opaque names and no extension
        return hashlib.sha1(sop_uid.encode()).hexdigest()[:12].upper()
    raise ValueError(f"unknown naming {naming!r}: use 'IM', 'uid' or 'bare'")


def _base_dataset(
    stack: SliceStack, kind: str, vendor: _Vendor, uids: Mapping[str, str], series_number: int, acquisition: Mapping
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    is_localizer = kind == "localizer"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if is_localizer else "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = vendor.manufacturer
    ds.ManufacturerModelName = vendor.model
    ds.SoftwareVersions = vendor.software
    for keyword, value in DEFAULT_IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids.get("frame_of_reference") or uid(uids["study"], "frame")
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    thickness = stack.slice_thickness_mm
    ds.SeriesDescription = vendor.descriptions[kind].format(t=f"{thickness:.1f}" if round(thickness, 1) == thickness else f"{thickness:.2f}")
    ds.ProtocolName = {"chest": "Chest routine", "localizer": "Cardiac", "cta": "Coronary CTA"}.get(kind, "Calcium Score")
    ds.BodyPartExamined = "CHEST" if kind == "chest" else "HEART"
    ds.PatientPosition = "HFS" if kind == "chest" else "FFS"
    ds.ConvolutionKernel = vendor.kernels[kind]
    ds.KVP = acquisition.get("kvp", 120)
    ds.XRayTubeCurrent = acquisition.get("tube_current_ma", 30 if is_localizer else 180)
    ds.ExposureTime = 250 if kind in ("calcium_score", "thin", "low_kvp", "cta") else 500
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 145.5
    ds.SliceThickness = round(thickness, 4)
    if stack.spacing_between_slices_mm is not None and vendor.spacing_between_slices and not is_localizer:
        ds.SpacingBetweenSlices = round(stack.spacing_between_slices_mm, 4)
    if not is_localizer:
        ds.ReconstructionDiameter = round(stack.hu.shape[2] * stack.pixel_spacing_mm[1], 2)
    if acquisition.get("gated") and not acquisition.get("blank_gating"):
        heart_rate = int(acquisition.get("heart_rate", 62))
        phase = 75.0 if kind == "cta" else 70.0
        ds.CardiacSynchronizationTechnique = "PROSPECTIVE"
        ds.HeartRate = heart_rate
        ds.NominalPercentageOfCardiacPhase = phase
        ds.TriggerTime = round(60000.0 / heart_rate * phase / 100, 1)
        if vendor.gated_scan_options:
            ds.ScanOptions = vendor.gated_scan_options
    elif kind == "chest":
        ds.ScanOptions = "HELICAL MODE"
    if acquisition.get("contrast"):
        ds.ContrastBolusAgent = "IOPAMIDOL 370"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = 70
    ds.ImageOrientationPatient = [float(v) for v in stack.orientation]
    ds.PixelSpacing = [round(float(v), 6) for v in stack.pixel_spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stack.hu.shape[1]), int(stack.hu.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if vendor.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if vendor.signed else 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = (40, 400) if kind != "calcium_score" else (50, 350)
    return ds


def write_series(
    source: Phantom | SliceStack,
    out_dir: str | Path,
    *,
    series_kind: str,
    uids: Mapping[str, str],
    tags: Mapping[str, object] | None = None,
    vendor: str = "siemens",
    series_number: int = 1,
    acquisition: Mapping[str, object] | None = None,
    naming: str = "IM",
    superior_first: bool = True,
) -> list[Path]:
    """Write one series, one file per slice; return the paths written.

    uids: 'study', 'series' and optionally 'frame_of_reference'; SOP Instance UIDs
    derive from the series UID. tags: DICOM keyword -> value, applied last (planted
    identifiers, dates, or blanking). acquisition: kvp, gated, blank_gating (gated but
    ECG tags left out, as in many de-identified exports), contrast, heart_rate; taken
    from the phantom's metadata when omitted. superior_first: InstanceNumber 1 is
    the most superior slice, as most scanners number a cranio-caudal scan.
    """
    if series_kind not in SERIES_KINDS:
        raise ValueError(f"series_kind must be one of {SERIES_KINDS}, got {series_kind!r}")
    if isinstance(source, Phantom):
        stack = stack_from_phantom(source)
        acquisition = {**{k: source.metadata[k] for k in ("kvp", "gated", "contrast")}, **(acquisition or {})}
    else:
        stack, acquisition = source, dict(acquisition or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(stack, series_kind, VENDORS[vendor], uids, series_number, acquisition)
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    for keyword in ("SeriesDate", "AcquisitionDate", "ContentDate"):
        if keyword not in (tags or {}):
            setattr(ds, keyword, ds.StudyDate)
    start = int(ds.StudyTime[:2]) * 3600 + int(ds.StudyTime[2:4]) * 60 + int(ds.StudyTime[4:6]) + 60 * series_number
    ds.SeriesTime = _time(start)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta

    stored = np.rint(np.clip(stack.hu, HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype(np.int16 if ds.PixelRepresentation else np.uint16)
    n = stack.hu.shape[0]
    paths = []
    for index in range(n):  # index 0 is the most inferior (or the only) slice
        instance = n - index if superior_first else index + 1
        sop_uid = uid(uids["series"], instance)
        ds.SOPInstanceUID = sop_uid
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = instance
        position = [round(float(v), 4) for v in stack.positions_mm[index]]
        ds.ImagePositionPatient = position
        if series_kind != "localizer":
            ds.SliceLocation = position[2]
        ds.AcquisitionTime = ds.ContentTime = _time(start + 2 + 0.3 * instance)
        ds.add_new(0x7FE00010, "OW", stored[index].tobytes())
        path = out_dir / _file_name(naming, series_number, instance, sop_uid)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
