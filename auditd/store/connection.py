"""Connections to the store's database: the daemon's pragmas, the writer's connection
opened and migrated (after a backup of an older store), and the progress hook that lets
start-up tell a slow statement from a stuck one."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from auditd.store import migrations
from auditd.store.migrations.guard import backup_beside

log = structlog.get_logger("auditd.store.connection")

WRITER_CACHE_KB = 16 * 1024
# The WAL is copied into the database file by a thread of its own (checkpoint_forever),
# not by the writer's COMMIT: with SQLite's default (every 1000 pages) nearly every
# batch's COMMIT also ran a checkpoint, a quarter of the writer's time. The writer's own
# automatic checkpoint stays on as a backstop, far past where the thread keeps the WAL.
WAL_CHECKPOINT_PAGES = 16_384
# Start-up's long statements (quick_check, migrations, the id scan, index builds) call
# their progress handler this often, in SQLite VM steps: a few ms apart, cheap. Never on
# the hot path, where the callback's taking the GIL would stall the store's thread.
_PROGRESS_EVERY_STEPS = 1_000_000

Progress = Callable[[], None]


@contextlib.contextmanager
def watched(db: sqlite3.Connection, progress: Progress | None) -> Iterator[None]:
    """Call `progress` every _PROGRESS_EVERY_STEPS VM steps of `db`'s statements inside
    the block (on the thread running them), so start-up can tell slow from stuck."""
    if progress is None:
        yield
        return
    db.set_progress_handler(progress, _PROGRESS_EVERY_STEPS)
    try:
        yield
    finally:
        db.set_progress_handler(None, 0)


def connect_sync(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection with the daemon's pragmas (migrations, bench, recover)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=200")
    return conn


def open_writer(path: Path, progress: Progress | None = None) -> sqlite3.Connection:
    db = connect_sync(path)
    try:
        migrations.refuse_unknown(db, path)
        done = migrations.current(db)
        if done and migrations.pending(db):  # an older store: a copy of it first
            backup = backup_beside(path, done, migrations.LATEST)
            log.info("migration_backup_taken", path=str(backup), from_version=done,
                     to_version=migrations.LATEST)
        with watched(db, progress):
            migrations.migrate(db)
        # Inserts touch a leaf of every index at a random place: once the indexes
        # outgrow SQLite's default 2 MB cache, each batch rereads pages it just wrote.
        db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KB}")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    except BaseException:
        db.close()
        raise
    return db
