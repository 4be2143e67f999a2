"""`POST /admin/backup`'s copy: the database through SQLite's online backup API, then
the sealed partitions its catalog names, beside it."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from auditd.errors import AuditdError
from auditd.status.source import ActionRefused
from auditd.store.sealing.catalog import PARTITIONS_DIR


def online_backup(source_path: Path, target: Path) -> int:
    """SQLite's online backup API in one step: one read transaction, so the copy is a
    consistent snapshot even while the writer commits (a stepped backup would restart
    on every commit made through another connection). Returns the copy's size."""
    if target.exists():
        raise ActionRefused(f"{target}: already exists; a backup never overwrites")
    if not target.parent.is_dir():
        raise ActionRefused(f"{target.parent}: no such directory")
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    destination = sqlite3.connect(target)
    try:
        source.backup(destination)
    except sqlite3.Error as exc:
        destination.close()
        target.unlink(missing_ok=True)
        raise AuditdError(f"backup to {target} failed: {exc}") from exc
    finally:
        destination.close()
        source.close()
    return target.stat().st_size + copy_partitions(source_path.parent, target)


def copy_partitions(storage: Path, target: Path) -> int:
    """The sealed partitions the copy's catalog names, into `partitions/` beside it (the
    layout of a storage directory). They are immutable, so copying them after the
    snapshot is as consistent as the snapshot. Their bytes."""
    copy = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
    try:
        files = [str(name) for (name,) in copy.execute("SELECT file FROM partitions")]
    finally:
        copy.close()
    total = 0
    if files:
        into = target.parent / PARTITIONS_DIR
        into.mkdir(exist_ok=True)
        for name in files:
            if (into / name).exists():
                raise ActionRefused(f"{into / name}: already exists; a backup never "
                                    "overwrites")
            shutil.copyfile(storage / PARTITIONS_DIR / name, into / name)
            total += (into / name).stat().st_size
    return total
