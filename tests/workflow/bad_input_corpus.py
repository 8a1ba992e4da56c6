"""A corpus of bad (and awkward but valid) inputs for the whole workflow.

``build_corpus(root)`` writes one visit folder per kind under ``root/dicom`` and a
``root/manifest.tsv`` (participant ids ``BADnn_<kind>``, visit ``baseline``), and
returns the table of expectations: the ``scans.status`` each visit must end in, the
text its ``status_reason`` must hold, and the QC codes its series must carry.

Three sources of DICOM files are used side by side:

- generated phantoms (``cacflow.synth``: ``generate_phantom`` + ``write_series``),
  small (128 x 128, 1.5 mm pixels) but real CT series with known calcium, edited or
  re-encoded per kind (truncation, gaps, tilt, J2K / JPEG Lossless / RLE ...);
- the real files pydicom-data ships (JPEG 2000 and JPEG Lossless CT, Enhanced CT,
  MR, secondary capture, RT plan, DICOMDIR);
- the real QRM phantom scan in ``../shared/data/qrm-phantom-canon`` (read in place,
  read-only; the kind is left out when the folder is absent).

Nothing here runs the workflow; see ``test_bad_input.py``.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from cacflow.synth.dicom_writer import SliceStack, localizer_from_phantom, stack_from_phantom, uid, write_series
from cacflow.synth.phantom import PhantomSettings, generate_phantom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, also when run as a script
from shared_data import PHANTOM_DIR, REPO_ROOT  # noqa: E402

QRM_PHANTOM_DIR = PHANTOM_DIR
VISIT = "baseline"
SCORED, NOT_SCORABLE, FAILED = "scored", "not_scorable", "failed"

# Small but realistic: a 192 mm cardiac field of view, 3 mm slices over the heart.
SMALL = dict(rows=128, cols=128, pixel_spacing_mm=1.5)
REFERENCE_SEED = 11
REFERENCE_TARGET = 150.0  # Agatston the reference patient's lesions aim at
REFERENCE = "BAD01_reference"


@dataclass
class Kind:
    """One kind of input and what the workflow must make of it."""

    participant_id: str
    what: str  # one line: what the folder holds
    status: str  # expected scans.status
    # Substrings that must all appear in scans.status_reason ("" entries are ignored);
    # None: the reason must be null (scored without any flag).
    reason: tuple[str, ...] | None = ()
    # QC codes that must appear in the qc_reasons of at least one series of the visit
    # (of the chosen series, for a scored visit).
    series_codes: tuple[str, ...] = ()
    n_series: int | None = None  # expected rows in series.parquet for the visit
    same_score_as: str | None = None  # a scored visit whose Agatston total this one must equal ...
    score_rel_tol: float = 1e-6  # ... within this relative tolerance
    chosen_description: str | None = None  # substring of the chosen series' description
    # Reason substrings the run *should* give but that need a pipeline.py change
    # (tested separately, as xfail(strict=True) until the change lands).
    pending_reason: tuple[str, ...] = ()
    log_text: tuple[str, ...] = ()  # substrings expected in one line of the run's logs that names the visit
    needs_unprivileged: bool = False  # permission bits only bite without root's override
    # Why the status/codes expectations cannot hold yet (a fix outside the files this
    # corpus may change); those tests are xfail(strict=True) until it lands.
    pending_fix: str | None = None
    dicom_dir: str = ""  # set by build_corpus
    extra_manifest_rows: list[str] = field(default_factory=list)  # dicom_dir of repeated rows

    @property
    def name(self) -> str:
        return self.participant_id.split("_", 1)[1]


# --- phantoms and writers --------------------------------------------------------------

@lru_cache(maxsize=None)
def _phantom(seed: int = REFERENCE_SEED, **overrides):
    settings = dict(SMALL, target_agatston=REFERENCE_TARGET)
    settings.update(overrides)
    if "n_coronary_lesions" in overrides:
        settings.pop("target_agatston")
    return generate_phantom(seed, PhantomSettings(**settings))


def _uids(pid: str, name: str = "series") -> dict:
    return {"study": uid(pid, "study"), "series": uid(pid, name)}


def _write(source, folder: Path, pid: str, *, kind: str = "calcium_score", name: str = "series",
           number: int = 2, **kwargs) -> list[Path]:
    return write_series(source, folder, series_kind=kind, uids=_uids(pid, name), series_number=number, **kwargs)


def _gated(folder: Path, pid: str, **kwargs) -> list[Path]:
    """The reference patient's gated 3 mm, 120 kVp calcium-score series (Siemens)."""
    return _write(_phantom(), folder, pid, **kwargs)


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _new_instance_uids(paths: list[Path], pid: str, salt: str) -> None:
    """Give files their own SOPInstanceUIDs (so they are not exact copies of others)."""
    for path in paths:
        def renew(ds, name=path.name):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(pid, salt, name)

        _edit(path, renew)


def _by_position(paths: list[Path]) -> list[Path]:
    """Files in slice order, inferior to superior."""
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _pixel_offset(path: Path) -> int:
    """Byte offset of the pixel-data element's value."""
    data = path.read_bytes()
    return data.rindex(b"\xe0\x7f\x10\x00") + 12  # explicit VR OW: tag, VR, 2 reserved, length


def _real(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom-data has no {name}")
    return Path(path)


def _dicom_factory():
    """tests/unit/dicom_factory.py (the unit tests' DICOM writer), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dicom_factory", REPO_ROOT / "tests" / "unit" / "dicom_factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_real(names: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(_real(name), folder / name)


# --- re-encoding --------------------------------------------------------------------------

def _recompress(paths: list[Path], syntax) -> None:
    """Re-encode files in place with pydicom's encoders (RLE natively, J2K via openjpeg)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        original = ds.pixel_array.copy()
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        check = pydicom.dcmread(path)
        if not np.array_equal(check.pixel_array, original):  # lossless must round-trip
            raise AssertionError(f"{syntax.name} of {path} does not round-trip")


def jpeg_lossless_encode(image: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless (ITU T.81 process 14, selection value 1) codestream of one
    unsigned greyscale frame: pydicom has no encoder for it, so it is written here
    (predictor 1, one Huffman table with 5-bit codes for the 17 difference categories)."""
    image = np.asarray(image).astype(np.int64)
    rows, cols = image.shape
    predicted = np.empty_like(image)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = image[0, :-1]
    predicted[1:, 0] = image[:-1, 0]
    predicted[1:, 1:] = image[1:, :-1]
    diff = (image - predicted) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()
    magnitude = np.abs(diff)
    category = np.zeros(diff.shape, np.int64)
    nonzero = magnitude > 0
    category[nonzero] = np.floor(np.log2(magnitude[nonzero])).astype(np.int64) + 1
    category[diff == -32768] = 16  # category 16 carries no extra bits
    extra = np.where(diff >= 0, diff, diff - 1) & ((1 << category) - 1)
    extra[category == 16] = 0
    extra_bits = np.where(category == 16, 0, category)
    lengths = 5 + extra_bits
    values = (category << extra_bits) | extra  # Huffman code of category k is k on 5 bits
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    bits = np.ones(((total + 7) // 8) * 8, np.uint8)  # padding bits are 1s
    for bit in range(int(lengths.max())):
        use = lengths > bit
        bits[starts[use] + bit] = (values[use] >> (lengths[use] - 1 - bit)) & 1
    scan = np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00")

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    sof3 = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # 1 component, table 0, Ss=1 (predictor), Se=0, Ah/Al=0
    return b"\xff\xd8" + segment(0xFFC3, sof3) + segment(0xFFC4, dht) + segment(0xFFDA, sos) + scan + b"\xff\xd9"


def _jpeg_lossless(paths: list[Path]) -> None:
    from pydicom.encaps import encapsulate

    for path in paths:
        ds = pydicom.dcmread(path)
        original = ds.pixel_array.copy()
        if ds.PixelRepresentation != 0:
            raise ValueError("the JPEG Lossless writer here takes unsigned pixel data")
        frame = jpeg_lossless_encode(original, int(ds.BitsStored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(path, enforce_file_format=True)
        check = pydicom.dcmread(path)
        if not np.array_equal(check.pixel_array, original):
            raise AssertionError(f"JPEG Lossless of {path} does not round-trip")


# --- the kinds ---------------------------------------------------------------------------
# Each builder gets the visit folder (not yet created) and the participant id, and
# writes what the folder should hold. It may return another dicom_dir for the manifest.

def b_reference(folder, pid):
    _gated(folder, pid)


def b_truncated(folder, pid):
    paths = _by_position(_gated(folder / "series", pid))
    # An interrupted copy: one more (superior) slice whose image data is cut short ...
    extra = folder / "series" / "IM-0002-0999.dcm"
    shutil.copyfile(paths[-1], extra)

    def above(ds):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(pid, "extra slice")
        ds.InstanceNumber = 999
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 3.0
        ds.SliceLocation = float(ds.ImagePositionPatient[2])

    _edit(extra, above)
    _truncate(extra, _pixel_offset(extra) + 1000)
    # ... and a stray file cut inside its header.
    shutil.copyfile(paths[0], folder / "IM-0002-1000.dcm")
    _truncate(folder / "IM-0002-1000.dcm", 300)


def b_all_truncated_headers(folder, pid):
    for path in _gated(folder, pid):
        _truncate(path, 300)


def b_all_truncated_pixels(folder, pid):
    for path in _gated(folder, pid):
        _truncate(path, _pixel_offset(path) + 2000)


def b_zero_byte_files(folder, pid):
    for path in _gated(folder, pid):
        path.write_bytes(b"")


def b_non_dicom(folder, pid):
    folder.mkdir(parents=True)
    (folder / "README.txt").write_text("Export of study 4471. Images follow.\n" * 20)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(2000))
    (folder / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    (folder / "index.json").write_text('{"series": []}')
    (folder / "report.pdf").write_bytes(b"%PDF-1.4\n" + bytes(300))
    (folder / "tiny").write_bytes(b"\x08\x00")  # starts like a dataset, then ends


def b_empty_folder(folder, pid):
    folder.mkdir(parents=True)


def b_several_series(folder, pid):
    """A full cardiac exam: scout, gated 3 mm, gated 1 mm thin, CTA, non-gated chest, 100 kVp."""
    phantom = _phantom()
    write_series(localizer_from_phantom(_phantom(**dict(n_slices=60, slice_increment_mm=3.0))), folder / "001",
                 series_kind="localizer", uids=_uids(pid, "scout"), series_number=1, acquisition={"kvp": 120})
    _write(phantom, folder / "002", pid, name="casc", number=2)
    _write(_phantom(slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=60), folder / "003", pid, kind="thin",
           name="thin", number=3)
    _write(_phantom(contrast=True, slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=60), folder / "004",
           pid, kind="cta", name="cta", number=4)
    _write(_phantom(gated=False, fov_centre="body", slice_thickness_mm=5.0, slice_increment_mm=5.0, n_slices=30),
           folder / "005", pid, kind="chest", name="chest", number=5)
    _write(_phantom(kvp=100), folder / "006", pid, kind="low_kvp", name="kvp100", number=6)


def b_missing_slice(folder, pid):
    paths = _by_position(_gated(folder, pid))
    paths[len(paths) // 2].unlink()


def b_duplicate_instance(folder, pid):
    paths = _gated(folder / "export1", pid)
    (folder / "export2").mkdir(parents=True)
    for path in paths[:5]:  # the same instances exported twice
        shutil.copyfile(path, folder / "export2" / path.name)


def b_duplicate_position(folder, pid):
    """Two cardiac phases (70 % and 40 %) under one series UID: new UIDs, same positions."""
    paths = _gated(folder, pid)
    for path in paths[10:20]:
        copy = path.with_name(path.stem + "_40pc.dcm")
        shutil.copyfile(path, copy)

        def phase40(ds, name=path.name):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(pid, "40%", name)
            ds.NominalPercentageOfCardiacPhase = 40
            ds.InstanceNumber = int(ds.InstanceNumber) + 500

        _edit(copy, phase40)


def b_mixed_orientation(folder, pid):
    """A sagittal reformat stored under the axial series' UID."""
    _gated(folder / "axial", pid)
    phantom = _phantom()
    hu = phantom.hu[::-1, :, ::16].transpose(2, 0, 1)  # [x, z from superior, y]
    x0, y0 = phantom.origin_xy_mm
    xs = x0 + 1.5 * 16 * np.arange(hu.shape[0])
    positions = np.stack([xs, np.full_like(xs, y0), np.full_like(xs, phantom.z_positions_mm[-1])], axis=1)
    stack = SliceStack(hu, positions, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (3.0, 1.5), 3.0)
    paths = write_series(stack, folder / "sag", series_kind="calcium_score", uids=_uids(pid, "series"),
                         series_number=2, acquisition={"kvp": 120, "gated": True})
    _new_instance_uids(paths, pid, "sag")  # write_series derives them from the (shared) series UID


def _tilted_stack(phantom, degrees: float) -> SliceStack:
    stack = stack_from_phantom(phantom)
    t = math.radians(degrees)
    # Gantry tilt turns the image plane about the patient's x axis; the table still moves along z.
    return SliceStack(stack.hu, stack.positions_mm, (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t)),
                      stack.pixel_spacing_mm, stack.slice_thickness_mm, stack.spacing_between_slices_mm)


def b_gantry_tilt(folder, pid):
    _write(_tilted_stack(_phantom(), 15.0), folder, pid, acquisition={"kvp": 120, "gated": True},
           tags={"GantryDetectorTilt": 15.0})


def b_sagittal_only(folder, pid):
    phantom = _phantom()
    hu = phantom.hu[::-1, :, ::4].transpose(2, 0, 1)
    x0, y0 = phantom.origin_xy_mm
    xs = x0 + 6.0 * np.arange(hu.shape[0])
    positions = np.stack([xs, np.full_like(xs, y0), np.full_like(xs, phantom.z_positions_mm[-1])], axis=1)
    stack = SliceStack(hu, positions, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (3.0, 1.5), 6.0)
    _write(stack, folder, pid, acquisition={"kvp": 120, "gated": True},
           tags={"ImageType": ["DERIVED", "SECONDARY", "MPR"], "SeriesDescription": "CaSc SAG MPR 6.0"})


def b_non_ct_modality(folder, pid):
    _copy_real(["MR_small.dcm", "emri_small.dcm"], folder)  # real MR: single-frame and Enhanced MR
    # A PET series (generated) with CT-like geometry.
    _write(_phantom(), folder / "pet", pid, name="pet", tags={"Modality": "PT", "SeriesDescription": "PET AC"})


def b_non_image_dicom(folder, pid):
    _copy_real(["rtplan.dcm"], folder)


def b_localizer_only(folder, pid):
    phantom = _phantom(n_slices=60)
    for number, view in ((1, "frontal"), (2, "lateral")):
        write_series(localizer_from_phantom(phantom, view), folder, series_kind="localizer",
                     uids=_uids(pid, view), series_number=number, acquisition={"kvp": 120})


def b_contrast_cta_only(folder, pid):
    _write(_phantom(contrast=True, slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=60), folder, pid,
           kind="cta", acquisition={"kvp": 120, "gated": True, "contrast": True})


def b_chest_5mm_nongated(folder, pid):
    _write(_phantom(gated=False, fov_centre="body", slice_thickness_mm=5.0, slice_increment_mm=5.0, n_slices=32),
           folder, pid, kind="chest")


def b_thin_1mm_only(folder, pid):
    _write(_phantom(slice_thickness_mm=1.0, slice_increment_mm=1.0, n_slices=90), folder, pid, kind="thin")


def b_missing_rescale(folder, pid):
    for path in _gated(folder, pid):
        _edit(path, lambda ds: [delattr(ds, k) for k in ("RescaleSlope", "RescaleIntercept", "RescaleType")])


def _rescaled(folder, pid, *, signed: bool, slope: float, intercept: float, bits_stored: int):
    """The reference series stored with another pixel representation / rescale."""
    paths = _gated(folder, pid)
    for path in paths:
        def restore(ds):
            hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            stored = np.rint((hu - intercept) / slope)
            info = np.iinfo(np.int16 if signed else np.uint16)
            if stored.min() < info.min or stored.max() > info.max:
                raise ValueError("stored values out of range")
            ds.PixelRepresentation = 1 if signed else 0
            ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()

        _edit(path, restore)


def b_signed_intercept_zero(folder, pid):
    # int16 holding HU directly (negative stored values), intercept 0.
    _rescaled(folder, pid, signed=True, slope=1.0, intercept=0.0, bits_stored=16)


def b_unsigned_slope_half(folder, pid):
    # uint16 with slope 0.5 and intercept -2048: stored = 2 * (HU + 2048).
    _rescaled(folder, pid, signed=False, slope=0.5, intercept=-2048.0, bits_stored=16)


def b_jpeg2000_gated(folder, pid):
    _recompress(_gated(folder, pid), JPEG2000Lossless)


def b_jpeg_lossless_gated(folder, pid):
    _jpeg_lossless(_gated(folder, pid))


def b_rle_gated(folder, pid):
    _recompress(_gated(folder, pid), RLELossless)


def b_jpeg2000_real_ct(folder, pid):
    _copy_real(["693_J2KR.dcm"], folder)  # real CT slice, JPEG 2000 lossless


def b_jpeg_lossless_real_ct(folder, pid):
    _copy_real(["bad_sequence.dcm"], folder)  # real CT slice, JPEG Lossless SV1


def b_enhanced_ct(folder, pid):
    _copy_real(["eCT_Supplemental.dcm"], folder)  # real Enhanced CT, 2 frames


def b_over_1000_slices(folder, pid):
    """1200 tiny 16 x 16 slices, 0.5 mm apart (an 8 mm field of view that holds no heart)."""
    n = 1200
    hu = np.full((n, 16, 16), 40.0, dtype=np.float32)
    z = -300.0 + 0.5 * np.arange(n)
    positions = np.stack([np.full(n, -4.0), np.full(n, -4.0), z], axis=1)
    stack = SliceStack(hu, positions, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.5, 0.5), 0.5, 0.5)
    _write(stack, folder, pid, kind="chest", acquisition={"kvp": 120, "gated": False},
           tags={"SeriesDescription": "Body 0.5 Br40", "ProtocolName": "Body"})


def b_unreadable_permissions(folder, pid):
    for path in _gated(folder, pid):
        path.chmod(0)


def b_unreadable_subfolder(folder, pid):
    _gated(folder / "good", pid)
    _write(_phantom(), folder / "locked", pid, name="copy", number=3)
    (folder / "locked").chmod(0)


def b_dicom_dir_missing(folder, pid):
    return str(folder / "was_never_exported")


def b_dicom_dir_is_file(folder, pid):
    folder.mkdir(parents=True)
    target = folder / "IM-0001-0001.dcm"
    _write(_phantom(), folder / "tmp", pid)
    shutil.move(str(sorted((folder / "tmp").iterdir())[0]), target)
    shutil.rmtree(folder / "tmp")
    return str(target)


def b_duplicate_manifest_rows(folder, pid):
    _gated(folder / "first", pid)
    _write(_phantom(kvp=100), folder / "second", pid, kind="low_kvp")
    return str(folder / "first")


def b_secondary_capture(folder, pid):
    _copy_real(["SC_rgb.dcm"], folder)  # real secondary capture (modality OT)
    # A screenshot of the calcium score saved by a workstation as CT-labelled SC.
    paths = _write(_phantom(n_slices=12), folder / "sc", pid, name="sc")
    for path in paths:
        def to_sc(ds):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]

        _edit(path, to_sc)


def b_derived_mpr_only(folder, pid):
    _gated(folder, pid, tags={"ImageType": ["DERIVED", "SECONDARY", "MPR"], "SeriesDescription": "CaSc 3.0 MPR"})


def b_missing_position(folder, pid):
    for path in _gated(folder, pid):
        _edit(path, lambda ds: delattr(ds, "ImagePositionPatient"))


def b_uneven_spacing(folder, pid):
    """Slice steps alternate 2.8 / 3.2 mm (irregular table steps, no gap)."""
    phantom = _phantom()
    stack = stack_from_phantom(phantom)
    steps = np.where(np.arange(len(stack.positions_mm)) % 2 == 0, -0.2, 0.2)
    positions = stack.positions_mm.copy()
    positions[:, 2] += steps
    _write(SliceStack(stack.hu, positions, stack.orientation, stack.pixel_spacing_mm, 3.0, None), folder, pid,
           acquisition={"kvp": 120, "gated": True})


def b_too_few_slices(folder, pid):
    paths = _by_position(_gated(folder, pid))
    for path in paths[:20] + paths[26:]:
        path.unlink()


def b_mixed_matrix(folder, pid):
    _gated(folder / "a", pid)
    # The same series UID also holds a 64 x 64 reconstruction of the same slices.
    phantom = _phantom()
    stack = stack_from_phantom(phantom)
    small = SliceStack(stack.hu[:, ::2, ::2], stack.positions_mm + np.array([0.0, 0.0, 1.5]), stack.orientation,
                       (3.0, 3.0), 3.0, 3.0)
    paths = _write(small, folder / "b", pid, acquisition={"kvp": 120, "gated": True})
    _new_instance_uids(paths, pid, "64")


def b_missing_pixel_spacing(folder, pid):
    for path in _gated(folder, pid):
        _edit(path, lambda ds: delattr(ds, "PixelSpacing"))


def b_missing_uids(folder, pid):
    for path in _gated(folder, pid):
        _edit(path, lambda ds: delattr(ds, "SeriesInstanceUID"))


def b_qrm_phantom_real(folder, pid):
    return str(QRM_PHANTOM_DIR)


def b_dicomdir_only(folder, pid):
    _copy_real(["DICOMDIR"], folder)


def b_kvp_100_gated(folder, pid):
    _write(_phantom(kvp=100), folder, pid, kind="low_kvp")


def b_preamble_less(folder, pid):
    """An old export: no 128-byte preamble, no file meta, implicit VR little endian."""
    for path in _gated(folder, pid):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        if path.read_bytes()[128:132] == b"DICM":
            raise AssertionError("expected a preamble-less file")


def b_deep_layout_symlink_loop(folder, pid):
    """Files with opaque names six folders deep, and a symlinked folder that loops."""
    _gated(folder / "DICOM" / "A" / "B" / "C" / "D" / "E", pid, naming="bare")
    os.symlink("..", folder / "DICOM" / "A" / "loop")


def b_contrast_description_only(folder, pid):
    """No contrast tag, but the description says CTA: scored, flagged for review."""
    _gated(folder, pid, tags={"SeriesDescription": "CaSc CTA prep 3.0"})


def b_deflated_gated(folder, pid):
    """Deflated Explicit VR Little Endian (the whole dataset zlib-compressed)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    for path in _gated(folder, pid):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)


def _raw_value(ds: pydicom.Dataset, tag: int, vr: str, text: str) -> None:
    """Store a value as the bytes an archive holds, bypassing pydicom's validation."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    data = text.encode("ascii")
    data += b" " * (len(data) % 2)
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(data), data, 0, False, True)


def b_malformed_values(folder, pid):
    """Values that break the DICOM rules as real archives do: a decimal comma in
    SliceThickness, a unit in KVP."""
    for path in _gated(folder, pid):
        ds = pydicom.dcmread(path)
        _raw_value(ds, 0x00180050, "DS", "3,0")
        _raw_value(ds, 0x00180060, "DS", "120kV")
        ds.save_as(path, enforce_file_format=True)


def b_enhanced_ct_gated(folder, pid):
    """The reference series as one Enhanced CT multi-frame object (functional groups)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage

    stack = stack_from_phantom(_phantom())
    n = stack.hu.shape[0]

    def item(**values):
        entry = Dataset()
        for keyword, value in values.items():
            setattr(entry, keyword, value)
        return entry

    ds = Dataset()
    sop_uid = uid(pid, "enhanced")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword, value in dict(
        SOPClassUID=EnhancedCTImageStorage, SOPInstanceUID=sop_uid, StudyInstanceUID=uid(pid, "study"),
        SeriesInstanceUID=uid(pid, "series"), FrameOfReferenceUID=uid(pid, "frame"), Modality="CT",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"], Manufacturer="SIEMENS",
        ManufacturerModelName="SOMATOM Force", SeriesDescription="CaSc 3.0 Qr36 70%", ProtocolName="Calcium Score",
        SeriesNumber=2, InstanceNumber=1, PatientName="DOE^JANE", PatientID="MRN4471203",
        CardiacSynchronizationTechnique="PROSPECTIVE", ContentQualification="PRODUCT", BurnedInAnnotation="NO",
        AcquisitionDateTime="20190412093012", ContentDate="20190412", ContentTime="093012", NumberOfFrames=n,
        Rows=stack.hu.shape[1], Columns=stack.hu.shape[2], SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16, BitsStored=12, HighBit=11, PixelRepresentation=0,
    ).items():
        setattr(ds, keyword, value)
    dimensions = uid(pid, "dimensions")
    ds.DimensionOrganizationSequence = [item(DimensionOrganizationUID=dimensions)]
    ds.DimensionIndexSequence = [
        item(DimensionOrganizationUID=dimensions, DimensionIndexPointer=0x00209056, FunctionalGroupPointer=0x00209111),
        item(DimensionOrganizationUID=dimensions, DimensionIndexPointer=0x00209057, FunctionalGroupPointer=0x00209111),
    ]
    ds.SharedFunctionalGroupsSequence = [item(
        PixelMeasuresSequence=[item(PixelSpacing=list(stack.pixel_spacing_mm), SliceThickness=3.0,
                                    SpacingBetweenSlices=3.0)],
        PlaneOrientationSequence=[item(ImageOrientationPatient=list(stack.orientation))],
        PixelValueTransformationSequence=[item(RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")],
        CTXRayDetailsSequence=[item(KVP=120)],
    )]
    ds.PerFrameFunctionalGroupsSequence = [
        item(PlanePositionSequence=[item(ImagePositionPatient=[round(float(v), 4) for v in stack.positions_mm[i]])],
             FrameContentSequence=[item(StackID="1", InStackPositionNumber=i + 1, DimensionIndexValues=[1, i + 1])],
             CardiacSynchronizationSequence=[item(NominalPercentageOfCardiacPhase=70,
                                                  NominalCardiacTriggerDelayTime=680)])
        for i in range(n)
    ]
    ds.PixelData = np.rint(np.clip(stack.hu, -1024, 3071) + 1024).astype(np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    folder.mkdir(parents=True)
    ds.save_as(folder / "enhanced_ct.dcm", enforce_file_format=True)


def b_contrast_tags_blank(folder, pid):
    """A gated 3 mm scan taken with contrast, exported with every contrast tag blank and a
    calcium-score description: only the measured blood pool can tell."""
    _write(_phantom(contrast=True), folder, pid, acquisition={"kvp": 120, "gated": True, "contrast": False})


def b_noisy_gated(folder, pid):
    """The reference patient's gated 3 mm scan at 45 HU of noise (a large patient, a low
    dose): scored, and flagged because small scores are less certain at such noise."""
    _write(_phantom(noise_hu=45.0), folder, pid)


# (participant id, builder, expectation). The ids' numbers are stable: append new kinds.
def kinds() -> list[tuple[Kind, Callable]]:
    k = Kind
    table = [
        (k(REFERENCE, "clean gated 3 mm 120 kVp calcium-score series (the control)", SCORED, reason=None,
           n_series=1), b_reference),
        (k("BAD02_truncated", "good series plus one slice with cut pixel data and one file cut in its header",
           SCORED, ("unreadable_files",), ("unreadable_files",), n_series=1, same_score_as=REFERENCE,
           log_text=("2 files not used (1 truncated, 1 truncated_pixel_data)",)),
         b_truncated),
        (k("BAD03_all_truncated_headers", "every file cut inside its header", NOT_SCORABLE, ("no_dicom_files",),
           n_series=0, pending_reason=("truncated",), log_text=("truncated)",)), b_all_truncated_headers),
        (k("BAD04_all_truncated_pixels", "every file's pixel data cut short", NOT_SCORABLE, ("too_few_slices",),
           ("unreadable_files", "too_few_slices"), n_series=1), b_all_truncated_pixels),
        (k("BAD05_zero_byte_files", "zero-byte files only", NOT_SCORABLE, ("no_dicom_files",), n_series=0,
           pending_reason=("empty_file",), log_text=("empty_file)",)), b_zero_byte_files),
        (k("BAD06_non_dicom", "text, PNG, PDF, JSON, .DS_Store", NOT_SCORABLE, ("no_dicom_files",), n_series=0,
           pending_reason=("not_dicom",), log_text=("not_dicom",)), b_non_dicom),
        (k("BAD07_empty_folder", "an empty folder", NOT_SCORABLE, ("dicom_dir_empty",), n_series=0),
         b_empty_folder),
        (k("BAD08_several_series", "scout, gated 3 mm, thin, CTA, non-gated chest, 100 kVp", SCORED, None,
           n_series=6, chosen_description="CaSc 3.0"), b_several_series),
        (k("BAD09_missing_slice", "one slice missing mid-series", NOT_SCORABLE, ("missing_slices",),
           ("missing_slices",), n_series=1), b_missing_slice),
        (k("BAD10_duplicate_instance", "five instances exported twice (same SOPInstanceUID)", SCORED,
           ("duplicate_files",), ("duplicate_files",), n_series=1, same_score_as=REFERENCE), b_duplicate_instance),
        (k("BAD11_duplicate_position", "a second cardiac phase at the same positions, one series UID",
           NOT_SCORABLE, ("duplicate_slices",), ("duplicate_slices",), n_series=1), b_duplicate_position),
        (k("BAD12_mixed_orientation", "sagittal reformat under the axial series' UID", NOT_SCORABLE,
           ("mixed_orientation",), ("mixed_orientation",), n_series=1), b_mixed_orientation),
        (k("BAD13_gantry_tilt", "15 degree gantry tilt (tag and geometry)", NOT_SCORABLE, ("gantry_tilt",),
           ("gantry_tilt",), n_series=1), b_gantry_tilt),
        (k("BAD14_sagittal_only", "sagittal MPR only", NOT_SCORABLE, ("not_axial",), ("not_axial",), n_series=1),
         b_sagittal_only),
        (k("BAD15_non_ct_modality", "real MR (single and multi-frame) and a PET series", NOT_SCORABLE,
           ("not_ct",), ("not_ct",), n_series=3), b_non_ct_modality),
        (k("BAD16_non_image_dicom", "a real RT plan (DICOM without images)", NOT_SCORABLE, ("not_ct",),
           ("not_ct",), n_series=1), b_non_image_dicom),
        (k("BAD17_localizer_only", "frontal and lateral localizers", NOT_SCORABLE, ("localizer",), ("localizer",),
           n_series=2), b_localizer_only),
        (k("BAD18_contrast_cta_only", "contrast CTA only", NOT_SCORABLE, ("contrast_tag",), ("contrast_tag",),
           n_series=1), b_contrast_cta_only),
        (k("BAD19_chest_5mm_nongated", "5 mm non-gated chest CT only", SCORED, ("non-gated", "not_gated"),
           ("not_gated", "thick_slices"), n_series=1), b_chest_5mm_nongated),
        (k("BAD20_thin_1mm_only", "1 mm gated thin reconstruction only", SCORED, ("thin_slices",),
           ("thin_slices",), n_series=1), b_thin_1mm_only),
        (k("BAD21_missing_rescale", "no RescaleSlope / RescaleIntercept", NOT_SCORABLE, ("missing_rescale",),
           ("missing_rescale",), n_series=1), b_missing_rescale),
        (k("BAD22_signed_intercept_zero", "int16 pixels holding HU, intercept 0", SCORED, None, n_series=1,
           same_score_as=REFERENCE), b_signed_intercept_zero),
        (k("BAD23_unsigned_slope_half", "uint16 pixels, slope 0.5, intercept -2048", SCORED, None, n_series=1,
           same_score_as=REFERENCE), b_unsigned_slope_half),
        (k("BAD24_jpeg2000_gated", "the reference series re-encoded JPEG 2000 lossless", SCORED, None, n_series=1,
           same_score_as=REFERENCE), b_jpeg2000_gated),
        (k("BAD25_jpeg_lossless_gated", "the reference series re-encoded JPEG Lossless SV1", SCORED, None,
           n_series=1, same_score_as=REFERENCE), b_jpeg_lossless_gated),
        (k("BAD26_rle_gated", "the reference series re-encoded RLE Lossless", SCORED, None, n_series=1,
           same_score_as=REFERENCE), b_rle_gated),
        (k("BAD27_jpeg2000_real_ct", "a real JPEG 2000 CT slice (pydicom-data)", NOT_SCORABLE, ("too_few_slices",),
           ("too_few_slices",), n_series=1), b_jpeg2000_real_ct),
        (k("BAD28_jpeg_lossless_real_ct", "a real JPEG Lossless CT slice (pydicom-data)", NOT_SCORABLE,
           ("too_few_slices",), ("too_few_slices",), n_series=1), b_jpeg_lossless_real_ct),
        (k("BAD29_enhanced_ct", "real Enhanced CT multi-frame (pydicom-data eCT_Supplemental)", NOT_SCORABLE,
           ("too_few_slices",), ("too_few_slices",), n_series=1), b_enhanced_ct),
        (k("BAD30_over_1000_slices", "1200 slices of 16 x 16 pixels (8 mm field of view)", NOT_SCORABLE,
           ("small_field_of_view",), ("small_field_of_view",), n_series=1), b_over_1000_slices),
        (k("BAD31_unreadable_permissions", "every file chmod 000", NOT_SCORABLE, ("no_dicom_files",), n_series=0,
           pending_reason=("permission_denied",), needs_unprivileged=True,
           log_text=("permission_denied)",)), b_unreadable_permissions),
        (k("BAD32_unreadable_subfolder", "good series plus a sub-folder chmod 000", SCORED, None, n_series=1,
           same_score_as=REFERENCE, needs_unprivileged=True,
           log_text=("1 files not used (1 directory_unreadable)",)),
         b_unreadable_subfolder),
        (k("BAD33_dicom_dir_missing", "dicom_dir does not exist", NOT_SCORABLE, ("dicom_dir_missing",),
           n_series=0), b_dicom_dir_missing),
        (k("BAD34_dicom_dir_is_file", "dicom_dir is one DICOM file", NOT_SCORABLE, ("dicom_dir_not_a_directory",),
           n_series=0), b_dicom_dir_is_file),
        (k("BAD35_duplicate_manifest_rows", "the visit listed twice (another folder the second time)", SCORED,
           None, n_series=1, chosen_description="CaSc 3.0",
           log_text=("visit baseline is listed again",)),
         b_duplicate_manifest_rows),
        (k("BAD36_secondary_capture", "real RGB secondary capture and CT-labelled screen saves", NOT_SCORABLE,
           ("secondary_capture",), ("secondary_capture",), n_series=2), b_secondary_capture),
        (k("BAD37_derived_mpr_only", "axial DERIVED MPR only", SCORED, ("derived_image",), ("derived_image",),
           n_series=1, same_score_as=REFERENCE), b_derived_mpr_only),
        (k("BAD38_missing_position", "no ImagePositionPatient", NOT_SCORABLE, ("missing_geometry",),
           ("missing_geometry",), n_series=1), b_missing_position),
        (k("BAD39_uneven_spacing", "the reference slices with steps alternating 2.6 / 3.4 mm", SCORED,
           ("uneven_spacing",), ("uneven_spacing",), n_series=1, same_score_as=REFERENCE, score_rel_tol=0.01),
         b_uneven_spacing),
        (k("BAD40_too_few_slices", "6 slices", NOT_SCORABLE, ("too_few_slices",), ("too_few_slices",), n_series=1),
         b_too_few_slices),
        (k("BAD41_mixed_matrix", "128 and 64 pixel images under one series UID", NOT_SCORABLE, ("mixed_matrix",),
           ("mixed_matrix",), n_series=1), b_mixed_matrix),
        (k("BAD42_missing_pixel_spacing", "no PixelSpacing", NOT_SCORABLE, ("missing_pixel_spacing",),
           ("missing_pixel_spacing",), n_series=1), b_missing_pixel_spacing),
        (k("BAD43_missing_uids", "no SeriesInstanceUID", NOT_SCORABLE, ("no_dicom_files",), n_series=0,
           pending_reason=("missing_uids",), log_text=("missing_uids)",)), b_missing_uids),
        (k("BAD44_qrm_phantom_real", "the real QRM phantom scan (Canon, ../shared/data)", SCORED,
           ("derived_image",), ("derived_image",), n_series=1), b_qrm_phantom_real),
        (k("BAD45_dicomdir_only", "a real DICOMDIR index and no images", NOT_SCORABLE, ("no_dicom_files",),
           n_series=0, pending_reason=("dicomdir",), log_text=("dicomdir)",)), b_dicomdir_only),
        (k("BAD46_kvp_100_gated", "gated 3 mm at 100 kVp only", SCORED, ("kvp_not_120",), ("kvp_not_120",),
           n_series=1), b_kvp_100_gated),
        (k("BAD47_preamble_less", "no preamble or file meta, implicit VR", SCORED, None, n_series=1,
           same_score_as=REFERENCE), b_preamble_less),
        (k("BAD48_deep_layout_symlink_loop", "opaque names six folders deep and a looping symlink", SCORED, None,
           n_series=1, same_score_as=REFERENCE), b_deep_layout_symlink_loop),
        (k("BAD49_contrast_description_only", "description says CTA, no contrast tag", SCORED,
           ("contrast_description",), ("contrast_description",), n_series=1, same_score_as=REFERENCE),
         b_contrast_description_only),
        (k("BAD50_deflated_gated", "the reference series in Deflated Explicit VR Little Endian", SCORED, None,
           n_series=1, same_score_as=REFERENCE), b_deflated_gated),
        (k("BAD51_malformed_values", "SliceThickness '3,0' and KVP '120kV' (invalid DS values)", SCORED,
           ("missing_slice_thickness", "missing_kvp"), ("missing_slice_thickness", "missing_kvp"), n_series=1,
           same_score_as=REFERENCE), b_malformed_values),
        (k("BAD52_enhanced_ct_gated", "the reference series as one Enhanced CT multi-frame file", SCORED, None,
           n_series=1, same_score_as=REFERENCE), b_enhanced_ct_gated),
        (k("BAD53_contrast_tags_blank", "contrast-enhanced gated scan whose contrast tags are blank", NOT_SCORABLE,
           ("contrast_blood_pool", "HU"), ("contrast_blood_pool",), n_series=1, log_text=("blood pool",)),
         b_contrast_tags_blank),
        (k("BAD54_noisy_gated", "gated 3 mm scan at 45 HU of noise", SCORED, ("noisy_image",), ("noisy_image",),
           n_series=1), b_noisy_gated),
    ]
    return table


@dataclass
class Corpus:
    root: Path
    manifest: Path
    kinds: dict[str, Kind]  # participant id -> expectation
    input_roots: list[Path]  # folders whose files must not change

    def kind(self, participant_id: str) -> Kind:
        return self.kinds[participant_id]


def build_corpus(root: Path, *, include_unprivileged: bool = True) -> Corpus:
    """Write every kind under ``root/dicom`` and the manifest ``root/manifest.tsv``.

    ``include_unprivileged``: build the permission kinds (chmod 000), whose files and
    folders only stay unreadable for a process without root's DAC override.
    """
    root = Path(root)
    dicom = root / "dicom"
    dicom.mkdir(parents=True, exist_ok=True)
    expectations: dict[str, Kind] = {}
    rows = []
    for kind, builder in kinds():
        if kind.needs_unprivileged and not include_unprivileged:
            continue
        if builder is b_qrm_phantom_real and not QRM_PHANTOM_DIR.is_dir():
            continue
        folder = dicom / kind.participant_id
        dicom_dir = builder(folder, kind.participant_id) or str(folder)
        kind.dicom_dir = dicom_dir
        expectations[kind.participant_id] = kind
        rows.append((kind.participant_id, VISIT, dicom_dir))
        if builder is b_duplicate_manifest_rows:
            second = str(folder / "second")
            kind.extra_manifest_rows.append(second)
            rows.append((kind.participant_id, VISIT, second))
    manifest = root / "manifest.tsv"
    lines = ["participant_id\tvisit\tdicom_dir"] + ["\t".join(row) for row in rows]
    manifest.write_text("\n".join(lines) + "\n")
    inputs = [dicom] + ([QRM_PHANTOM_DIR] if any(k.dicom_dir == str(QRM_PHANTOM_DIR) for k in expectations.values())
                        else [])
    return Corpus(root, manifest, expectations, inputs)


if __name__ == "__main__":  # build a corpus to look at: python tests/workflow/bad_input_corpus.py OUT
    import sys

    corpus = build_corpus(Path(sys.argv[1]))
    for kind in corpus.kinds.values():
        print(f"{kind.participant_id:40s} {kind.status:13s} {kind.what}")
