"""fsync of a file or a directory by path: what makes a write, a rename or an unlink
durable (a rename is on disk only once its directory is synced). A leaf module with no
imports of its own: the journal's segment directory uses it as the store's files do."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    fsync_path(path, directory=True)
