"""Filling the hot index from the hot table at start, before the writer commits."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from auditd.query.hot_index import HotIndex
from auditd.query.rows import connect_reader
from auditd.schema import StoredEvent

log = structlog.get_logger("auditd.query.rebuild")
_CHUNK = 8192
# The events-table row (statements.event_row's order) and the names behind its ids.
_SELECT = (
    "SELECT e.seq, e.id, e.id_hash, e.ts, e.received_at, e.type, e.actor, e.target,"
    " e.stream, e.stream_seq, e.correlation_id, e.causation_id, e.tags, e.data, e.pid,"
    " e.uid, e.gid, e.comm, t.value, a.value, g.value, s.value, c.value"
    " FROM events e JOIN names t ON t.id = e.type LEFT JOIN names a ON a.id = e.actor"
    " LEFT JOIN names g ON g.id = e.target LEFT JOIN names s ON s.id = e.stream"
    " JOIN names c ON c.id = e.comm WHERE e.seq > ? ORDER BY e.seq LIMIT ?")


def hot_batches(conn: sqlite3.Connection, after_seq: int
                ) -> Iterator[tuple[list[StoredEvent], list[tuple[Any, ...]]]]:
    """The hot rows above `after_seq` in seq order, a chunk at a time (a rowid range
    each: the seq is the rowid)."""
    while True:
        found = conn.execute(_SELECT, (after_seq, _CHUNK)).fetchall()
        if not found:
            return
        rows = [row[:18] for row in found]
        events = [StoredEvent(r[0], r[1], r[3], r[4], r[18], r[19], r[20], r[21], r[9], r[10],
                              r[11], r[12], r[13], r[14], r[15], r[16], r[22], r[2])
                  for r in found]
        yield events, rows
        after_seq = rows[-1][0]


async def rebuild_hot_index(index: HotIndex, db_path: Path, sealed_through: int) -> int:
    """Index every hot row past `sealed_through` (in a thread); the slots indexed."""
    started = time.perf_counter()

    def run() -> int:
        conn = connect_reader(db_path)
        try:
            return index.rebuild(hot_batches(conn, sealed_through))
        finally:
            conn.close()

    count = await asyncio.to_thread(run)
    log.info("hot_index_rebuilt", events=count, after_seq=sealed_through,
             bytes=index.columns.memory_bytes(),
             seconds=round(time.perf_counter() - started, 3))
    return count
