"""COCA reference scores: OsiriX plist ROIs on generated DICOM series, scored by hand."""

from __future__ import annotations

import plistlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cacflow import cli
from cacflow.coca import (
    CocaRoi,
    label_volume,
    rasterise_polygon,
    read_calcium_xml,
    read_dicom_series,
    reference_schema,
    score_patient,
)
from cacflow.nifti_io import load_nifti
from cacflow.volume import Volume

PIXEL_MM = 0.5
ORIGIN_X, ORIGIN_Y = -8.0, -20.0
Z_POSITIONS = [-100.0, -97.0, -94.0, -91.0, -88.0]  # inferior -> superior, 3 mm apart
SERIES = "Pro_Gated_CS_3.0_I30f_3_70%"
SIZE = 32


def write_series(folder, hu_volume, slope=2.0, intercept=-1024.0):
    """One CT Image Storage file per slice; InstanceNumber 1 is the most superior slice, as in COCA."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, n = generate_uid(), len(hu_volume)
    for index, (z, hu) in enumerate(zip(Z_POSITIONS, hu_volume)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = n - index
        ds.ImagePositionPatient = [ORIGIN_X, ORIGIN_Y, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.SliceThickness = 3.0
        ds.KVP = 120
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.PixelData = np.round((hu - intercept) / slope).astype(np.int16).tobytes()
        # Named against slice order, so reading must sort by position.
        ds.save_as(folder / f"IM-0001-{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)


def square(row0, col0, rows, cols):
    """Polygon whose inside holds exactly the pixel centres rows x cols from (row0, col0)."""
    top, left = row0 - 0.5, col0 - 0.5
    return [(left, top), (left + cols, top), (left + cols, top + rows), (left, top + rows)]


def roi(name, polygon, z_mm=None):
    item = {"Name": name, "Point_px": [f"({x:.4f}, {y:.4f})" for x, y in polygon]}
    if z_mm is not None:
        item["Point_mm"] = [f"({ORIGIN_X + x * PIXEL_MM:.3f}, {ORIGIN_Y + y * PIXEL_MM:.3f}, {z_mm:.3f})"
                            for x, y in polygon]
    return item


def write_xml(path, images):
    """An OsiriX ROI export: an Apple plist with a top-level 'Images' array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "Images": [
            {"ImageIndex": index, "NumberOfROIs": len(rois), "ROIs": rois}
            for index, rois in images
        ]
    }
    with open(path, "wb") as handle:
        plistlib.dump(document, handle, fmt=plistlib.FMT_XML)


def patient_volume():
    hu = np.full((5, SIZE, SIZE), 40.0)
    hu[0, 4:8, 4:8] = 400  # LAD, slice index 0: 16 px = 4 mm^2, weight 4 -> 16
    hu[2, 10:13, 10:13] = 300  # RCA, first ROI: 9 px = 2.25 mm^2, weight 3 -> 6.75
    hu[2, 20:22, 10:14] = 200  # RCA, second ROI on the same slice: 8 px = 2 mm^2, weight 2 -> 4
    hu[3, 6:9, 20:24] = 250  # LCX: 12 px = 3 mm^2, weight 2 -> 6
    hu[4, 24:26, 24:26] = 600  # LM: 4 px = 1 mm^2, weight 4 -> 4
    hu[4, 2:5, 26:29] = 500  # calcium under no coronary ROI ('Aorta'): not scored
    hu[1, 15:18, 15:18] = 700  # calcium whose ROI z matches no slice: not scored
    return hu


EXPECTED = {"lad": 16.0, "rca": 6.75 + 4.0, "lcx": 6.0, "lm": 4.0}


def patient_rois():
    return [
        (0, [roi("Left Anterior Descending Artery", square(3, 3, 6, 6), Z_POSITIONS[0])]),
        (2, [roi("Right Coronary Artery", square(9, 9, 5, 5), Z_POSITIONS[2]),
             roi("Right Coronary Artery", square(19, 9, 4, 6), Z_POSITIONS[2])]),
        (3, [roi("Left Circumflex Artery", square(5, 19, 5, 6), Z_POSITIONS[3])]),
        (4, [roi("Left Coronary Artery", square(23, 23, 4, 4), Z_POSITIONS[4]),
             roi("Aorta", square(1, 25, 5, 5), Z_POSITIONS[4])]),
        (1, [roi("Right Coronary Artery", square(14, 14, 5, 5), Z_POSITIONS[1] + 40.0)]),
    ]


@pytest.fixture
def gated_root(tmp_path):
    root = tmp_path / "Gated_release_final"
    write_series(root / "patient" / "7" / SERIES, patient_volume())
    write_xml(root / "calcium_xml" / "7.xml", patient_rois())
    return root


# --- pieces ---------------------------------------------------------------------------


def test_polygon_rasterisation_uses_pixel_centres():
    inside = rasterise_polygon(np.array(square(2, 3, 2, 4)), (8, 10))
    expected = np.zeros((8, 10), dtype=bool)
    expected[2:4, 3:7] = True
    np.testing.assert_array_equal(inside, expected)


def test_polygon_rasterisation_of_a_concave_polygon():
    # A "U": columns 1-5, rows 1-5, with the notch x in (2.5, 3.5), y < 3.5 cut out.
    u_shape = np.array([(0.5, 0.5), (2.5, 0.5), (2.5, 3.5), (3.5, 3.5), (3.5, 0.5), (5.5, 0.5),
                        (5.5, 5.5), (0.5, 5.5)])
    inside = rasterise_polygon(u_shape, (7, 7))
    expected = np.zeros((7, 7), dtype=bool)
    expected[1:6, 1:6] = True
    expected[1:4, 3] = False
    np.testing.assert_array_equal(inside, expected)


def test_polygon_rasterisation_of_a_triangle_and_degenerate_input():
    inside = rasterise_polygon(np.array([(0.0, 0.0), (4.0, 0.0), (0.0, 4.0)]), (6, 6))
    rows, cols = np.nonzero(inside)
    assert all(r + c < 4 for r, c in zip(rows, cols))  # strictly inside the hypotenuse
    assert inside[1, 1] and inside[2, 1] and not inside[2, 2]
    assert not rasterise_polygon(np.array([(1.0, 1.0), (3.0, 3.0)]), (6, 6)).any()


def test_reads_the_osirix_plist(gated_root):
    rois = read_calcium_xml(gated_root / "calcium_xml" / "7.xml")
    assert len(rois) == 7
    lcx = next(r for r in rois if r.name == "Left Circumflex Artery")
    assert lcx.vessel_label == 3  # LCX, not LM (a bug of one public parser)
    assert lcx.image_index == 3 and lcx.z_mm == pytest.approx(Z_POSITIONS[3])
    assert lcx.points_px.shape == (4, 2) and lcx.points_px[0] == pytest.approx((18.5, 4.5))
    labels = {r.name: r.vessel_label for r in rois}
    assert labels["Left Coronary Artery"] == 1 and labels["Left Anterior Descending Artery"] == 2
    assert labels["Right Coronary Artery"] == 4 and labels["Aorta"] is None


def test_reads_the_dicom_series_sorted_and_rescaled(gated_root):
    series = read_dicom_series(gated_root / "patient" / "7" / SERIES)
    np.testing.assert_allclose(series.volume.z_positions_mm, Z_POSITIONS)
    np.testing.assert_allclose(series.volume.hu, patient_volume())
    assert series.volume.spacing_mm == (3.0, PIXEL_MM, PIXEL_MM)
    assert series.volume.slice_thickness_mm == 3.0 and series.kvp == 120


def _volume():
    return Volume(hu=np.zeros((5, SIZE, SIZE), np.float32), spacing_mm=(3.0, PIXEL_MM, PIXEL_MM),
                  z_positions_mm=np.array(Z_POSITIONS))


def _roi(label, polygon, image_index=0, z_mm=None):
    return CocaRoi(image_index, "", label, np.array(polygon, dtype=float), z_mm)


def test_rois_on_one_slice_are_united_and_never_overwritten():
    rois = [_roi(4, square(2, 2, 4, 4), z_mm=-94.0), _roi(4, square(4, 4, 4, 4), z_mm=-94.0)]
    labels, unplaced = label_volume(rois, _volume())
    assert unplaced == 0
    assert (labels[2] == 4).sum() == 16 + 16 - 4  # two 4x4 squares overlapping in 2x2
    assert labels[2, 2, 2] == 4 and labels[2, 7, 7] == 4


def test_overlapping_vessels_give_the_pixel_to_the_lower_label_in_any_order():
    lad, lcx = _roi(2, square(2, 2, 4, 4), z_mm=-97.0), _roi(3, square(4, 4, 4, 4), z_mm=-97.0)
    for order in ([lad, lcx], [lcx, lad]):
        labels, _ = label_volume(order, _volume())
        assert labels[1, 4, 4] == 2 and labels[1, 7, 7] == 3 and labels[1, 2, 2] == 2


def test_slices_match_on_point_mm_z_and_fall_back_to_image_index():
    by_z = _roi(1, square(2, 2, 2, 2), image_index=4, z_mm=-100.0)  # z wins over a wrong index
    by_index = _roi(2, square(6, 6, 2, 2), image_index=0)  # no Point_mm: index 0 = most inferior
    off_grid = _roi(3, square(10, 10, 2, 2), image_index=2, z_mm=-50.0)
    labels, unplaced = label_volume([by_z, by_index, off_grid], _volume())
    assert labels[0, 2, 2] == 1 and labels[4].max() == 0
    assert labels[0, 6, 6] == 2
    assert unplaced == 1 and labels.max(axis=(1, 2)).tolist() == [2, 0, 0, 0, 0]


# --- one patient and the command ---------------------------------------------------------


def test_scores_a_patient_by_hand(gated_root, tmp_path):
    row = score_patient(gated_root, "7", labels_dir=tmp_path / "labels")
    assert row["status"] == "ok" and row["status_reason"] is None
    assert row["series"] == SERIES
    for vessel, expected in EXPECTED.items():
        assert row[f"agatston_{vessel}"] == pytest.approx(expected), vessel
    total = sum(EXPECTED.values())  # 36.75
    assert row["agatston_total"] == pytest.approx(total)
    assert row["lesion_count"] == 5
    assert row["volume_mm3"] == pytest.approx((16 + 9 + 8 + 12 + 4) * 0.25 * 3.0)
    assert (row["risk_category"], row["cac_drs"]) == ("11-100", "A1/N4")
    assert (row["n_rois"], row["n_unmatched_rois"], row["n_unknown_rois"]) == (7, 1, 1)
    assert row["threshold_hu"] == 130 and row["kvp"] == 120 and row["slice_thickness_mm"] == 3.0

    labels = load_nifti(tmp_path / "labels" / "7.nii.gz")
    np.testing.assert_allclose(labels.z_positions_mm, Z_POSITIONS)
    assert labels.hu[0, 5, 5] == 2 and labels.hu[3, 7, 21] == 3 and labels.hu[4, 24, 24] == 1
    assert labels.hu[2, 11, 11] == 4 and labels.hu[2, 21, 12] == 4
    assert labels.hu[4, 3, 27] == 0  # the 'Aorta' ROI is not a coronary label


def test_broken_or_missing_inputs_fail_with_a_reason(gated_root):
    write_xml(gated_root / "calcium_xml" / "8.xml", patient_rois())  # no DICOM folder
    write_series(gated_root / "patient" / "9" / SERIES, patient_volume())  # no XML
    (gated_root / "patient" / "10" / SERIES).mkdir(parents=True)
    (gated_root / "patient" / "10" / SERIES / "IM-0001-0001.dcm").write_bytes(b"not a DICOM file")
    write_xml(gated_root / "calcium_xml" / "10.xml", patient_rois())
    write_series(gated_root / "patient" / "11" / SERIES, patient_volume())
    (gated_root / "calcium_xml" / "11.xml").write_text("<plist><dict><key>Images")

    reasons = {coca_id: score_patient(gated_root, coca_id) for coca_id in ("8", "9", "10", "11")}
    assert all(row["status"] == "failed" for row in reasons.values())
    assert "patient/8" in reasons["8"]["status_reason"]
    assert "calcium_xml/9.xml" in reasons["9"]["status_reason"]
    assert reasons["10"]["status_reason"].startswith("DICOM series failed")
    assert reasons["11"]["status_reason"].startswith("calcium_xml failed")
    assert reasons["11"]["agatston_total"] is None


def test_coca_reference_command_writes_one_row_per_patient(gated_root, tmp_path):
    write_xml(gated_root / "calcium_xml" / "8.xml", patient_rois())  # DICOM missing
    out = tmp_path / "refs" / "refs.parquet"
    code = cli.main(["coca-reference", str(gated_root), "--out", str(out), "--labels-dir", str(tmp_path / "lab")])
    assert code == 0
    table = pq.read_table(out)
    assert table.schema.equals(reference_schema())
    rows = {row["coca_id"]: row for row in table.to_pylist()}
    assert set(rows) == {"7", "8"}
    assert rows["7"]["status"] == "ok" and rows["7"]["agatston_lcx"] == pytest.approx(6.0)
    assert rows["8"]["status"] == "failed" and rows["8"]["agatston_total"] is None
    assert "lesions" not in table.column_names
    assert (tmp_path / "lab" / "7.nii.gz").is_file()
    assert not [p for p in out.parent.iterdir() if p.name != "refs.parquet"]  # no temp file left


def test_coca_reference_command_rejects_a_wrong_root(tmp_path, capsys):
    assert cli.main(["coca-reference", str(tmp_path), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "neither calcium_xml/ nor patient/" in capsys.readouterr().err
