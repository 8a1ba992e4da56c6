"""Cache of parsed DICOM headers, so that rediscovering unchanged folders reads no DICOM.

Discovery keeps one cache file per shard, beside the shard's discover tables
(``results/shards/<shard>/discover/header_cache.parquet``). It holds what
:func:`cacflow.dicom_headers.read_header` returned for every file the shard's last
discovery saw, keyed on the file's absolute path, size and modification time (ns):

- a file whose size and modification time are unchanged is not opened again;
- a changed or new file is read, and its entry replaced or added;
- entries of files that are gone, or of visit folders the shard no longer holds,
  are dropped when the cache is written back.

What is stored is exactly the :class:`~cacflow.dicom_headers.HeaderRecord` (the
header fields discovery uses, no patient identifiers: the record has no field for
them) or the reason a file was unusable. Files that could not be opened
(``permission_denied``, ``unreadable``) are not cached: fixing permissions does not
change a file's modification time. Nor are files modified less than
``RACY_WINDOW_NS`` before they were read (a file rewritten within the file system's
timestamp resolution could keep its size and time).

The cache is an optimisation, never a source of truth: a missing, corrupt or
unreadable cache file, or one written by another version of the header reader (its
fingerprint covers ``dicom_headers.py`` and the pydicom version), is ignored and the
headers are read again. It is written atomically, and only after the whole shard
was discovered.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cacflow.atomic import atomic_write_bytes
from cacflow.dicom_headers import REASON_PERMISSION, REASON_UNREADABLE, HeaderRecord

log = logging.getLogger("cacflow.header_cache")

CACHE_FILE = "header_cache.parquet"
FORMAT_VERSION = "1"
RACY_WINDOW_NS = 2_000_000_000  # coarse file-system clocks (FAT: 2 s) and rewrites within one tick
_UNCACHED_REASONS = frozenset({REASON_PERMISSION, REASON_UNREADABLE})  # transient: retried next time
_METADATA_KEY = b"cacflow.header_cache"

_F64, _I64, _STR = pa.float64(), pa.int64(), pa.string()
_KEY_COLUMNS = {"folder": _STR, "path": _STR, "size": _I64, "mtime_ns": _I64, "reason": _STR}
# Every HeaderRecord field except its path (the key holds it); tests check this stays complete.
RECORD_COLUMNS = {
    "sop_class_uid": _STR, "sop_instance_uid": _STR, "study_uid": _STR, "series_uid": _STR, "modality": _STR,
    "image_type": pa.list_(_STR), "series_description": _STR, "protocol_name": _STR, "manufacturer": _STR,
    "manufacturer_model": _STR, "kvp": _F64, "slice_thickness_mm": _F64, "spacing_between_slices_mm": _F64,
    "image_position": pa.list_(_F64), "image_orientation": pa.list_(_F64), "pixel_spacing_mm": pa.list_(_F64),
    "rows": _I64, "columns": _I64, "rescale_slope": _F64, "rescale_intercept": _F64,
    "pixel_representation": _I64, "bits_allocated": _I64, "convolution_kernel": _STR, "gantry_tilt_deg": _F64,
    "contrast_agent": _STR, "contrast_route": _STR, "cardiac_sync_technique": _STR, "trigger_time_ms": _F64,
    "nominal_cardiac_phase_pct": _F64, "heart_rate_bpm": _F64, "scan_options": _STR, "number_of_frames": _I64,
    "instance_number": _I64, "acquisition_number": _I64, "series_number": _I64, "transfer_syntax": _STR,
    "frame_positions": pa.list_(pa.list_(_F64)), "pixel_data_truncated": pa.bool_(),
}
_TUPLE_COLUMNS = ("image_type", "image_position", "image_orientation", "pixel_spacing_mm")
SCHEMA = pa.schema([pa.field(name, kind) for name, kind in {**_KEY_COLUMNS, **RECORD_COLUMNS}.items()])

Result = tuple[HeaderRecord | None, str | None]  # what read_header returns


def cache_path(discover_dir: str | os.PathLike) -> Path:
    """The cache file of the shard whose discover tables are in ``discover_dir``."""
    return Path(discover_dir) / CACHE_FILE


def missing_record_columns() -> set[str]:
    """HeaderRecord fields the cache has no column for (and columns of no field): must be empty."""
    expected = {f.name for f in fields(HeaderRecord) if f.name != "path"}
    return expected ^ set(RECORD_COLUMNS)


# A HeaderRecord field without a column would be lost on the way through the cache:
# then the cache stays off (the unit tests fail on this).
ENABLED = not missing_record_columns()


@lru_cache(maxsize=1)
def reader_fingerprint() -> str:
    """Changes whenever cached records could differ: the header reader's code or pydicom."""
    import pydicom

    from cacflow import dicom_headers

    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{pydicom.__version__}\0".encode())
    try:
        digest.update(Path(dicom_headers.__file__).read_bytes())
    except OSError:  # not installed as files: fall back to the package version
        from cacflow import __version__

        digest.update(__version__.encode())
    return digest.hexdigest()[:16]


class FolderCache:
    """The cached entries of one visit folder, for one discovery of it.

    ``get`` answers from the cache when the file is unchanged; ``put`` records a
    header that was read. Only entries looked up in this discovery are written back.
    """

    def __init__(self, folder: str, old: pa.Table | None):
        self.folder = folder
        self._old = old
        self._index: dict[str, tuple[int, int, int]] = {}  # abs path -> (size, mtime_ns, row in old)
        if old is not None and old.num_rows:
            for row, (path, size, mtime) in enumerate(zip(old.column("path").to_pylist(),
                                                          old.column("size").to_pylist(),
                                                          old.column("mtime_ns").to_pylist())):
                self._index[path] = (size, mtime, row)
        self._columns: dict | None = None  # old rows as Python lists, converted on the first hit
        self._kept_rows: list[int] = []
        self._new: list[dict] = []
        self.hits = self.reads = 0

    def get(self, path: str, st: os.stat_result) -> Result | None:
        """The cached result for ``path`` if its size and modification time are unchanged, else None."""
        entry = self._index.get(os.path.abspath(path))
        if entry is None or entry[0] != st.st_size or entry[1] != st.st_mtime_ns:
            return None
        row = entry[2]
        if self._columns is None:
            self._columns = self._old.to_pydict()
        self._kept_rows.append(row)
        self.hits += 1
        return _result_from_row(path, self._columns, row)

    def put(self, path: str, st: os.stat_result, result: Result, read_started_ns: int) -> None:
        """Remember a header that was just read (unless it must not be cached)."""
        self.reads += 1
        record, reason = result
        if not ENABLED or reason in _UNCACHED_REASONS or st.st_mtime_ns > read_started_ns - RACY_WINDOW_NS:
            return
        row = {"folder": self.folder, "path": os.path.abspath(path), "size": st.st_size,
               "mtime_ns": st.st_mtime_ns, "reason": reason}
        if record is not None:
            row.update({name: getattr(record, name) for name in RECORD_COLUMNS})
        self._new.append(row)

    def table(self) -> pa.Table:
        """The entries to keep: the unchanged files' old rows, then the files read now."""
        pieces = []
        if self._kept_rows:
            pieces.append(self._old.take(sorted(set(self._kept_rows))))
        if self._new:
            pieces.append(_rows_to_table(self._new))
        return pa.concat_tables(pieces) if pieces else SCHEMA.empty_table()

    @property
    def changed(self) -> bool:
        n_old = self._old.num_rows if self._old is not None else 0
        return bool(self._new) or len(set(self._kept_rows)) != n_old


class HeaderCache:
    """The header cache of one shard. ``load`` never raises; ``save`` writes atomically."""

    def __init__(self, path: str | os.PathLike | None = None, table: pa.Table | None = None):
        self.path = Path(path) if path is not None else None
        self._table = table
        self._rows_by_folder: dict[str, list[int]] = {}
        if table is not None and table.num_rows:
            for row, folder in enumerate(table.column("folder").to_pylist()):
                self._rows_by_folder.setdefault(folder, []).append(row)
        self._done: dict[str, FolderCache] = {}
        self.hits = self.reads = 0

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeaderCache:
        """The cache at ``path``; an empty one if it is missing, unreadable or stale."""
        path = Path(path)
        if not ENABLED:
            return cls(path)
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            return cls(path)
        except Exception as error:  # noqa: BLE001 - a broken cache only costs a re-read
            log.warning("header cache %s is unreadable (%s: %s); all headers are read again",
                        path, type(error).__name__, error)
            return cls(path)
        fingerprint = (table.schema.metadata or {}).get(_METADATA_KEY, b"").decode(errors="replace")
        if fingerprint != reader_fingerprint():
            log.info("header cache %s was written by another version of the header reader; "
                     "all headers are read again", path)
            return cls(path)
        if not _schema_matches(table.schema):
            log.warning("header cache %s has unexpected columns; all headers are read again", path)
            return cls(path)
        return cls(path, table.select(SCHEMA.names))

    def folder(self, dicom_dir: str | os.PathLike) -> FolderCache:
        folder = os.path.abspath(dicom_dir)
        rows = self._rows_by_folder.get(folder)
        return FolderCache(folder, self._table.take(rows) if rows else None)

    def finish(self, folder_cache: FolderCache) -> None:
        """Keep a folder's entries (after its discovery completed)."""
        self._done[folder_cache.folder] = folder_cache
        self.hits += folder_cache.hits
        self.reads += folder_cache.reads

    @property
    def changed(self) -> bool:
        n_old = self._table.num_rows if self._table is not None else 0
        n_kept = sum(len(self._rows_by_folder.get(folder, ())) for folder in self._done)
        return any(cache.changed for cache in self._done.values()) or n_kept != n_old

    def save(self, path: str | os.PathLike | None = None) -> bool:
        """Write the entries of the folders discovered since loading (atomic). Returns
        False, and leaves the old file, when nothing changed or the cache could not be
        written (a warning, never an error: the cache only saves time)."""
        path = Path(path) if path is not None else self.path
        if path is None or (path == self.path and not self.changed and path.exists()):
            return False
        try:
            pieces = [self._done[folder].table() for folder in sorted(self._done)]
            table = pa.concat_tables(pieces) if pieces else SCHEMA.empty_table()
            _write(table, path)
        except Exception as error:  # noqa: BLE001
            log.warning("header cache %s not written (%s: %s)", path, type(error).__name__, error)
            return False
        return True


def prune(path: str | os.PathLike, keep_folders) -> None:
    """Drop the entries of visit folders not in ``keep_folders`` (after a withdrawal).

    A cache that cannot be read is deleted: it could hold withdrawn participants' entries.
    """
    path = Path(path)
    if not path.exists():
        return
    keep = {os.path.abspath(folder) for folder in keep_folders if folder}
    try:
        table = pq.read_table(path)
        folders = table.column("folder").to_pylist()
        rows = [row for row, folder in enumerate(folders) if folder in keep]
        if len(rows) != table.num_rows:
            _write(table.take(rows), path)
    except Exception as error:  # noqa: BLE001
        log.warning("header cache %s could not be pruned (%s); deleted", path, error)
        path.unlink(missing_ok=True)


def _schema_matches(schema: pa.Schema) -> bool:
    names = set(schema.names)
    return all(name in names and schema.field(name).type == field.type for name, field in
               zip(SCHEMA.names, SCHEMA))


def _rows_to_table(rows: list[dict]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=SCHEMA)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError):
        # A value Parquet cannot hold (a huge integer, an unencodable string): leave that
        # file out of the cache (it is read again next time) and keep the others.
        kept = []
        for row in rows:
            try:
                pa.Table.from_pylist([row], schema=SCHEMA)
            except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError):
                continue
            kept.append(row)
        return pa.Table.from_pylist(kept, schema=SCHEMA)


def _result_from_row(path: str, columns: dict, row: int) -> Result:
    reason = columns["reason"][row]
    if reason is not None:
        return None, reason
    values = {name: columns[name][row] for name in RECORD_COLUMNS}
    for name in _TUPLE_COLUMNS:
        if values[name] is not None:
            values[name] = tuple(values[name])
    values["frame_positions"] = tuple(tuple(p) for p in values["frame_positions"] or ())
    return HeaderRecord(path=path, **values), None


def _write(table: pa.Table, path: Path) -> None:
    table = table.replace_schema_metadata({_METADATA_KEY: reader_fingerprint().encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


