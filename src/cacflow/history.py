"""The update history of a cohort: one record per workflow update.

Each aggregation compares the scans it is about to write with the snapshot of
the previous update (``results/history/``, kept outside Snakemake's outputs so it
survives reruns) and records what was added, processed again, removed and failed.
``runs.parquet`` is rebuilt from these records. Withdrawn participants are purged
from the stored snapshots, so no history keeps their ids.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path

from cacflow.atomic import atomic_write_text

SEPARATOR = ";"
LIST_COLUMNS = ("added_scans", "rescored_scans", "failed_scans", "removed_scans")


def _key(row: dict) -> str:
    # JSON object keys must be strings; NUL never occurs in ids.
    return f"{row['participant_id']}\0{row['visit']}"


def _shown(key: str) -> str:
    return key.replace("\0", "/")


def _latest_snapshot(history_dir: Path) -> dict[str, dict]:
    snapshots = sorted(history_dir.glob("snapshot-*.json"))
    return json.loads(snapshots[-1].read_text()) if snapshots else {}


def record_update(history_dir: Path, scans: list[dict], withdrawn: set[str], provenance: dict) -> dict:
    """Compare ``scans`` with the previous update, store the record, return it."""
    history_dir = Path(history_dir)
    history_dir.mkdir(parents=True, exist_ok=True)
    previous = _latest_snapshot(history_dir)
    current = {
        _key(row): {"participant_id": row["participant_id"], "status": row["status"],
                    "processed_at": row["processed_at"].isoformat() if row.get("processed_at") else None}
        for row in scans
    }
    added = sorted(set(current) - set(previous))
    gone = sorted(set(previous) - set(current))
    withdrawn_gone = [key for key in gone if previous[key]["participant_id"] in withdrawn]
    removed = [key for key in gone if key not in withdrawn_gone]
    rescored = sorted(key for key in set(current) & set(previous)
                      if current[key]["processed_at"] != previous[key]["processed_at"])
    failed = sorted(key for key in added + rescored if current[key]["status"] == "failed")
    touched_times = [current[key]["processed_at"] for key in added + rescored if current[key]["processed_at"]]
    now = datetime.now(timezone.utc)
    statuses = [row["status"] for row in scans]
    # A sequence number first, so name order is update order even within one second.
    sequence = 1 + len(list(history_dir.glob("run-*.json")))
    run_id = f"{sequence:06d}-{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(2)}"
    record = {
        "run_id": run_id,
        "started_at": min(touched_times) if touched_times else now.isoformat(),
        "finished_at": now.isoformat(),
        **provenance,
        "n_scans": len(scans), "n_scored": statuses.count("scored"),
        "n_not_scorable": statuses.count("not_scorable"), "n_failed": statuses.count("failed"),
        "n_added": len(added), "n_rescored": len(rescored), "n_removed": len(gone),
        "n_withdrawn": len(withdrawn_gone),
        "added_scans": added, "rescored_scans": rescored, "failed_scans": failed, "removed_scans": removed,
    }
    atomic_write_text(history_dir / f"run-{run_id}.json", json.dumps(record, indent=1))
    atomic_write_text(history_dir / f"snapshot-{run_id}.json", json.dumps(current))
    return record


def purge_withdrawn(history_dir: Path, withdrawn: set[str]) -> None:
    """Remove withdrawn participants from every stored snapshot and run record."""
    if not withdrawn:
        return
    for path in Path(history_dir).glob("snapshot-*.json"):
        snapshot = json.loads(path.read_text())
        kept = {key: value for key, value in snapshot.items() if value["participant_id"] not in withdrawn}
        if len(kept) != len(snapshot):
            atomic_write_text(path, json.dumps(kept))
    for path in Path(history_dir).glob("run-*.json"):
        record = json.loads(path.read_text())
        changed = False
        for column in LIST_COLUMNS:
            kept = [key for key in record[column] if key.split("\0", 1)[0] not in withdrawn]
            if len(kept) != len(record[column]):
                record[column] = kept
                changed = True
        if changed:
            atomic_write_text(path, json.dumps(record, indent=1))


def runs_rows(history_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(history_dir).glob("run-*.json")):
        record = json.loads(path.read_text())
        for column in ("started_at", "finished_at"):
            record[column] = datetime.fromisoformat(record[column]) if record.get(column) else None
        for column in LIST_COLUMNS:
            record[column] = SEPARATOR.join(_shown(key) for key in record[column]) or None
        rows.append(record)
    return rows
