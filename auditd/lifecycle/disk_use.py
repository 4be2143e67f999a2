"""Disk use as `du` counts it (allocated blocks), broken down the way an operator asks
about it: the database, its WAL, each sealed partition, the journal, the dead-letter
fallback file, the archive, and the rest (keys, backups, leftovers).

interfaces.md: disk use, for `retention.max_bytes` and in `/stats`, is the allocated
blocks of every file under `storage.path` and `retention.archive_dir`. A file counts
once however many names it has (hard links), as du counts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DATABASE = "auditd.db"
_WAL_SUFFIXES = ("-wal", "-shm")
_FALLBACK = "dead-letters.fallback"
_ASIDE = ("restore-replaced-", f"{_DATABASE}.pre-migrate-")


@dataclass(slots=True)
class DiskUse:
    database: int = 0
    wal: int = 0
    partitions: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    journal: int = 0
    dead_letters: int = 0
    archive: int = 0
    # Files directly in the archive directory, name -> bytes: only those may retention
    # delete (what is in its subdirectories counts, but is not retention's).
    archive_files: dict[str, int] = field(default_factory=dict)
    # Copies kept aside under storage.path: a restore's replaced store, the backups
    # taken before migrations. They count (du counts them); nothing deletes them.
    aside: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return (self.database + self.wal + sum(self.partitions.values()) + self.journal
                + self.dead_letters + self.archive + self.aside + self.other)

    def document(self) -> dict[str, Any]:
        return {"total": self.total, "database": self.database, "wal": self.wal,
                "partitions": sum(self.partitions.values()),
                "partition_files": len(self.partitions), "journal": self.journal,
                "dead_letters": self.dead_letters, "archive": self.archive,
                "archive_files": len(self.archive_files), "aside": self.aside,
                "other": self.other}


def _files(root: Path) -> list[tuple[Path, os.stat_result]]:
    found = []
    for directory, _, names in os.walk(root):  # no symlinks followed, as du
        for name in names:
            path = Path(directory, name)
            try:
                found.append((path, path.lstat()))
            except FileNotFoundError:  # gone meanwhile (a journal segment, a temp file)
                continue
    return found


def measure(storage: Path, archive_dir: Path | None) -> DiskUse:
    """Walk both directories (blocking: call it in a thread)."""
    use = DiskUse()
    seen: set[tuple[int, int]] = set()
    archive = archive_dir.resolve() if archive_dir is not None else None
    roots = [storage] + ([archive] if archive is not None else [])
    for root in roots:
        for path, stat in _files(root):
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            _count(use, storage, archive, path, stat.st_blocks * 512)
    return use


def _count(use: DiskUse, storage: Path, archive: Path | None, path: Path, size: int) -> None:
    if archive is not None and path.resolve().is_relative_to(archive):
        use.archive += size
        if path.resolve().parent == archive:
            use.archive_files[path.name] = size
        return
    relative = path.relative_to(storage).parts
    top = relative[0]
    if top == _DATABASE:
        use.database += size
    elif top.startswith(_DATABASE) and top[len(_DATABASE):] in _WAL_SUFFIXES:
        use.wal += size
    elif top == "partitions" and len(relative) == 2:
        use.partitions[relative[1]] = size
    elif top == "journal":
        use.journal += size
    elif top == _FALLBACK:
        use.dead_letters += size
    elif top.startswith(_ASIDE):
        use.aside += size
    else:
        use.other += size
