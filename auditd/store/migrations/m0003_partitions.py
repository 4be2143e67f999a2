"""Schema 3: the partitioned store (docs/design/storage.md). `events` becomes the hot
table: rowid (seq) and the id key only, no filter index, so an insert costs the same
at any store size; sealed partitions (files under `partitions/`) hold the older events,
compact and fully indexed, and the `partitions` catalog says which files are part of
the store and `meta.sealed_through` how far they reach.

Up drops the filter indexes (events_type_ts, _actor_ts, _target_ts, _stream,
_correlation, _ts); `events_id_hash` stays: ingest looks ids up through it, and its
time-ordered keys append at the right edge. A populated store's rows are all hot after
up: the daemon's sealer then seals them a partition at a time, each step crash-safe,
which is what makes this migration resumable: nothing is rewritten in its transaction.

Down moves every catalogued partition's events back into `events` (names resolved
again), then builds the filter indexes again; the partition files are left behind,
uncatalogued, for the operator to delete (`auditd migrate` says where).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from auditd.store.migrations.m0001_initial import UP as SCHEMA_1
from auditd.store.statements import EVENTS, NAMES, event_row, insert_rows

FILTER_INDEXES = tuple(sql for sql in SCHEMA_1
                       if "INDEX events_" in sql and "events_id_hash" not in sql)
FILTER_INDEX_NAMES = ("events_type_ts", "events_actor_ts", "events_target_ts",
                      "events_stream", "events_correlation", "events_ts")
_CHUNK = 4096

UP: tuple[str, ...] = (
    *(f"DROP INDEX IF EXISTS {name}" for name in FILTER_INDEX_NAMES),
    """CREATE TABLE partitions (
        first_seq INTEGER PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        file TEXT NOT NULL UNIQUE,
        events INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        format_version INTEGER NOT NULL,
        sealed_at INTEGER NOT NULL,
        seconds REAL NOT NULL,
        id_keys BLOB NOT NULL
    )""",
    "INSERT INTO meta VALUES ('sealed_through', 0)",
)


def _unseal(db: sqlite3.Connection) -> None:
    # Imported here: reading partitions pulls in zstandard, which schema 1-2 never need.
    from auditd.store.partition.read import SealedPartition
    from auditd.store.records import event_from_record, is_dead_letter

    main = next(row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main")
    directory = Path(main).parent / "partitions"
    names: dict[str, int] = dict(db.execute("SELECT value, id FROM names"))

    def name_id(value: str) -> int:
        found = names.get(value)
        if found is None:
            insert_rows(db, NAMES, [(value,)])
            found = names[value] = int(db.execute(
                "SELECT id FROM names WHERE value = ?", (value,)).fetchone()[0])
        return found

    for (file,) in db.execute("SELECT file FROM partitions ORDER BY first_seq").fetchall():
        with SealedPartition(directory / file) as part:
            for start in range(part.first_seq, part.last_seq + 1, _CHUNK):
                seqs = range(start, min(start + _CHUNK, part.last_seq + 1))
                rows = [event_row(event_from_record(record), name_id)
                        for record in part.records(seqs) if not is_dead_letter(record)]
                insert_rows(db, EVENTS, rows)


DOWN: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    _unseal,
    "DROP TABLE partitions",
    "DELETE FROM meta WHERE key = 'sealed_through'",
    *FILTER_INDEXES,
)
