"""Write small but real CT DICOM series with pydicom, for discovery/QC/selection tests.

Every file carries patient identifiers (``IDENTIFIERS``) so tests can prove that
none of them leaks into cacflow's records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET-PID-4711",
    "PatientBirthDate": "19510203",
    "AccessionNumber": "ACC-93817",
    "InstitutionName": "St Example Hospital",
    "InstitutionAddress": "1 Example Road",
    "ReferringPhysicianName": "Who^Doctor",
    "OperatorsName": "Tech^Operator",
    "StudyDate": "20190417",
    "StudyTime": "101530",
}

# Series description / tag presets.
GATED_CASC = {
    "SeriesDescription": "CaSc 3.0 B35f",
    "ProtocolName": "CaScoring",
    "CardiacSynchronizationTechnique": "PROSPECTIVE",
    "NominalPercentageOfCardiacPhase": 70,
}
CHEST = {"SeriesDescription": "Thorax 5.0 B31f", "ProtocolName": "Routine Chest"}


def write_series(
    folder: Path,
    *,
    n_slices: int = 40,
    thickness: float | None = 3.0,
    increment: float | None = None,
    positions: list[float] | None = None,
    orientation: tuple[float, ...] = AXIAL,
    kvp: float | None = 120,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 1,
    series_uid: str | None = None,
    study_uid: str | None = None,
    tags: dict | None = None,
    drop: tuple[str, ...] = (),
    name: str = "IM{:04d}",
) -> list[Path]:
    """Write one series, one file per slice; return the paths in slice order.

    Slices step ``increment`` (default: thickness) along the slice normal, or sit at
    the given ``positions`` (mm along the normal). ``tags`` are set on every file,
    ``drop`` removes tags (e.g. RescaleSlope).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    step = increment if increment is not None else (thickness or 3.0)
    if positions is None:
        positions = [-60.0 + i * step for i in range(n_slices)]
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    paths = []
    for index, along in enumerate(positions):
        origin = np.array([-4.0, -4.0, 0.0]) + along * normal
        ds = make_slice(
            series_uid=series_uid, study_uid=study_uid, instance=index + 1, position=tuple(origin),
            orientation=orientation, thickness=thickness, kvp=kvp, image_type=image_type,
            series_number=series_number, tags=tags, drop=drop,
        )
        path = folder / name.format(index + 1)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_slice(
    *,
    series_uid: str,
    study_uid: str,
    instance: int,
    position: tuple[float, float, float],
    orientation: tuple[float, ...] = AXIAL,
    thickness: float | None = 3.0,
    kvp: float | None = 120,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 1,
    tags: dict | None = None,
    drop: tuple[str, ...] = (),
) -> FileDataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "SOMATOM Force"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = 1
    if kvp is not None:
        ds.KVP = kvp
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.ImagePositionPatient = [round(v, 4) for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [12.5, 12.5]  # a 200 mm field of view on the 16 x 16 test matrix
    ds.ConvolutionKernel = ["Sa36f", "3"]
    ds.GantryDetectorTilt = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.full((16, 16), 1024, dtype=np.int16).tobytes()
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def truncate(path: Path, keep_bytes: int) -> None:
    """Cut a file short, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
