"""Durability on a local filesystem: what a rename or a new file needs to survive a crash."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries: a file fsync'd and renamed into it is not durable until its
    directory is (POSIX leaves the new entry in the page cache otherwise)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
