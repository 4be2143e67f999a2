"""The SQL of a batch: multi-row INSERTs in power-of-two chunks, and the rows they take."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from auditd.schema import StoredEvent

# Multi-row statements instead of executemany: sqlite3 gives the GIL up around every
# statement it steps, and with the event loop busy the database thread waits up to the
# 5 ms switch interval to get it back. executemany steps once per row: measured 174
# rows/s against a spinning thread, and 58,000 with 1,000-row statements (134,000 vs
# 81,000 with no contention).
_MAX_PARAMETERS = 32_766  # SQLite's limit since 3.32


class RowsInsert:
    """An INSERT whose VALUES list repeats: `head` VALUES (?,..),(?,..) `tail`.

    Rows go in chunks whose sizes are powers of two, so a table needs at most a dozen
    distinct statements and sqlite3's statement cache reuses them. With any size, a
    statement per batch size seen was compiled and cached: up to 128 of them, a few
    MB each, grew the daemon by 100 MB.
    """

    def __init__(self, head: str, width: int, tail: str = "") -> None:
        self.head, self.width, self.tail = head, width, tail
        self._largest = 1 << ((_MAX_PARAMETERS // width).bit_length() - 1)
        self._sql: dict[int, str] = {}

    def statements(self, rows: list[tuple[Any, ...]]) -> Iterator[tuple[str, list[Any]]]:
        start = 0
        while start < len(rows):
            size = min(self._largest, 1 << ((len(rows) - start).bit_length() - 1))
            chunk = rows[start : start + size]
            yield self._statement(size), [value for row in chunk for value in row]
            start += size

    def _statement(self, size: int) -> str:
        sql = self._sql.get(size)
        if sql is None:
            one = "(" + ",".join("?" * self.width) + ")"
            sql = self._sql[size] = f"{self.head} VALUES {','.join([one] * size)} {self.tail}"
        return sql

    def one(self) -> str:
        return self._statement(1)


EVENTS = RowsInsert(
    "INSERT INTO events (seq, id, id_hash, ts, received_at, type, actor, target, stream,"
    " stream_seq, correlation_id, causation_id, tags, data, pid, uid, gid, comm)", 18)
STREAMS = RowsInsert(
    "INSERT INTO streams (stream, version, last_seq)", 3,
    "ON CONFLICT (stream) DO UPDATE SET version = max(version, excluded.version),"
    " last_seq = max(last_seq, excluded.last_seq)")
DEAD_LETTERS = RowsInsert(
    "INSERT INTO dead_letters (seq, source, code, reason, raw, size, uid, attempts,"
    " first_failed_at, last_failed_at)", 10)
NAMES = RowsInsert("INSERT INTO names (value)", 1, "ON CONFLICT (value) DO NOTHING")


def event_row(event: StoredEvent, name_id: Callable[[str], int]) -> tuple[Any, ...]:
    """The events-table row of a stored event; `name_id` maps a string to its names id."""
    return (
        event.seq, event.id, event.id_hash, event.ts, event.received_at,
        name_id(event.type),
        None if event.actor is None else name_id(event.actor),
        None if event.target is None else name_id(event.target),
        None if event.stream is None else name_id(event.stream),
        event.stream_seq, event.correlation_id, event.causation_id,
        event.tags,
        event.data, event.pid, event.uid, event.gid, name_id(event.comm),
    )


def json_list(values: Iterable[object]) -> str:
    """Values as one JSON array parameter, for `IN (SELECT value FROM json_each(?))`."""
    return json.dumps(list(values))


def insert_rows(db: sqlite3.Connection, statement: RowsInsert,
                rows: list[tuple[Any, ...]]) -> None:
    for sql, parameters in statement.statements(rows):
        db.execute(sql, parameters)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a failed COMMIT may have ended it already
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
