from pathlib import Path

import pytest

from cacflow.manifest import ManifestError, read_manifest, read_withdrawals


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reads_rows_and_resolves_relative_folders(tmp_path):
    manifest = write(tmp_path / "m.tsv", "participant_id\tvisit\tdicom_dir\nP1\tV1\tdata/p1\nP2\tV1\t/abs/p2\n")
    entries, warnings = read_manifest(manifest)
    assert [(e.participant_id, e.visit) for e in entries] == [("P1", "V1"), ("P2", "V1")]
    assert entries[0].dicom_dir == str((tmp_path / "data" / "p1").resolve())
    assert entries[1].dicom_dir == "/abs/p2"
    assert warnings == []


def test_duplicate_rows_keep_the_first_and_say_so(tmp_path):
    manifest = write(tmp_path / "m.tsv", "participant_id\tvisit\tdicom_dir\nP1\tV1\t/a\nP1\tV1\t/b\nP1\tV2\t/a\n")
    entries, warnings = read_manifest(manifest)
    assert [(e.visit, e.dicom_dir) for e in entries] == [("V1", "/a"), ("V2", "/a")]
    assert len(warnings) == 1 and "line 3" in warnings[0] and "different folder" in warnings[0]


def test_wrong_header_names_the_missing_column(tmp_path):
    manifest = write(tmp_path / "m.tsv", "participant\tvisit\tdicom_dir\nP1\tV1\t/a\n")
    with pytest.raises(ManifestError, match="participant_id"):
        read_manifest(manifest)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.tsv")


def test_withdrawals_allow_a_header_and_blank_lines(tmp_path):
    path = write(tmp_path / "w.txt", "participant_id\nP1\n\n P7 \n")
    assert read_withdrawals(path) == {"P1", "P7"}
    assert read_withdrawals("") == set()
