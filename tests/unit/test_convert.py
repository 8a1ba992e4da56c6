"""dcm2niix conversion of one series (the real binary, on small generated series)."""

from __future__ import annotations

import numpy as np
import pytest

from cacflow.convert import ConversionError, _pick_output, convert_series, load_volume
from cacflow.synth.dicom_writer import SliceStack, uid, write_series


def _stack(z_positions: list[float]) -> SliceStack:
    n = len(z_positions)
    hu = np.full((n, 32, 32), -50.0, dtype=np.float32)
    hu[:, 12:20, 12:20] = 400.0 + 10.0 * np.arange(n)[:, None, None]
    positions = np.stack([np.full(n, -24.0), np.full(n, -24.0), np.asarray(z_positions, float)], axis=1)
    return SliceStack(hu, positions, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (1.5, 1.5), 3.0, None)


def _write(tmp_path, z_positions):
    return write_series(_stack(z_positions), tmp_path / "dicom", series_kind="calcium_score",
                        uids={"study": uid("t", "study"), "series": uid("t", "series")},
                        acquisition={"kvp": 120, "gated": True})


def test_an_evenly_spaced_series_converts_to_one_volume_with_every_slice(tmp_path):
    files = _write(tmp_path, [3.0 * i for i in range(12)])
    result = convert_series([str(p) for p in files], tmp_path / "out.nii", expected_slices=12)
    assert result.n_slices == 12 and not result.uneven_spacing
    volume = load_volume(result.nifti_path)
    assert volume.hu.shape == (12, 32, 32)
    assert volume.hu[:, 16, 16] == pytest.approx(400.0 + 10.0 * np.arange(12))  # inferior -> superior


def test_unevenly_spaced_slices_are_kept_as_stored_at_their_mean_increment(tmp_path):
    """dcm2niix also writes an interpolated equidistant (_Eq_) volume; scoring uses
    the stored slices (interpolation would lower calcium peaks), placed at the mean
    step so the volume spans the true z extent."""
    steps = [3.4 if i % 2 == 0 else 2.6 for i in range(13)]  # median 3.4, mean 3.03
    z = np.cumsum([0.0] + steps).tolist()
    files = _write(tmp_path, z)
    result = convert_series([str(p) for p in files], tmp_path / "out.nii", expected_slices=len(z))
    assert result.uneven_spacing and result.n_slices == len(z)
    mean_step = (z[-1] - z[0]) / (len(z) - 1)
    assert result.spacing_mm[0] == pytest.approx(mean_step, abs=1e-3)
    volume = load_volume(result.nifti_path)
    assert volume.spacing_mm[0] == pytest.approx(mean_step, abs=1e-3)
    assert volume.z_positions_mm[-1] - volume.z_positions_mm[0] == pytest.approx(z[-1] - z[0], abs=1e-2)
    assert volume.hu[:, 16, 16] == pytest.approx(400.0 + 10.0 * np.arange(len(z)))  # no interpolation
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dcm2niix")] == []


def test_any_other_split_is_an_error(tmp_path):
    with pytest.raises(ConversionError, match="split the series into 2 volumes"):
        _pick_output([tmp_path / "volume.nii", tmp_path / "volume_Tilt_1.nii"])
    with pytest.raises(ConversionError, match="3 volumes"):
        _pick_output([tmp_path / "volume.nii", tmp_path / "volume_Eq_1.nii", tmp_path / "volume_e2.nii"])


def test_deflated_files_are_inflated_for_dcm2niix_and_left_unchanged(tmp_path):
    import hashlib

    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    files = _write(tmp_path, [3.0 * i for i in range(12)])
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    result = convert_series([str(p) for p in files], tmp_path / "out.nii", expected_slices=12)
    assert load_volume(result.nifti_path).hu[:, 16, 16] == pytest.approx(400.0 + 10.0 * np.arange(12))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before
