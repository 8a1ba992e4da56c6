"""The cohort manifest: participant visits and where their DICOM files are."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

REQUIRED_COLUMNS = ("participant_id", "visit", "dicom_dir")
log = logging.getLogger("cacflow.manifest")


class ManifestError(ValueError):
    """The manifest cannot be used at all (the message says how to fix it)."""


@dataclass(frozen=True)
class VisitEntry:
    participant_id: str
    visit: str
    dicom_dir: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.participant_id, self.visit)


def read_manifest(path: str | Path) -> tuple[list[VisitEntry], list[str]]:
    """Rows of the manifest and warnings about rows that were set aside.

    Relative ``dicom_dir`` paths are taken relative to the manifest's folder. A
    repeated (participant_id, visit) keeps its first row; the repeat is reported.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise ManifestError(
                f"manifest {path} must be tab-separated with header "
                f"'participant_id<TAB>visit<TAB>dicom_dir'; missing column(s): {', '.join(missing)}"
            )
        entries: dict[tuple[str, str], VisitEntry] = {}
        warnings: list[str] = []
        for line_number, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not any(row.values()):
                continue
            participant_id, visit, dicom_dir = (row.get(name, "") for name in REQUIRED_COLUMNS)
            if not participant_id or not visit:
                warnings.append(f"line {line_number}: empty participant_id or visit; row skipped")
                continue
            if dicom_dir and not Path(dicom_dir).is_absolute():
                dicom_dir = str((path.parent / dicom_dir).resolve())
            entry = VisitEntry(participant_id, visit, dicom_dir)
            if entry.key in entries:
                first = entries[entry.key]
                same = "same folder" if first.dicom_dir == dicom_dir else "a different folder"
                warnings.append(
                    f"line {line_number}: participant {participant_id} visit {visit} is listed again "
                    f"({same}); the first row is used"
                )
                continue
            entries[entry.key] = entry
    return list(entries.values()), warnings


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write a manifest TSV (the required columns, one row per visit); returns ``path``."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(REQUIRED_COLUMNS), delimiter="\t", lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_withdrawals(path: str | Path | None) -> set[str]:
    """Withdrawn participant ids: one per line, optional `participant_id` header."""
    if not path:
        return set()
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    ids = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    ids.discard("participant_id")
    return ids
