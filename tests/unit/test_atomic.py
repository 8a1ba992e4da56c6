"""Atomic writes: a reader never sees a partial file, and what a killed writer
leaves behind is found and removed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from cacflow.atomic import atomic_write, atomic_write_text, remove_leftover_temp_files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "table.parquet"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_a_sigkilled_writer_leaves_a_temp_that_is_then_removed(tmp_path):
    target = tmp_path / "shard" / "select" / "visits.parquet"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from cacflow.atomic import atomic_write\n"
        f"with atomic_write({str(target)!r}) as handle:\n"
        "    handle.write(b'partial rows'); handle.flush(); print('writing', flush=True); time.sleep(60)\n"
    )], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = list(target.parent.glob(".visits.parquet.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()  # never under the final name
    (target.parent / ".keep.tmp").write_text("not ours")  # not an atomic_write temp name
    (target.parent / "other.parquet").write_text("a finished table")
    time.sleep(0.01)
    assert remove_leftover_temp_files(tmp_path) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".keep.tmp", "other.parquet"]
