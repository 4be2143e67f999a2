"""Schema 4: projections, the read models behind /counts and /actors (docs/design/
projections.md). Each is a table of aggregates the writer upserts in the same transaction
as the events they count, and a row in `projections` saying its version, its state and
its position (the last seq it has counted), written in that transaction too: replay,
which re-commits only seqs past the checkpoint, can never count an event twice.

Count tables are keyed by (hour, value, uid): a caller allowed only its own events reads
its uid's rows, a reader the sum over uids. Values are `names` ids (0 for an absent
actor), as in `events`. `hour` is the event time (`ts`) floor-divided by one hour.

Up on a store that already holds events leaves each projection `rebuilding` through the
checkpoint: the daemon fills them from the events (hot and sealed), a chunk per writer
transaction, while new events are counted as they commit. Down drops the tables: they
are derived, nothing stored is lost.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

# name, table: what the projections table lists (auditd.projections.definitions holds
# the versions and the code; a changed version rebuilds the projection at start).
PROJECTION_TABLES: tuple[tuple[str, str], ...] = (
    ("counts_by_type", "counts_by_type"),
    ("counts_by_actor", "counts_by_actor"),
    ("counts_by_uid", "counts_by_uid"),
    ("counts_by_comm", "counts_by_comm"),
    ("actor_summary", "actor_summary"),
)
FIRST_VERSION = 1


def _counts_table(table: str, column: str) -> str:
    return (f"CREATE TABLE {table} (hour INTEGER NOT NULL, {column} INTEGER NOT NULL,"
            f" uid INTEGER NOT NULL, n INTEGER NOT NULL,"
            f" PRIMARY KEY (hour, {column}, uid)) WITHOUT ROWID")


def _register(db: sqlite3.Connection) -> None:
    """A row per projection: live at position 0 on an empty store, otherwise rebuilding
    through the checkpoint (the daemon fills it at start)."""
    (committed,) = db.execute(
        "SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
    committed = int(committed or 0)
    holds_events = committed > 0 or db.execute("SELECT 1 FROM events LIMIT 1").fetchone() \
        or db.execute("SELECT 1 FROM partitions LIMIT 1").fetchone()
    now = time.time_ns()
    for name, _ in PROJECTION_TABLES:
        if holds_events:
            db.execute("INSERT INTO projections VALUES (?, ?, 'rebuilding', 0, ?, ?)",
                       (name, FIRST_VERSION, committed, now))
        else:
            db.execute("INSERT INTO projections VALUES (?, ?, 'live', 0, NULL, ?)",
                       (name, FIRST_VERSION, now))


UP: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    """CREATE TABLE projections (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('live', 'rebuilding')),
        position INTEGER NOT NULL,
        rebuild_through INTEGER,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID""",
    _counts_table("counts_by_type", "type"),
    _counts_table("counts_by_actor", "actor"),
    # Actors are many (a row per active actor per hour): `actor=A` must not scan them
    # all. Types and comms are few; their filters scan a few rows per hour.
    "CREATE INDEX counts_by_actor_actor ON counts_by_actor (actor, hour)",
    _counts_table("counts_by_comm", "comm"),
    """CREATE TABLE counts_by_uid (hour INTEGER NOT NULL, uid INTEGER NOT NULL,
        n INTEGER NOT NULL, PRIMARY KEY (hour, uid)) WITHOUT ROWID""",
    """CREATE TABLE actor_summary (
        actor INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        first_ts INTEGER NOT NULL,
        last_ts INTEGER NOT NULL,
        total INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (actor, uid)
    ) WITHOUT ROWID""",
    _register,
)

DOWN: tuple[str, ...] = (
    "DROP TABLE actor_summary",
    "DROP TABLE counts_by_uid",
    "DROP TABLE counts_by_comm",
    "DROP TABLE counts_by_actor",
    "DROP TABLE counts_by_type",
    "DROP TABLE projections",
)
