"""Refusing, before it starts, work whose files would not fit on the disk: a run that
fills the disk hours in fails far from its cause, and can leave other jobs failing too."""

from __future__ import annotations

import shutil
from pathlib import Path


class NotEnoughDiskSpace(RuntimeError):
    """What is about to be written would not fit where it is to be written."""


def require_free_space(folder: str | Path, need_bytes: int, what: str, advice: str) -> None:
    """Raise NotEnoughDiskSpace, naming ``what`` needs how much, what is free and
    ``advice``, when ``folder``'s file system has less than ``need_bytes`` free."""
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise NotEnoughDiskSpace(f"{what} need about {need_bytes / 2**30:.1f} GiB in {folder}, but only "
                                 f"{free / 2**30:.1f} GiB are free there: {advice}")
