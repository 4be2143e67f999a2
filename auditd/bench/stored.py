"""Counting a bench's stored events in a throw-away daemon's store: the hot table and
the sealed partitions alike (sealing moves committed events out of `events`)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from auditd.store.partition.read import SealedPartition
from auditd.store.sealing.catalog import PARTITIONS_DIR

# The filters counted, and the hot table's column (of events_view) each one reads.
_COLUMNS = {"type": "type", "uid": "uid"}


def count_stored(db_path: Path, field: str, value: str) -> int:
    """Committed events whose `field` ("type" or "uid") is `value`, wherever stored."""
    column = _COLUMNS[field]
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        # One read transaction: the catalog and the hot rows of one snapshot.
        conn.execute("BEGIN")
        hot = int(conn.execute(f"SELECT count(*) FROM events_view WHERE {column} = ?",
                               (int(value) if field == "uid" else value,)).fetchone()[0])
        files = [str(f) for (f,) in conn.execute("SELECT file FROM partitions")]
        sealed_through = int(conn.execute(
            "SELECT value FROM meta WHERE key = 'sealed_through'").fetchone()[0])
        conn.execute("COMMIT")
    if sealed_through:  # hot rows the sealed partitions also hold (not yet released)
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as c:
            hot -= int(c.execute(
                f"SELECT count(*) FROM events_view WHERE {column} = ? AND seq <= ?",
                (int(value) if field == "uid" else value, sealed_through)).fetchone()[0])
    sealed = 0
    for file in files:
        with SealedPartition(db_path.parent / PARTITIONS_DIR / file) as part:
            sealed += len(part.query({field: [value]}, limit=part.count, descending=False))
    return max(0, hot) + sealed
