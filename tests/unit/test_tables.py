"""The column contract: declared columns, casting, validation, atomic Parquet writes."""

from __future__ import annotations

import datetime as dt
import os

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from cacflow import tables
from cacflow.tables import SchemaError

UTC = dt.timezone.utc

# The required columns of the brief, with their types: a rename or retype must fail here.
F64, STR, I32, BOOL = pa.float64(), pa.string(), pa.int32(), pa.bool_()
REQUIRED = {
    "scans": {
        "participant_id": STR, "visit": STR, "series_instance_uid": STR, "status": STR,
        "status_reason": STR, "agatston_total": F64, "agatston_lm": F64, "agatston_lad": F64,
        "agatston_lcx": F64, "agatston_rca": F64, "volume_mm3": F64, "mass_mg": F64,
        "lesion_count": I32, "risk_category": STR, "cac_drs": STR, "gated": BOOL, "kvp": F64,
        "slice_thickness_mm": F64, "slice_increment_mm": F64, "engine": STR,
        "model_version": STR, "pipeline_version": STR,
        "processed_at": pa.timestamp("us", tz="UTC"), "scan_type": STR,
        "gating_confidence": STR, "qc_status": STR, "qc_reasons": STR, "manufacturer": STR,
        "scanner_model": STR, "mass_calibration_source": STR,
        "mass_calibration_mg_per_hu_mm3": F64, "threshold_hu": F64, "min_area_mm2": F64,
        "kvp_adjusted": BOOL, "shard": STR, "settings_hash": STR, "model_sha256": STR,
        "reference_agatston_total": F64, "reference_risk_category": STR,
    },
    "lesions": {
        "participant_id": STR, "visit": STR, "lesion_id": I32, "vessel": STR,
        "slice_index": I32, "z_mm": F64, "area_mm2": F64, "peak_hu": F64, "mean_hu": F64,
        "density_weight": pa.int8(), "agatston": F64, "volume_mm3": F64, "mass_mg": F64,
    },
    "series": {
        "participant_id": STR, "visit": STR, "series_instance_uid": STR, "series_number": I32,
        "series_description": STR, "modality": STR, "image_type": STR, "manufacturer": STR,
        "scanner_model": STR, "kvp": F64, "slice_thickness_mm": F64, "slice_increment_mm": F64,
        "n_slices": I32, "pixel_spacing_mm": F64, "rows": I32, "columns": I32,
        "z_extent_mm": F64, "convolution_kernel": STR, "contrast_agent_tag": BOOL,
        "gated": BOOL, "gating_confidence": STR, "gating_evidence": STR, "scan_type": STR,
        "transfer_syntax": STR, "qc_status": STR, "qc_reasons": STR, "qc_messages": STR,
        "chosen": BOOL, "selection_rank": I32, "not_chosen_reason": STR,
    },
    "runs": {
        "run_id": STR, "started_at": pa.timestamp("us", tz="UTC"),
        "finished_at": pa.timestamp("us", tz="UTC"), "pipeline_version": STR,
        "model_version": STR, "n_scans": I32, "n_scored": I32, "n_not_scorable": I32,
        "n_failed": I32, "n_added": I32, "n_removed": I32,
    },
}


def scored_row(**overrides) -> dict:
    row = {
        "participant_id": "P001", "visit": "baseline", "series_instance_uid": "1.2.3",
        "status": "scored", "agatston_total": 123.5, "agatston_lad": 100.0, "agatston_rca": 23.5,
        "lesion_count": 4, "risk_category": "101-400", "cac_drs": "A2/N2", "gated": True,
        "kvp": 120.0, "processed_at": dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    }
    row.update(overrides)
    return row


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_required_column_is_declared_with_its_type(name):
    declared = {c.name: c.arrow_type for c in tables.columns(name)}
    for column, arrow_type in REQUIRED[name].items():
        assert column in declared, f"{name}.{column} missing"
        assert declared[column].equals(arrow_type), f"{name}.{column}: {declared[column]}"
    assert tables.empty_table(name).schema.names == list(declared)


def test_columns_are_unique_and_documented():
    for name, cols in tables.TABLES.items():
        names = [c.name for c in cols]
        assert len(names) == len(set(names)), name
        assert all(c.definition.strip() for c in cols), name
        assert set(tables.TABLE_KEYS[name]) <= set(names)


def test_missing_optional_columns_become_null():
    table = tables.to_arrow("scans", [scored_row()])
    row = table.to_pylist()[0]
    assert row["agatston_lm"] is None and row["mass_mg"] is None and row["engine"] is None
    assert row["lesion_count"] == 4
    assert table.schema.field("lesion_count").type == pa.int32()


def test_nan_becomes_null_and_dataframe_input_is_accepted():
    frame = pd.DataFrame([scored_row(mass_mg=float("nan")), scored_row(visit="followup", lesion_count=None)])
    table = tables.to_arrow("scans", frame)
    assert table.column("mass_mg").null_count == 2
    assert table.column("lesion_count").to_pylist() == [4, None]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"surprise": 1}, "undeclared"),
        ({"status": "done"}, "status"),
        ({"lesion_count": 1.5}, "lesion_count"),
        ({"agatston_total": "12"}, "agatston_total"),
        ({"processed_at": dt.datetime(2026, 1, 1)}, "naive"),
        ({"participant_id": None}, "participant_id"),
        ({"agatston_total": -1.0}, "below 0"),
        ({"cac_drs": "A3/N0"}, "cac_drs"),
    ],
)
def test_contract_violations_raise(overrides, message):
    with pytest.raises(SchemaError, match=message):
        tables.to_arrow("scans", [scored_row(**overrides)])


def test_duplicate_keys_raise():
    with pytest.raises(SchemaError, match="duplicated"):
        tables.to_arrow("scans", [scored_row(), scored_row()])


def test_validate_rejects_a_table_built_elsewhere():
    table = tables.to_arrow("scans", [scored_row()])
    with pytest.raises(SchemaError, match="type"):
        tables.validate("scans", table.set_column(0, "participant_id", pa.array([1])))
    with pytest.raises(SchemaError, match="missing"):
        tables.validate("scans", table.drop_columns(["kvp"]))


def test_parquet_round_trip_through_duckdb(tmp_path):
    rows = [
        scored_row(),
        {"participant_id": "P002", "visit": "baseline", "status": "not_scorable",
         "status_reason": "No axial non-contrast CT series was found in the visit folder."},
    ]
    path = tables.write_table("scans", rows, tmp_path / "scans.parquet")
    back = tables.read_parquet(path)
    assert back.equals(tables.to_arrow("scans", rows))
    tables.validate("scans", back)

    query = (
        "select participant_id, status, agatston_total, lesion_count, gated, processed_at, "
        f"mass_mg from read_parquet('{path}') order by participant_id"
    )
    relation = duckdb.sql(query)
    assert [str(t) for t in relation.types] == [
        "VARCHAR", "VARCHAR", "DOUBLE", "INTEGER", "BOOLEAN", "TIMESTAMP WITH TIME ZONE", "DOUBLE",
    ]
    first, second = relation.fetchall()
    assert first[:5] == ("P001", "scored", 123.5, 4, True)
    assert first[5] == dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert first[6] is None
    assert second[:5] == ("P002", "not_scorable", None, None, None)


def test_lesion_density_weight_is_a_small_integer_in_duckdb(tmp_path):
    lesion = {"participant_id": "P001", "visit": "baseline", "lesion_id": 1, "vessel": "lad",
              "density_weight": 3, "area_mm2": 2.5, "agatston": 7.5}
    path = tables.write_table("lesions", [lesion], tmp_path / "lesions.parquet")
    types = duckdb.sql(f"select density_weight, lesion_id from read_parquet('{path}')").types
    assert [str(t) for t in types] == ["TINYINT", "INTEGER"]


def test_failed_conversion_leaves_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "scans.parquet"
    tables.write_table("scans", [scored_row()], path)
    before = path.read_bytes()
    with pytest.raises(SchemaError):
        tables.write_table("scans", [scored_row(agatston_total="not a number")], path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["scans.parquet"]


def test_write_failing_midway_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "scans.parquet"
    tables.write_table("scans", [scored_row()], path)
    before = path.read_bytes()
    big = tables.to_arrow("scans", [scored_row(participant_id=f"P{i:04d}") for i in range(50)])

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    # The temp file holds the complete new table when fsync fails: the worst moment.
    monkeypatch.setattr(tables.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        tables.write_parquet_atomic(big, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["scans.parquet"]


def test_written_file_has_the_permissions_of_any_other_output(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = tables.write_table("runs", [{"run_id": "r1"}], tmp_path / "runs.parquet")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
