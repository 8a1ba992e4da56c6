"""discover_visit: series grouping, measured geometry, and every unusable file accounted for."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from dicom_factory import AXIAL, GATED_CASC, IDENTIFIERS, SAGITTAL, truncate, write_series
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cacflow.discover import discover_visit


def only_series(visit):
    assert len(visit.series) == 1, [s.series_description for s in visit.series]
    return visit.series[0]


def test_gated_series_geometry_is_measured_from_positions(tmp_path):
    write_series(tmp_path, n_slices=40, thickness=3.0, tags=GATED_CASC)
    visit = discover_visit(tmp_path)
    s = only_series(visit)
    assert visit.reason is None and visit.unreadable == [] and visit.n_files_seen == 40
    assert (s.n_files, s.n_slices) == (40, 40)
    assert s.slice_increment_mm == 3.0 and s.increment_min_mm == 3.0 and s.increment_max_mm == 3.0
    assert s.z_extent_mm == pytest.approx(117.0)
    assert (s.n_gaps, s.n_duplicate_positions, s.uneven_spacing) == (0, 0, False)
    assert s.orientation == "axial" and s.orientation_axial and s.tilt_deg == 0.0
    assert (s.pixel_spacing_row_mm, s.pixel_spacing_col_mm, s.fov_mm) == (12.5, 12.5, 200.0)
    assert s.kvp == 120.0 and s.slice_thickness_mm == 3.0 and s.convolution_kernel == "Sa36f\\3"
    assert not s.compressed and not s.multiframe


def test_files_are_sorted_along_the_slice_normal_not_by_name(tmp_path):
    # Names count down while z counts up: order must come from the positions.
    positions = [float(z) for z in range(0, 60, 3)]
    write_series(tmp_path, n_slices=20, positions=positions, name="Z{:04d}")
    for path in tmp_path.iterdir():
        path.rename(tmp_path / f"IMG{999 - int(path.name[1:]):04d}")
    s = only_series(discover_visit(tmp_path))
    assert [int(p[-4:]) for p in s.files] == list(range(998, 978, -1))


def test_normal_points_to_the_head_even_when_the_orientation_flips_rows(tmp_path):
    # Columns run anterior: cross(row, col) points to the feet, and IM0001 is the top slice.
    write_series(tmp_path, n_slices=12, orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    s = only_series(discover_visit(tmp_path))
    assert s.orientation == "axial" and s.slice_increment_mm == 3.0
    assert s.files[0].endswith("IM0012") and s.files[-1].endswith("IM0001")


def test_series_are_grouped_by_uid_across_any_folder_layout(tmp_path):
    study = generate_uid()
    write_series(tmp_path / "a" / "deep" / "er", n_slices=12, series_number=3, study_uid=study)
    write_series(tmp_path / "a", n_slices=15, series_number=2, study_uid=study, name="x{}.dcm")
    series_uid = generate_uid()
    write_series(tmp_path / "split1", positions=[0.0, 3.0, 6.0], series_uid=series_uid, series_number=4)
    write_series(tmp_path / "split2", positions=[9.0, 12.0], series_uid=series_uid, series_number=4, name="B{}")
    visit = discover_visit(tmp_path)
    assert [(s.series_number, s.n_files) for s in visit.series] == [(2, 15), (3, 12), (4, 5)]
    assert visit.series[2].n_gaps == 0 and visit.series[2].z_extent_mm == 12.0


def test_missing_slice_is_a_gap(tmp_path):
    positions = [i * 3.0 for i in range(30) if i != 14]
    s = only_series(discover_visit(write_series(tmp_path, positions=positions)[0].parent))
    assert s.n_gaps == 1 and s.increment_max_mm == 6.0 and s.slice_increment_mm == 3.0
    assert not s.uneven_spacing  # the gap is reported as a gap, not as uneven spacing


def test_duplicate_instance_copies_are_counted_once(tmp_path):
    paths = write_series(tmp_path / "series", n_slices=20)
    (tmp_path / "copy").mkdir()
    shutil.copy(paths[5], tmp_path / "copy" / "again.dcm")
    s = only_series(discover_visit(tmp_path))
    assert (s.n_files, s.n_slices, s.n_duplicate_files) == (20, 20, 1)
    assert s.duplicate_files == [str(tmp_path / "series" / "IM0006")]
    assert s.n_duplicate_positions == 0


def test_two_images_at_one_position_are_duplicate_slices(tmp_path):
    positions = [i * 3.0 for i in range(20)] + [30.0]
    s = only_series(discover_visit(write_series(tmp_path, positions=positions)[0].parent))
    assert s.n_duplicate_positions == 1 and s.n_slices == 21 and s.slice_increment_mm == 3.0


def test_uneven_spacing(tmp_path):
    positions = [0.0, 3.0, 6.0, 9.0, 13.0, 16.0, 19.0, 22.0, 25.0, 28.0, 31.0]
    s = only_series(discover_visit(write_series(tmp_path, positions=positions)[0].parent))
    assert s.uneven_spacing and s.n_gaps == 0
    assert s.spacing_deviation_pct == pytest.approx(33.33, abs=0.01)


def test_gantry_tilt_from_the_tag(tmp_path):
    write_series(tmp_path, n_slices=12, tags={"GantryDetectorTilt": -12.0})
    s = only_series(discover_visit(tmp_path))
    assert s.gantry_tilt_deg == -12.0 and s.tilt_deg == 12.0 and s.orientation == "axial"


def test_gantry_tilt_from_the_geometry(tmp_path):
    # Rows along x, columns tilted 20 degrees out of the y axis towards z.
    tilted = (1.0, 0.0, 0.0, 0.0, 0.9396926, -0.3420201)
    write_series(tmp_path, n_slices=12, orientation=tilted)
    s = only_series(discover_visit(tmp_path))
    assert s.orientation == "tilted_axial" and not s.orientation_axial
    assert s.tilt_geometry_deg == pytest.approx(20.0, abs=0.01) and s.tilt_deg == pytest.approx(20.0, abs=0.01)


def test_sagittal_series(tmp_path):
    write_series(tmp_path, n_slices=12, orientation=SAGITTAL)
    s = only_series(discover_visit(tmp_path))
    assert s.orientation == "sagittal" and not s.orientation_axial and s.normal_angle_deg == 90.0


def test_mixed_orientation_in_one_series_is_recorded_not_split(tmp_path):
    uid = generate_uid()
    write_series(tmp_path, n_slices=6, series_uid=uid, orientation=AXIAL)
    write_series(tmp_path, n_slices=3, series_uid=uid, orientation=SAGITTAL, name="SAG{}")
    s = only_series(discover_visit(tmp_path))
    assert s.mixed_orientation and s.n_files == 9 and s.orientation == "axial"


def test_unusable_files_are_listed_with_reasons(tmp_path):
    paths = write_series(tmp_path / "ct", n_slices=20)
    truncate(paths[0], 300)  # header cut: series unknown
    truncate(paths[10], paths[10].stat().st_size - 64)  # pixels cut: belongs to the series
    (tmp_path / "notes.txt").write_text("visit notes")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 200)
    (tmp_path / "empty").touch()
    visit = discover_visit(tmp_path)
    s = only_series(visit)
    assert visit.n_files_seen == 23
    assert visit.unreadable_counts() == {"truncated": 1, "truncated_pixel_data": 1, "not_dicom": 2, "empty_file": 1}
    assert (str(paths[10]), "truncated_pixel_data") in visit.unreadable
    assert s.n_files == 18 and s.n_unreadable_files == 1 and str(paths[10]) not in s.files
    assert s.n_gaps == 1  # the truncated slice leaves a hole that QC will see


def test_missing_rescale_is_counted(tmp_path):
    write_series(tmp_path, n_slices=12, drop=("RescaleSlope", "RescaleIntercept"))
    assert only_series(discover_visit(tmp_path)).n_missing_rescale == 12


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "nope", "dicom_dir_missing"),
    (lambda p: p, "dicom_dir_empty"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "dicom_dir_not_a_directory"),
    (lambda p: (p / "f.txt").write_text("x") and p, "no_dicom_files"),
])
def test_folders_without_series_give_a_reason_not_an_exception(tmp_path, make, reason):
    visit = discover_visit(make(tmp_path))
    assert visit.series == [] and visit.reason == reason
    assert visit.to_row()["discovery_reason"] == reason


def test_unlistable_folder_is_reported(tmp_path, monkeypatch):
    # Tests may run as root, where chmod cannot deny listing; simulate the OS error.
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    visit = discover_visit(tmp_path)
    assert visit.reason == "directory_unreadable"
    assert visit.unreadable == [(str(tmp_path), "directory_unreadable")]


def test_real_enhanced_ct_multiframe(tmp_path):
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp_path / "ect")
    s = only_series(discover_visit(tmp_path))
    assert s.multiframe and s.n_files == 1 and s.n_slices == 2
    assert s.slice_increment_mm == 10.0 and s.orientation == "axial"


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "693_J2KI.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm"])
def test_real_compressed_ct_is_discovered(tmp_path, name):
    shutil.copy(get_testdata_file(name), tmp_path / "f")
    s = only_series(discover_visit(tmp_path))
    assert s.compressed and s.n_files == 1 and s.modality == "CT"


def test_real_copies_in_two_transfer_syntaxes_are_one_instance(tmp_path):
    # 693_UNCR and 693_J2KR hold the same instance, uncompressed and JPEG 2000.
    shutil.copy(get_testdata_file("693_UNCR.dcm"), tmp_path / "a")
    shutil.copy(get_testdata_file("693_J2KR.dcm"), tmp_path / "b")
    s = only_series(discover_visit(tmp_path))
    assert s.n_files == 1 and s.n_duplicate_files == 1


def test_real_phantom_series(phantom_dir):
    visit = discover_visit(phantom_dir)
    s = only_series(visit)
    assert visit.unreadable == []
    assert (s.n_files, s.n_slices, s.slice_increment_mm, s.slice_thickness_mm) == (47, 47, 3.0, 3.0)
    assert s.z_extent_mm == pytest.approx(138.0) and s.n_gaps == 0 and s.orientation == "axial"
    assert s.image_type == ("DERIVED", "PRIMARY", "MPR") and s.kvp == 120.0
    assert s.manufacturer == "TOSHIBA" and s.fov_mm == pytest.approx(249.856)


def test_row_is_flat_scalars_without_identifiers(tmp_path):
    write_series(tmp_path, n_slices=12, tags=GATED_CASC)
    row = only_series(discover_visit(tmp_path)).to_row()
    assert "files" not in row and row["series_uid"] and row["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert all(v is None or type(v) in (str, int, float, bool) for v in row.values())
    for value in IDENTIFIERS.values():
        assert value not in repr(row)


def test_sixty_file_series_is_discovered_fast(tmp_path):
    write_series(tmp_path, n_slices=60, tags=GATED_CASC)
    discover_visit(tmp_path)  # warm the imports and the page cache
    start = time.perf_counter()
    s = only_series(discover_visit(tmp_path))
    assert time.perf_counter() - start < 0.5
    assert s.n_files == 60
