"""Append-only assignment of participant visits to shards.

A shard's ``members.tsv`` is written once and never changes, so finished shards
stay finished when the manifest grows: new visits go to new shards. ``plan.tsv``
lists the shard of every visit in the current manifest (visits removed from the
manifest drop out of the plan, and so out of the cohort tables).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from cacflow.atomic import atomic_write_text
from cacflow.manifest import VisitEntry

log = logging.getLogger("cacflow.sharding")
MEMBERS_HEADER = ("participant_id", "visit", "dicom_dir")


def existing_shards(shards_dir: Path) -> dict[str, list[VisitEntry]]:
    shards = {}
    for members in sorted(Path(shards_dir).glob("s*/members.tsv")):
        with open(members, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        shards[members.parent.name] = [VisitEntry(r["participant_id"], r["visit"], r["dicom_dir"]) for r in rows]
    return shards


def plan_shards(entries: list[VisitEntry], shards_dir: Path, shard_size: int) -> list[tuple[str, VisitEntry]]:
    """Assign every entry to a shard (creating shards for new entries only)."""
    shards_dir = Path(shards_dir)
    shards = existing_shards(shards_dir)
    assigned = {entry.key: shard for shard, members in shards.items() for entry in members}
    new_entries = [entry for entry in entries if entry.key not in assigned]
    next_number = 1 + max((int(name[1:]) for name in shards), default=0)
    for start in range(0, len(new_entries), shard_size):
        name = f"s{next_number:06d}"
        next_number += 1
        chunk = new_entries[start : start + shard_size]
        lines = ["\t".join(MEMBERS_HEADER)] + ["\t".join((e.participant_id, e.visit, e.dicom_dir)) for e in chunk]
        atomic_write_text(shards_dir / name / "members.tsv", "\n".join(lines) + "\n")
        for entry in chunk:
            assigned[entry.key] = name
        log.info("new shard %s with %d visits", name, len(chunk))
    changed = [
        e for e in entries
        if e.key in assigned and assigned[e.key] in shards
        and any(m.key == e.key and m.dicom_dir != e.dicom_dir for m in shards[assigned[e.key]])
    ]  # fmt: skip
    for entry in changed:
        log.warning(
            "participant %s visit %s: dicom_dir changed in the manifest; the shard keeps the folder it was "
            "first scored from (remove the shard folder to rescore)", entry.participant_id, entry.visit,
        )
    return [(assigned[entry.key], entry) for entry in entries]


def write_plan(plan: list[tuple[str, VisitEntry]], out_path: Path) -> None:
    lines = ["shard\tparticipant_id\tvisit"] + [f"{shard}\t{e.participant_id}\t{e.visit}" for shard, e in plan]
    atomic_write_text(out_path, "\n".join(lines) + "\n")


def read_members(path: Path) -> list[VisitEntry]:
    with open(path, newline="") as handle:
        return [VisitEntry(r["participant_id"], r["visit"], r["dicom_dir"]) for r in csv.DictReader(handle, delimiter="\t")]


def read_plan_keys(path: Path) -> set[tuple[str, str]]:
    with open(path, newline="") as handle:
        return {(r["participant_id"], r["visit"]) for r in csv.DictReader(handle, delimiter="\t")}
