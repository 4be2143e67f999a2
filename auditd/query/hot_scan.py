"""HotScan: a stopgap reader of the hot events table, in seq order, for /tail.

Until the query engine (auditd/query, branch `query`) serves paged reads over the
ring, the hot index and the sealed partitions, /tail catches up from the hot table
alone: read in chunks by seq (the primary key) on a read-only connection of its own,
matched in memory with `matches`. Sealed partitions are not read, so a catch-up
older than the hot table misses events; replace with the engine when it lands.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from auditd.query.spec import QuerySpec, matches
from auditd.schema import StoredEvent

_SELECT = """SELECT e.seq, e.id, e.ts, e.received_at, t.value, a.value, g.value, s.value,
    e.stream_seq, e.correlation_id, e.causation_id, e.tags, e.data, e.pid, e.uid, e.gid,
    c.value, e.id_hash
    FROM events e JOIN names t ON t.id = e.type
    LEFT JOIN names a ON a.id = e.actor LEFT JOIN names g ON g.id = e.target
    LEFT JOIN names s ON s.id = e.stream JOIN names c ON c.id = e.comm"""
_ASC = _SELECT + " WHERE e.seq > ? AND e.seq < ? ORDER BY e.seq LIMIT ?"
_DESC = _SELECT + " WHERE e.seq > ? AND e.seq < ? ORDER BY e.seq DESC LIMIT ?"
_CHUNK = 4096
_NO_END = 2**63 - 1


class HotScan:
    """A connection per read (a page of a catch-up): nothing to close."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    async def read(self, spec: QuerySpec) -> list[StoredEvent]:
        """Up to spec.limit matching events in (after, before), in spec's order."""
        return await asyncio.to_thread(self._read, spec)

    def _read(self, spec: QuerySpec) -> list[StoredEvent]:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            return self._scan(db, spec)
        finally:
            db.close()

    def _scan(self, db: sqlite3.Connection, spec: QuerySpec) -> list[StoredEvent]:
        low = spec.after if spec.after is not None else -1
        high = spec.before if spec.before is not None else _NO_END
        found: list[StoredEvent] = []
        while len(found) < spec.limit and low + 1 < high:
            rows = db.execute(_DESC if spec.descending else _ASC,
                                    (low, high, _CHUNK)).fetchall()
            for row in rows:
                event = StoredEvent(*row)
                if matches(event, spec):
                    found.append(event)
                    if len(found) == spec.limit:
                        break
            if len(rows) < _CHUNK:
                break
            if spec.descending:
                high = rows[-1][0]
            else:
                low = rows[-1][0]
        return found
