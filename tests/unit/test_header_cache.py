"""The discovery header cache: unchanged files are not read again, changed ones are,
and discovery gives the same answer with or without the cache.

Files are real DICOM written by cacflow's generator (and pydicom's own test files);
headers are counted by wrapping the one function discovery reads them with.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

import cacflow.discover
from cacflow import header_cache
from cacflow.dicom_headers import read_header
from cacflow.discover import discover_visit
from cacflow.header_cache import CACHE_FILE, HeaderCache, cache_path, prune
from cacflow.synth.dicom_writer import SliceStack, uid, write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PLANTED = {"PatientName": "ZQXCACHE^LEAK", "PatientID": "ZQXCACHEPID", "PatientBirthDate": "19230517",
           "InstitutionName": "ZQXCACHE HOSPITAL", "AccessionNumber": "ZQXCACHEACC"}
OLD_NS = 1_600_000_000 * 10**9  # 2020: archive files are old


def tiny_series(folder: Path, series: str, n_slices: int = 12, naming: str = "IM", **acquisition) -> list[Path]:
    """A small but complete CT series (8 x 8 pixels) written by cacflow's DICOM generator."""
    hu = np.full((n_slices, 8, 8), -1000.0, dtype=np.float32)
    positions = np.array([[0.0, 0.0, 3.0 * i] for i in range(n_slices)])
    stack = SliceStack(hu, positions, AXIAL, (0.7, 0.7), 3.0, 3.0)
    return write_series(stack, folder, series_kind="calcium_score", uids={"study": uid("study"), "series": uid(series)},
                        tags=PLANTED, naming=naming, acquisition={"gated": True, **acquisition})


def age(folder: Path, ns: int = OLD_NS) -> None:
    """Give every file an old modification time, as in an archive (see RACY_WINDOW_NS)."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(ns, ns))


@pytest.fixture
def visit(tmp_path) -> Path:
    folder = tmp_path / "archive" / "P001" / "baseline"
    tiny_series(folder / "ser1", "casc")
    tiny_series(folder / "ser2", "chest", n_slices=6, naming="bare")
    (folder / "README.txt").write_text("exported by the PACS\n")  # not DICOM: cached with its reason
    (folder / "empty").write_bytes(b"")
    age(folder)
    return folder


@pytest.fixture
def counted_reads(monkeypatch) -> list[str]:
    """Every path discovery reads a header from, in order."""
    reads: list[str] = []

    def counting(path):
        reads.append(os.fspath(path))
        return read_header(path)

    monkeypatch.setattr(cacflow.discover, "read_header", counting)
    return reads


def files_of(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()}


def discover_cached(folder: Path, cache_file: Path):
    cache = HeaderCache.load(cache_file)
    found = discover_visit(folder, cache=cache)
    cache.save()
    return found, cache


def test_rediscovering_an_unchanged_folder_reads_no_header(visit, tmp_path, counted_reads):
    cache_file = tmp_path / CACHE_FILE
    first, cache = discover_cached(visit, cache_file)
    assert sorted(counted_reads) == sorted(files_of(visit)) and (cache.reads, cache.hits) == (20, 0)
    assert cache_file.exists()

    counted_reads.clear()
    second, cache = discover_cached(visit, cache_file)
    assert counted_reads == [] and (cache.reads, cache.hits) == (0, 20)
    uncached = discover_visit(visit)
    assert second == first == uncached
    assert [s.files for s in second.series] == [s.files for s in uncached.series]
    assert second.unreadable == uncached.unreadable == [(str(visit / "README.txt"), "not_dicom"),
                                                        (str(visit / "empty"), "empty_file")]


def test_a_reader_that_fails_proves_nothing_is_read(visit, tmp_path, monkeypatch):
    cache_file = tmp_path / CACHE_FILE
    discover_cached(visit, cache_file)

    def refuse(path):
        raise AssertionError(f"header read from {path}")

    monkeypatch.setattr(cacflow.discover, "read_header", refuse)
    found, _ = discover_cached(visit, cache_file)
    assert sorted(s.n_files for s in found.series) == [6, 12]
    monkeypatch.undo()
    assert found == discover_visit(visit)


def test_changed_new_and_deleted_files_exactly(visit, tmp_path, counted_reads):
    cache_file = tmp_path / CACHE_FILE
    discover_cached(visit, cache_file)
    ser1 = sorted((visit / "ser1").iterdir())
    touched, replaced, deleted = ser1[0], ser1[1], ser1[2]
    os.utime(touched, ns=(OLD_NS + 10**9, OLD_NS + 10**9))  # same bytes, new time
    ds = pydicom.dcmread(replaced)  # same size and time, new content: a stray file of another series
    ds.SeriesInstanceUID = uid("stray")
    ds.save_as(replaced)
    os.utime(replaced, ns=(OLD_NS + 2 * 10**9, OLD_NS + 2 * 10**9))
    deleted.unlink()
    added = visit / "ser2" / "late_arrival.dcm"
    shutil.copy(visit / "ser1" / "IM-0001-0012.dcm", added)
    os.utime(added, ns=(OLD_NS, OLD_NS))

    counted_reads.clear()
    found, cache = discover_cached(visit, cache_file)
    assert sorted(counted_reads) == sorted(map(str, (touched, replaced, added)))
    assert (cache.reads, cache.hits) == (3, 17)
    assert found == discover_visit(visit)
    by_uid = {s.series_uid: s for s in found.series}
    assert by_uid[uid("stray")].files == [str(replaced)]
    assert by_uid[uid("casc")].n_duplicate_files == 1  # the added copy
    cached_paths = set(pq.read_table(cache_file, columns=["path"]).column("path").to_pylist())
    assert cached_paths == files_of(visit) and str(deleted) not in cached_paths

    counted_reads.clear()
    assert discover_cached(visit, cache_file)[0] == found and counted_reads == []


def test_same_size_and_time_is_trusted_so_fresh_files_are_not_cached(visit, tmp_path, counted_reads):
    """A file rewritten within the clock's resolution keeps size and time: files modified
    less than RACY_WINDOW_NS before they were read are read again next time."""
    cache_file = tmp_path / CACHE_FILE
    fresh = sorted((visit / "ser1").iterdir())[0]
    os.utime(fresh)  # now
    discover_cached(visit, cache_file)
    counted_reads.clear()
    discover_cached(visit, cache_file)
    assert counted_reads == [str(fresh)]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "directory", "other_reader", "wrong_columns"])
def test_a_broken_or_stale_cache_is_ignored(visit, tmp_path, counted_reads, damage, caplog):
    cache_file = tmp_path / CACHE_FILE
    first, _ = discover_cached(visit, cache_file)
    if damage == "garbage":
        cache_file.write_bytes(b"PAR1 this is not parquet")
    elif damage == "truncated":
        cache_file.write_bytes(cache_file.read_bytes()[: cache_file.stat().st_size // 2])
    elif damage == "empty":
        cache_file.write_bytes(b"")
    elif damage == "directory":
        cache_file.unlink()
        cache_file.mkdir()
    elif damage == "other_reader":
        table = pq.read_table(cache_file)
        pq.write_table(table.replace_schema_metadata({b"cacflow.header_cache": b"0123456789abcdef"}), cache_file)
    else:
        table = pq.read_table(cache_file)
        pq.write_table(table.drop_columns(["kvp"]).append_column("kvp", pa.array(["120"] * table.num_rows)),
                       cache_file)

    counted_reads.clear()
    cache = HeaderCache.load(cache_file)
    found = discover_visit(visit, cache=cache)
    assert len(counted_reads) == 20 and found == first
    saved = cache.save()
    if damage == "directory":
        assert not saved  # cannot replace a folder: a warning, not an error
        assert "not written" in caplog.text
    else:
        assert saved
        counted_reads.clear()
        assert discover_cached(visit, cache_file)[0] == first and counted_reads == []


def test_cache_rows_round_trip_every_kind_of_header(tmp_path):
    """pydicom's test files (Enhanced CT with per-frame positions, compressed, big endian,
    implicit VR, broken files) give the same record or reason from the cache as read."""
    import importlib.util

    sources = [Path(pydicom.data.__file__).parent / "test_files"]
    spec = importlib.util.find_spec("data_store")
    if spec and spec.origin:
        sources.append(Path(spec.origin).parent / "data")
    folder = tmp_path / "corpus"
    for source in sources:
        for path in source.rglob("*"):
            if path.is_file() and not path.name.endswith((".py", ".pyc", ".json")):
                target = folder / source.parent.name / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    age(folder)
    cache_file = tmp_path / CACHE_FILE
    discover_cached(folder, cache_file)
    folder_cache = HeaderCache.load(cache_file).folder(folder)
    n_records = n_reasons = 0
    for path in sorted(files_of(folder)):
        cached = folder_cache.get(path, os.stat(path))
        assert cached == read_header(path), path
        n_records += cached[0] is not None
        n_reasons += cached[1] is not None
        if cached[0] is not None and cached[0].frame_positions:
            assert isinstance(cached[0].frame_positions[0], tuple)
    assert n_records > 50 and n_reasons > 5


def test_transient_failures_are_not_cached(tmp_path):
    """permission_denied / unreadable change without the file changing: never cached."""
    path = tmp_path / "f.dcm"
    path.write_bytes(b"x")
    st = os.stat(path)
    folder_cache = HeaderCache().folder(tmp_path)
    for reason in ("permission_denied", "unreadable"):
        folder_cache.put(str(path), st, (None, reason), read_started_ns=st.st_mtime_ns + 10**12)
    assert folder_cache.table().num_rows == 0
    folder_cache.put(str(path), st, (None, "not_dicom"), read_started_ns=st.st_mtime_ns + 10**12)
    assert folder_cache.table().num_rows == 1


def test_the_cache_holds_header_fields_only_never_identifiers(visit, tmp_path):
    cache_file = tmp_path / CACHE_FILE
    discover_cached(visit, cache_file)
    assert pydicom.dcmread(next((visit / "ser1").iterdir())).PatientName == PLANTED["PatientName"]
    assert header_cache.missing_record_columns() == set()  # every HeaderRecord field has a column, no more
    assert pq.read_schema(cache_file).names == header_cache.SCHEMA.names
    data = cache_file.read_bytes()
    for value in PLANTED.values():
        assert value.encode() not in data
    table = pq.read_table(cache_file)
    text = " ".join(str(v) for column in table.columns for v in column.to_pylist())
    for marker in ("ZQXCACHE", "19230517"):
        assert marker not in text


def test_prune_drops_other_folders_and_deletes_an_unreadable_cache(tmp_path):
    keep, drop = tmp_path / "P001" / "v", tmp_path / "P002" / "v"
    tiny_series(keep, "a", n_slices=3)
    tiny_series(drop, "b", n_slices=3)
    age(tmp_path)
    cache = HeaderCache(tmp_path / CACHE_FILE)
    discover_visit(keep, cache=cache)
    discover_visit(drop, cache=cache)
    assert cache.save()
    prune(cache.path, [str(keep)])
    table = pq.read_table(cache.path)
    assert set(table.column("folder").to_pylist()) == {str(keep)}
    assert not any("P002" in path for path in table.column("path").to_pylist())
    cache.path.write_bytes(b"broken")
    prune(cache.path, [str(keep)])
    assert not cache.path.exists()


def test_stage_discover_keeps_the_shard_cache_beside_its_tables(visit, tmp_path, monkeypatch):
    from cacflow.pipeline import read_rows, stage_discover

    shard = tmp_path / "shards" / "s000001"
    shard.mkdir(parents=True)
    members = shard / "members.tsv"
    members.write_text(f"participant_id\tvisit\tdicom_dir\nP001\tbaseline\t{visit}\nP009\tbaseline\t{tmp_path / 'none'}\n")
    out = shard / "discover"
    stage_discover(members, out / "series.parquet", out / "visits.parquet")
    assert cache_path(out).exists()
    first = (read_rows(out / "series.parquet"), read_rows(out / "visits.parquet"))

    def refuse(path):
        raise AssertionError(f"header read from {path}")

    monkeypatch.setattr(cacflow.discover, "read_header", refuse)
    mtime = cache_path(out).stat().st_mtime_ns
    stage_discover(members, out / "series.parquet", out / "visits.parquet")
    assert (read_rows(out / "series.parquet"), read_rows(out / "visits.parquet")) == first
    assert cache_path(out).stat().st_mtime_ns == mtime  # nothing changed: not rewritten
    assert all(v["status"] != "failed" for v in first[1])


def test_withdrawal_purges_the_shard_cache(visit, tmp_path):
    from cacflow.pipeline import stage_discover
    from cacflow.withdrawals import purge_shards

    other = tmp_path / "archive" / "P002" / "baseline"
    tiny_series(other, "p2", n_slices=3)
    age(other)
    shard = tmp_path / "shards" / "s000001"
    shard.mkdir(parents=True)
    (shard / "members.tsv").write_text(
        f"participant_id\tvisit\tdicom_dir\nP001\tbaseline\t{visit}\nP002\tbaseline\t{other}\n")
    stage_discover(shard / "members.tsv", shard / "discover/series.parquet", shard / "discover/visits.parquet")
    folders = set(pq.read_table(shard / "discover" / CACHE_FILE).column("folder").to_pylist())
    assert folders == {str(visit), str(other)}
    purge_shards(tmp_path / "shards", {"P002"})
    folders = set(pq.read_table(shard / "discover" / CACHE_FILE).column("folder").to_pylist())
    assert folders == {str(visit)}
