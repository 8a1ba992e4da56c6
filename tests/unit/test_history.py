from datetime import datetime, timedelta, timezone

from cacflow.history import purge_withdrawn, record_update, runs_rows

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def scan(pid, visit="V1", status="scored", minutes=0):
    return {"participant_id": pid, "visit": visit, "status": status, "processed_at": T0 + timedelta(minutes=minutes)}


PROVENANCE = {"pipeline_version": "x", "model_version": "m", "model_sha256": "h", "engine": "e", "settings_hash": "s"}


def test_updates_record_added_rescored_removed_withdrawn_and_failed(tmp_path):
    first = record_update(tmp_path, [scan("A"), scan("B"), scan("C")], set(), PROVENANCE)
    assert first["n_added"] == 3 and first["n_rescored"] == 0 and first["n_removed"] == 0
    # D is new and failed, B was processed again, C left the manifest, A is unchanged.
    second = record_update(tmp_path, [scan("A"), scan("B", minutes=5), scan("D", status="failed")], set(), PROVENANCE)
    assert second["added_scans"] == ["D\0V1"] and second["rescored_scans"] == ["B\0V1"]
    assert second["removed_scans"] == ["C\0V1"] and second["failed_scans"] == ["D\0V1"]
    assert (second["n_scans"], second["n_failed"], second["n_withdrawn"]) == (3, 1, 0)
    rows = runs_rows(tmp_path)
    assert [row["added_scans"] for row in rows] == ["A/V1;B/V1;C/V1", "D/V1"]


def test_withdrawn_participants_are_counted_never_listed_and_purged_from_history(tmp_path):
    record_update(tmp_path, [scan("A"), scan("W")], set(), PROVENANCE)
    update = record_update(tmp_path, [scan("A")], {"W"}, PROVENANCE)
    purge_withdrawn(tmp_path, {"W"})
    assert update["n_withdrawn"] == 1 and update["removed_scans"] == [] and "W" not in str(update)
    text = "".join(path.read_text() for path in tmp_path.iterdir())
    assert "W\\u0000" not in text and '"W"' not in text
    assert all("W/" not in (row["added_scans"] or "") for row in runs_rows(tmp_path))


def test_withdrawal_without_purge_is_counted_as_withdrawn(tmp_path):
    record_update(tmp_path, [scan("A"), scan("W")], set(), PROVENANCE)
    update = record_update(tmp_path, [scan("A")], {"W"}, PROVENANCE)
    assert update["n_withdrawn"] == 1 and update["n_removed"] == 1 and update["removed_scans"] == []
