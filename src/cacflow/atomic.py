"""Atomic file writes: readers see the old file or the complete new one, never a
partial one, so a killed run never leaves a half-written output under its final
name."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary handle whose content appears at ``path`` only if the block
    succeeds: readers see the old file or the complete new one, never a partial
    one, and a failure leaves no temp file behind (temp file in the same
    directory, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Not tempfile.mkstemp: its 0600 mode would hide the tables from the rest of the
    # study group; 0666 minus the umask gives the permissions of any other output.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


# The temp names atomic_write uses: .<name>.<pid>.<8 hex>.tmp
_TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def remove_leftover_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temp files a killed writer left under ``folder`` (SIGKILL skips the
    clean-up above); returns how many. Call it only when no writer can be active there."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        if _TEMP_NAME.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX file systems; not possible on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
