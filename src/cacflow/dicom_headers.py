"""Read one DICOM file's header: only the tags cacflow needs, never patient identifiers.

Privacy by construction: ``pydicom.dcmread`` is given an allowlist (``specific_tags``)
of the tags below, so identifying tags (names, IDs, dates, institutions) are never
even parsed, and :class:`HeaderRecord` has no field that could hold them.

Reading is cheap: headers only (``stop_before_pixels``), one open per file. The file
is then checked for a complete pixel-data element, because interrupted archive
transfers leave files whose header reads fine but whose image is cut off.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# Top-level tags read from every file (the allowlist). Functional-group sequences of
# Enhanced CT are read whole but only the geometry/acquisition values below are kept.
_TOP_LEVEL_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "ImageType", "SeriesDescription", "ProtocolName", "Manufacturer",
    "ManufacturerModelName", "KVP", "SliceThickness", "SpacingBetweenSlices",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "RescaleSlope", "RescaleIntercept", "PixelRepresentation", "BitsAllocated",
    "ConvolutionKernel", "GantryDetectorTilt", "ContrastBolusAgent",
    "ContrastBolusRoute", "ContrastBolusAgentSequence", "CardiacSynchronizationTechnique",
    "TriggerTime", "NominalPercentageOfCardiacPhase", "HeartRate", "ScanOptions",
    "NumberOfFrames", "InstanceNumber", "AcquisitionNumber", "SeriesNumber",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel / Float / Double Float
_ITEM_TAG, _SEQ_DELIM_TAG = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF

# Reasons a file yields no record (machine-readable; see docs/qc.md).
REASON_NOT_DICOM = "not_dicom"
REASON_EMPTY = "empty_file"
REASON_TRUNCATED = "truncated"
REASON_PERMISSION = "permission_denied"
REASON_UNREADABLE = "unreadable"
REASON_PARSE_ERROR = "parse_error"
REASON_DICOMDIR = "dicomdir"
REASON_MISSING_UIDS = "missing_uids"


@dataclass(frozen=True)
class HeaderRecord:
    """The scoring-relevant header of one DICOM file, as plain Python values.

    Lengths in mm, angles in degrees, times in ms. ``None`` = tag absent or unparsable.
    For Enhanced (multi-frame) CT, values missing at the top level are taken from the
    shared functional groups, then from the first frame's.
    """

    path: str
    sop_class_uid: str | None
    sop_instance_uid: str
    study_uid: str | None
    series_uid: str
    modality: str | None
    image_type: tuple[str, ...]
    series_description: str | None
    protocol_name: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    kvp: float | None
    slice_thickness_mm: float | None
    spacing_between_slices_mm: float | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing_mm: tuple[float, float] | None  # (row spacing, column spacing)
    rows: int | None
    columns: int | None
    rescale_slope: float | None
    rescale_intercept: float | None
    pixel_representation: int | None
    bits_allocated: int | None
    convolution_kernel: str | None  # multi-valued (Siemens "I30f\3") joined with "\"
    gantry_tilt_deg: float | None
    contrast_agent: str | None
    contrast_route: str | None
    cardiac_sync_technique: str | None
    trigger_time_ms: float | None
    nominal_cardiac_phase_pct: float | None
    heart_rate_bpm: float | None
    scan_options: str | None  # multi-valued joined with "\"
    number_of_frames: int
    instance_number: int | None
    acquisition_number: int | None
    series_number: int | None
    transfer_syntax: str | None
    # Position of every frame, in frame order (Enhanced CT); empty for single-frame files.
    frame_positions: tuple[tuple[float, float, float], ...] = field(default=(), repr=False)
    # Header readable but the pixel data is cut short or missing: the image is unusable.
    pixel_data_truncated: bool = False

    @property
    def multiframe(self) -> bool:
        return self.number_of_frames > 1 or bool(self.frame_positions)

    @property
    def positions(self) -> tuple[tuple[float, float, float], ...]:
        """Positions of all slices this file holds (one per frame)."""
        if self.frame_positions:
            return self.frame_positions
        return (self.image_position,) if self.image_position is not None else ()


def read_header(path: str | os.PathLike) -> tuple[HeaderRecord | None, str | None]:
    """Read one file's header. Returns ``(record, None)`` or ``(None, reason)``; never raises.

    Reasons: ``not_dicom``, ``empty_file``, ``truncated``, ``permission_denied``,
    ``unreadable`` (other OS error), ``parse_error``, ``dicomdir``, ``missing_uids``.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fp:
            return _read_open_file(path, fp)
    except PermissionError:
        return None, REASON_PERMISSION
    except OSError:
        return None, REASON_UNREADABLE


def _read_open_file(path: str, fp) -> tuple[HeaderRecord | None, str | None]:
    head = fp.read(132)
    if not head:
        return None, REASON_EMPTY
    has_preamble = head[128:132] == b"DICM"
    # Preamble-less files (old exports) are parsed only when they start like a
    # dataset (group 0x0002 or 0x0008), so text files and thumbnails are rejected cheaply.
    if not has_preamble and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None, REASON_TRUNCATED if len(head) < 132 and not any(head) else REASON_NOT_DICOM
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd-but-readable files are the norm in archives
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble,
                                 specific_tags=list(_TOP_LEVEL_TAGS))
            if _transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
                pixel_status = _deflated_pixel_data_status(fp, ds)
            else:
                pixel_status = _pixel_data_status(fp, ds)
            return _record_from_dataset(path, ds, pixel_status)
    except InvalidDicomError:
        return None, REASON_NOT_DICOM
    except (EOFError, struct.error, OSError, zlib.error):  # zlib: a deflated dataset cut short
        return None, REASON_TRUNCATED
    except Exception:  # malformed values in the wild: report, never crash a cohort run
        return None, REASON_PARSE_ERROR


def _pixel_data_status(fp, ds) -> str:
    """'ok', 'missing' (no pixel element before end of file) or 'truncated'.

    ``dcmread(stop_before_pixels=True)`` leaves the file positioned at the pixel-data
    tag, so its declared length can be checked against the file size without reading it.
    """
    offset = fp.tell()
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    fp.seek(offset)
    header = fp.read(12)
    if len(header) < 8:
        return "missing"
    implicit_vr, little_endian = ds.original_encoding
    fmt = "<" if little_endian in (None, True) else ">"
    group, element = struct.unpack(fmt + "HH", header[:4])
    if (group << 16 | element) not in _PIXEL_DATA_TAGS:
        return "missing"
    if implicit_vr:
        length, value_start = struct.unpack(fmt + "L", header[4:8])[0], offset + 8
    else:
        if len(header) < 12:
            return "truncated"
        length, value_start = struct.unpack(fmt + "L", header[8:12])[0], offset + 12
    if length != _UNDEFINED_LENGTH:
        return "ok" if value_start + length <= size else "truncated"
    return _encapsulated_status(fp, value_start, size, fmt)


def _deflated_pixel_data_status(fp, ds) -> str:
    """``_pixel_data_status`` for Deflated Explicit VR Little Endian files.

    pydicom inflates the whole dataset into memory, so the file position says
    nothing about the pixel data: inflate it here (the dataset starts after the
    file meta group, whose length the group-length element gives) and check the
    pixel-data element in the inflated bytes.
    """
    group_length = _int(ds.file_meta.get("FileMetaInformationGroupLength"))
    if group_length is None:
        return "ok"  # cannot locate the dataset; dcmread already inflated it whole
    fp.seek(132 + 12 + group_length)  # preamble + "DICM", the group-length element, the group
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(fp.read())
    if not inflater.eof:
        return "truncated"
    buffer = io.BytesIO(inflated)
    read_dataset(buffer, is_implicit_VR=False, is_little_endian=True,
                 stop_when=lambda tag, vr, length: int(tag) in _PIXEL_DATA_TAGS)
    return _pixel_data_status(buffer, ds)


def _encapsulated_status(fp, position: int, size: int, fmt: str) -> str:
    # Compressed pixel data: a run of items closed by a sequence delimiter; walk the
    # 8-byte item headers (one per fragment) without reading the fragments.
    while position + 8 <= size:
        fp.seek(position)
        group, element, length = struct.unpack(fmt + "HHL", fp.read(8))
        tag = group << 16 | element
        if tag == _SEQ_DELIM_TAG:
            return "ok"
        if tag != _ITEM_TAG:
            return "truncated"
        position += 8 + length
    return "truncated"


def _record_from_dataset(path: str, ds, pixel_status: str) -> tuple[HeaderRecord | None, str | None]:
    meta = getattr(ds, "file_meta", None)
    media_class = _str(meta.get("MediaStorageSOPClassUID")) if meta is not None else None
    series_uid = _str(ds.get("SeriesInstanceUID"))
    sop_uid = _str(ds.get("SOPInstanceUID"))
    if media_class == DICOMDIR_SOP_CLASS:
        return None, REASON_DICOMDIR
    if series_uid is None or sop_uid is None:
        # A header cut before its UIDs reads as an (almost) empty dataset.
        return None, REASON_TRUNCATED if pixel_status == "missing" and len(ds) < 3 else REASON_MISSING_UIDS
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    first_frame = per_frame[0] if per_frame else None

    def grouped(sequence: str, keyword: str):
        """Value from a functional-group macro: shared groups first, then frame 1."""
        for group in (shared, first_frame):
            value = _value(_first_item(group, sequence), keyword)
            if value not in (None, ""):
                return value
        return None

    def top_or_grouped(keyword: str, sequence: str):
        value = ds.get(keyword)
        return value if value not in (None, "") else grouped(sequence, keyword)

    frame_positions = tuple(
        position
        for position in (_floats(_value(_first_item(item, "PlanePositionSequence"), "ImagePositionPatient"), 3)
                         for item in per_frame)
        if position is not None
    )
    if not frame_positions and per_frame:
        shared_position = _floats(grouped("PlanePositionSequence", "ImagePositionPatient"), 3)
        frame_positions = (shared_position,) if shared_position else ()
    image_type = tuple(s.strip().upper() for s in _strings(ds.get("ImageType")))
    is_image = _int(ds.get("Rows")) is not None or bool(per_frame)

    record = HeaderRecord(
        path=path,
        sop_class_uid=_str(ds.get("SOPClassUID")) or media_class,
        sop_instance_uid=sop_uid,
        study_uid=_str(ds.get("StudyInstanceUID")),
        series_uid=series_uid,
        modality=_upper(ds.get("Modality")),
        image_type=image_type,
        series_description=_str(ds.get("SeriesDescription")),
        protocol_name=_str(ds.get("ProtocolName")),
        manufacturer=_str(ds.get("Manufacturer")),
        manufacturer_model=_str(ds.get("ManufacturerModelName")),
        kvp=_float(top_or_grouped("KVP", "CTXRayDetailsSequence")),
        slice_thickness_mm=_float(top_or_grouped("SliceThickness", "PixelMeasuresSequence")),
        spacing_between_slices_mm=_float(top_or_grouped("SpacingBetweenSlices", "PixelMeasuresSequence")),
        image_position=_floats(_value(ds, "ImagePositionPatient"), 3),
        image_orientation=_floats(top_or_grouped("ImageOrientationPatient", "PlaneOrientationSequence"), 6),
        pixel_spacing_mm=_floats(top_or_grouped("PixelSpacing", "PixelMeasuresSequence"), 2),
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        rescale_slope=_float(top_or_grouped("RescaleSlope", "PixelValueTransformationSequence")),
        rescale_intercept=_float(top_or_grouped("RescaleIntercept", "PixelValueTransformationSequence")),
        pixel_representation=_int(ds.get("PixelRepresentation")),
        bits_allocated=_int(ds.get("BitsAllocated")),
        convolution_kernel=_joined(top_or_grouped("ConvolutionKernel", "CTReconstructionSequence")),
        gantry_tilt_deg=_float(top_or_grouped("GantryDetectorTilt", "CTAcquisitionDetailsSequence")),
        contrast_agent=_contrast_agent(ds, grouped),
        contrast_route=_contrast_route(ds),
        cardiac_sync_technique=_upper(ds.get("CardiacSynchronizationTechnique")),
        trigger_time_ms=_float(ds.get("TriggerTime"))
        if _float(ds.get("TriggerTime")) is not None
        else _float(grouped("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")),
        nominal_cardiac_phase_pct=_float(top_or_grouped("NominalPercentageOfCardiacPhase",
                                                        "CardiacSynchronizationSequence")),
        heart_rate_bpm=_float(ds.get("HeartRate")),
        scan_options=_joined(ds.get("ScanOptions")),
        number_of_frames=_int(ds.get("NumberOfFrames")) or 1,
        instance_number=_int(ds.get("InstanceNumber")),
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        series_number=_int(ds.get("SeriesNumber")),
        transfer_syntax=_transfer_syntax(ds),
        frame_positions=frame_positions,
        pixel_data_truncated=is_image and pixel_status != "ok",
    )
    return record, None


def _transfer_syntax(ds) -> str | None:
    meta = getattr(ds, "file_meta", None)
    declared = _str(meta.get("TransferSyntaxUID")) if meta is not None else None
    if declared:
        return declared
    # Preamble-less files have no file meta: name the encoding pydicom found.
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None:
        return None
    if implicit_vr:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian)


def _contrast_agent(ds, grouped) -> str | None:
    agent = _str(ds.get("ContrastBolusAgent"))
    if agent:
        return agent
    # Enhanced CT codes the agent in a sequence and flags use per frame.
    coded = _str(_value(_first_item(ds, "ContrastBolusAgentSequence"), "CodeMeaning"))
    if coded:
        return coded
    if _str(grouped("ContrastBolusUsageSequence", "ContrastBolusAgentAdministered")) == "YES":
        return "administered"
    return None


def _contrast_route(ds) -> str | None:
    route = _str(ds.get("ContrastBolusRoute"))
    if route:
        return route
    coded = _first_item(_first_item(ds, "ContrastBolusAgentSequence"), "ContrastBolusAdministrationRouteSequence")
    return _str(_value(coded, "CodeMeaning"))


# --- value conversion: tolerant of malformed values, always plain Python types ---

def _first_item(ds, keyword: str):
    sequence = _value(ds, keyword)
    try:
        return sequence[0] if sequence else None
    except (TypeError, IndexError, KeyError):
        return None


def _value(ds, keyword: str):
    return ds.get(keyword) if ds is not None else None


def _str(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _upper(value) -> str | None:
    text = _str(value)
    return text.upper() if text else None


def _strings(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _joined(value) -> str | None:
    parts = [s.strip() for s in _strings(value) if s.strip()]
    return "\\".join(parts) if parts else None


def _float(value) -> float | None:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _int(value) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _floats(value, n: int) -> tuple[float, ...] | None:
    values = _strings(value)
    if len(values) != n:
        return None
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None
