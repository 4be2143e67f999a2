"""The dead-letter store's operator side: list, drop, retry bookkeeping, the ingest quota.

Runs on its own aiosqlite connection so an operator's call never joins the writer's
open transaction; SQLite's lock serializes the two. Re-committing an accepted event
(one with a seq) still goes through the writer: see Writer.restore().
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import aiosqlite

Entry = tuple[int, int | None, str, bytes, int | None]  # dlq_id, seq, source, raw, uid
_COLUMNS = ("dlq_id", "seq", "source", "code", "reason", "raw", "size", "uid", "attempts",
            "first_failed_at", "last_failed_at")


def _selection(ids: list[int] | None) -> tuple[str, tuple[Any, ...]]:
    if ids is None:
        return "1", ()
    return f"dlq_id IN ({','.join('?' * len(ids))})", tuple(ids)


class DeadLetterStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        await self._conn.execute("PRAGMA busy_timeout=5000")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def conn(self) -> aiosqlite.Connection:
        assert self._conn is not None, "dead-letter store not open"
        return self._conn

    async def page(self, limit: int = 100, after: int | None = None,
                   uid: int | None = None) -> list[dict[str, Any]]:
        """Entries after `after`, oldest first; only those `uid` wrote when it is given."""
        rows = await self.conn.execute_fetchall(
            f"SELECT {','.join(_COLUMNS)} FROM dead_letters WHERE dlq_id > ? "
            "AND (? IS NULL OR uid = ?) ORDER BY dlq_id LIMIT ?", (after or 0, uid, uid, limit))
        entries = []
        for row in rows:
            entry = dict(zip(_COLUMNS, row, strict=True))
            entry["raw"] = {"$bytes": base64.b64encode(entry["raw"]).decode()}
            entries.append(entry)
        return entries

    async def entries(self, ids: list[int] | None) -> list[Entry]:
        """(dlq_id, seq, source, raw, uid) of the selected entries, oldest first."""
        where, params = _selection(ids)
        rows = await self.conn.execute_fetchall(
            f"SELECT dlq_id, seq, source, raw, uid FROM dead_letters WHERE {where} "
            "ORDER BY dlq_id", params)
        return [(int(r[0]), r[1], str(r[2]), bytes(r[3]), r[4]) for r in rows]

    async def drop(self, ids: list[int] | None) -> int:
        where, params = _selection(ids)
        cursor = await self.conn.execute(f"DELETE FROM dead_letters WHERE {where}", params)
        return int(cursor.rowcount)

    async def failed_again(self, dlq_id: int, reason: str) -> None:
        await self.conn.execute(
            "UPDATE dead_letters SET attempts = attempts + 1, last_failed_at = ?, reason = ?"
            " WHERE dlq_id = ?", (time.time_ns(), reason, dlq_id))

    async def stats(self) -> tuple[int, int]:
        """(entries, bytes) in the store."""
        rows = list(await self.conn.execute_fetchall(
            "SELECT count(*), total(size) FROM dead_letters"))
        return int(rows[0][0]), int(rows[0][1])

    async def enforce_quota(self, max_bytes: int) -> int:
        """Drop the oldest ingest rejects past the quota; accepted events are never dropped."""
        rows = list(await self.conn.execute_fetchall(
            "SELECT total(size) FROM dead_letters WHERE source = 'ingest'"))
        excess = int(rows[0][0]) - max_bytes
        if excess <= 0:
            return 0
        victims = await self.conn.execute_fetchall(
            "SELECT dlq_id, size FROM dead_letters WHERE source = 'ingest' ORDER BY dlq_id")
        doomed: list[int] = []
        for dlq_id, size in victims:
            if excess <= 0:
                break
            doomed.append(int(dlq_id))
            excess -= int(size)
        dropped = 0
        for start in range(0, len(doomed), 500):  # what was deleted, not what was chosen
            dropped += await self.drop(doomed[start : start + 500])
        return dropped
