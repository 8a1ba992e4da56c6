"""read_header: the allowlisted header of one file, or a reason; never an exception."""

from __future__ import annotations

import shutil
from dataclasses import fields

import pydicom
import pytest
from dicom_factory import GATED_CASC, IDENTIFIERS, make_slice, truncate, write_series
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid

from cacflow import dicom_headers
from cacflow.dicom_headers import HeaderRecord, read_header


@pytest.fixture
def ct_file(tmp_path):
    return write_series(tmp_path / "s", n_slices=1, tags={**GATED_CASC, "HeartRate": 61, "TriggerTime": 402.5,
                                                         "ScanOptions": ["TP70PC", "OSCRATEAVG061BPM"]})[0]


def test_reads_the_scoring_tags_as_plain_values(ct_file):
    record, reason = read_header(ct_file)
    assert reason is None
    assert record.modality == "CT"
    assert record.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert record.kvp == 120.0 and record.slice_thickness_mm == 3.0
    assert record.image_position == (-4.0, -4.0, -60.0)
    assert record.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert record.pixel_spacing_mm == (12.5, 12.5)
    assert record.rows == record.columns == 16
    assert (record.rescale_slope, record.rescale_intercept) == (1.0, -1024.0)
    assert record.convolution_kernel == "Sa36f\\3"  # Siemens multi-valued kernel, joined
    assert record.scan_options == "TP70PC\\OSCRATEAVG061BPM"
    assert record.cardiac_sync_technique == "PROSPECTIVE"
    assert (record.trigger_time_ms, record.heart_rate_bpm, record.nominal_cardiac_phase_pct) == (402.5, 61.0, 70.0)
    assert record.transfer_syntax == "1.2.840.10008.1.2.1"
    assert record.number_of_frames == 1 and not record.multiframe
    assert record.positions == ((-4.0, -4.0, -60.0),)
    assert not record.pixel_data_truncated
    for f in fields(record):
        value = getattr(record, f.name)
        assert value is None or isinstance(value, (str, int, float, bool, tuple)), f.name


def test_patient_identifiers_cannot_leak(ct_file):
    record, _ = read_header(ct_file)
    text = repr(record) + repr(record.frame_positions)
    for keyword, value in IDENTIFIERS.items():
        assert value not in text, keyword
    identifying = {"patient", "birth", "accession", "institution", "physician", "operator", "study_date", "study_time"}
    assert not [f.name for f in fields(HeaderRecord) if any(word in f.name for word in identifying)]
    # The allowlist itself names none of them, so they are never even parsed.
    assert not set(IDENTIFIERS) & set(dicom_headers._TOP_LEVEL_TAGS)


def test_non_dicom_files_are_rejected_with_a_reason(tmp_path):
    text = tmp_path / "README"
    text.write_text("scan notes\n" * 50)
    empty = tmp_path / "empty"
    empty.touch()
    assert read_header(text) == (None, "not_dicom")
    assert read_header(empty) == (None, "empty_file")
    assert read_header(tmp_path / "missing.dcm") == (None, "unreadable")
    assert read_header(tmp_path) == (None, "unreadable")  # a folder, not a file


def test_dicomdir_is_not_an_image(tmp_path):
    assert read_header(get_testdata_file("DICOMDIR")) == (None, "dicomdir")


def test_truncated_header_is_reported(ct_file):
    truncate(ct_file, 300)
    assert read_header(ct_file) == (None, "truncated")


def test_truncated_pixel_data_is_flagged_on_a_readable_header(ct_file):
    truncate(ct_file, ct_file.stat().st_size - 100)
    record, reason = read_header(ct_file)
    assert reason is None
    assert record.pixel_data_truncated


def test_truncated_compressed_pixel_data_is_flagged(tmp_path):
    copy = tmp_path / "j2k"
    shutil.copy(get_testdata_file("693_J2KR.dcm"), copy)
    assert read_header(copy)[0].pixel_data_truncated is False
    truncate(copy, copy.stat().st_size - 50)
    assert read_header(copy)[0].pixel_data_truncated is True


def _deflate(path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_deflated_file_is_read_with_its_pixel_data_checked(ct_file):
    # pydicom inflates the whole dataset, so the pixel check cannot use the file position.
    _deflate(ct_file)
    record, reason = read_header(ct_file)
    assert reason is None
    assert record.transfer_syntax == "1.2.840.10008.1.2.1.99"
    assert record.kvp == 120.0 and record.image_position == (-4.0, -4.0, -60.0)
    assert not record.pixel_data_truncated


def test_truncated_deflated_file_is_reported(ct_file):
    _deflate(ct_file)
    truncate(ct_file, ct_file.stat().st_size - 20)
    assert read_header(ct_file) == (None, "truncated")


def test_permission_denied_is_reported(ct_file, monkeypatch):
    # Tests may run as root, where chmod cannot deny reading; simulate the OS error.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dicom_headers, "open", denied, raising=False)
    assert read_header(ct_file) == (None, "permission_denied")


def test_file_without_preamble_is_read(tmp_path):
    # Old exports: a bare dataset, no 128-byte preamble, no "DICM", no file meta.
    ds = make_slice(series_uid=generate_uid(), study_uid=generate_uid(), instance=1, position=(0.0, 0.0, 5.0))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "raw"
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[:2] == b"\x08\x00"
    record, reason = read_header(path)
    assert reason is None, reason
    assert record.image_position == (0.0, 0.0, 5.0)
    assert record.transfer_syntax == "1.2.840.10008.1.2"  # inferred from the encoding read


def test_missing_series_uid_is_reported(tmp_path):
    path = write_series(tmp_path, n_slices=1, drop=("SeriesInstanceUID",))[0]
    assert read_header(path) == (None, "missing_uids")


def test_real_ct_with_contrast_tag():
    record, _ = read_header(get_testdata_file("CT_small.dcm"))
    assert record.contrast_agent == "ISOVUE300/100" and record.contrast_route == "IV"
    assert record.slice_thickness_mm == 5.0 and record.kvp == 120.0


def test_real_enhanced_ct_multiframe_geometry_comes_from_functional_groups():
    record, _ = read_header(get_testdata_file("eCT_Supplemental.dcm"))
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"
    assert record.multiframe and record.number_of_frames == 2
    assert record.frame_positions == ((99.5, -301.5, -159.0), (99.5, -301.5, -149.0))
    assert record.image_orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert record.slice_thickness_mm == 10.0
    assert record.pixel_spacing_mm == (0.388672, 0.388672)
    assert (record.rescale_slope, record.rescale_intercept) == (1.0, -1024.0)
    assert record.contrast_agent == "Iohexol" and record.contrast_route == "Intravenous route"


@pytest.mark.parametrize("name, transfer_syntax", [
    ("693_J2KR.dcm", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),  # JPEG 2000
    ("bad_sequence.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
])
def test_real_compressed_ct(name, transfer_syntax):
    record, reason = read_header(get_testdata_file(name))
    assert reason is None
    assert record.modality == "CT" and record.transfer_syntax == transfer_syntax
    assert not record.pixel_data_truncated
    assert record.image_position is not None and record.pixel_spacing_mm is not None


def test_real_phantom_header(phantom_dir):
    record, _ = read_header(next(p for p in sorted(phantom_dir.iterdir())))
    assert record.manufacturer_model == "Aquilion ONE" and record.manufacturer == "TOSHIBA"
    assert record.image_type == ("DERIVED", "PRIMARY", "MPR")
    assert record.protocol_name.startswith("Calcium Score")
    assert record.cardiac_sync_technique is None and record.heart_rate_bpm is None
    assert record.transfer_syntax == "1.2.840.10008.1.2"  # implicit VR little endian


@settings(max_examples=60, deadline=None)
@given(body=st.binary(min_size=0, max_size=400))
def test_garbage_after_a_dicom_preamble_never_raises(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("garbage") / "f"
    path.write_bytes(b"\0" * 128 + b"DICM" + body)
    record, reason = read_header(path)
    assert (record is None) != (reason is None)
