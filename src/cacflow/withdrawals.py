"""Withdrawn participants: delete everything cacflow derived from their scans.

Shard files are rewritten in stage order (members, discover, select, convert,
infer, score), so each file stays newer than the one it was made from and
Snakemake sees no reason to redo finished work. Image volumes (NIfTI CT and
label files) of withdrawn visits are deleted, and their entries are dropped from
the shard's discovery header cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("cacflow.withdrawals")

# Shard tables in the order the stages write them.
STAGE_TABLES = (
    "discover/series.parquet", "discover/visits.parquet", "select/series.parquet", "select/visits.parquet",
    "convert/visits.parquet", "infer/visits.parquet", "score/scans.parquet", "score/lesions.parquet",
)
IMAGE_COLUMNS = ("nifti_path", "labels_path", "unsure_labels_path")


def purge_shards(shards_dir: Path, withdrawn: set[str]) -> tuple[int, int]:
    """Remove withdrawn participants from every shard; return (visits removed, files deleted)."""
    from cacflow.pipeline import read_rows, write_rows
    from cacflow.sharding import MEMBERS_HEADER, read_members
    from cacflow.atomic import atomic_write_text
    from cacflow.header_cache import cache_path
    from cacflow.header_cache import prune as prune_header_cache

    if not withdrawn:
        return 0, 0
    n_visits = n_files = 0
    for members_path in sorted(Path(shards_dir).glob("s*/members.tsv")):
        members = read_members(members_path)
        kept = [entry for entry in members if entry.participant_id not in withdrawn]
        if len(kept) == len(members):
            continue
        n_visits += len(members) - len(kept)
        lines = ["\t".join(MEMBERS_HEADER)] + ["\t".join((e.participant_id, e.visit, e.dicom_dir)) for e in kept]
        atomic_write_text(members_path, "\n".join(lines) + "\n")
        # The discovery header cache (not a stage table) holds their files' headers too.
        prune_header_cache(cache_path(members_path.parent / "discover"), [entry.dicom_dir for entry in kept])
        for table in STAGE_TABLES:
            path = members_path.parent / table
            if not path.exists():
                continue
            rows = read_rows(path)
            for row in rows:
                if row.get("participant_id") in withdrawn:
                    for column in IMAGE_COLUMNS:
                        image = Path(row[column]) if row.get(column) else None
                        if image is not None and image.exists():
                            image.unlink()
                            n_files += 1
            write_rows([row for row in rows if row.get("participant_id") not in withdrawn], path)
    return n_visits, n_files
