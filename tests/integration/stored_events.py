"""Read back what the daemon stored, names resolved and `data` decoded (no query API yet).

Only the hot table: these tests store far fewer events than a partition holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

_SQL = """
SELECT e.seq, e.id, t.value, a.value, g.value, e.correlation_id, e.causation_id, e.data
FROM events e JOIN names t ON t.id = e.type
LEFT JOIN names a ON a.id = e.actor LEFT JOIN names g ON g.id = e.target
ORDER BY e.seq"""


def stored_events(db_path: Path) -> list[dict[str, Any]]:
    """Every event of the hot table in seq order, as a dict of its wire fields."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(_SQL).fetchall()
    return [{"seq": seq, "id": event_id, "type": kind, "actor": actor, "target": target,
             "correlation_id": correlation, "causation_id": causation,
             "data": None if data is None else msgspec.msgpack.decode(data)}
            for seq, event_id, kind, actor, target, correlation, causation, data in rows]


def stored_count(db_path: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0
