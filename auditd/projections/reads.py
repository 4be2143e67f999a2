"""Reading the projections: /counts buckets, /actors summaries, and what `projections
status` shows. One read-only connection on a thread of its own; nothing here runs on
the event loop.

Counts come from the hourly rows: a reader's bucket is the sum over uids (the rows of
one (hour, value) are adjacent in the primary key, so GROUP BY needs no sort), a
non-reader's is its own uid's rows. A day is the sum of its 24 hours, folded here.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from auditd.projections.definitions import COUNTS_BY_FIELD, HOUR_NS, NAMED_FIELDS
from auditd.projections.params import CountsQuery, rfc3339
from auditd.store.records import event_from_record
from auditd.store.sealing.catalog import PARTITIONS_DIR
from auditd.store.sqlite_errors import classify
from auditd.store.statements import json_list

_T = TypeVar("_T")
_IN = "IN (SELECT value FROM json_each(?))"


class ProjectionReader:
    """`open()`, then the reads, then `aclose()`."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._thread: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="auditd-projections")
        self._db = await self._on(_connect, self.db_path)

    async def aclose(self) -> None:
        if self._db is not None:
            await self._on(self._db.close)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._db = self._thread = None

    def _on(self, function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        assert self._thread is not None, "projection reader not open"
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def _read(self, what: str, function: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self._on(function, self._db, *args)
        except sqlite3.Error as exc:
            raise classify(exc, what) from exc

    async def counts(self, query: CountsQuery) -> str:
        """[[bucket start (RFC 3339), value, count], ...] as JSON text, by start, then
        value (type, actor and comm in the order their names were first seen)."""
        return await self._read("reading the counts", counts_in, query)

    async def actor(self, actor: str, uid: int | None) -> dict[str, Any] | None:
        return await self._read("reading an actor summary", actor_in, actor, uid)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=200")
    return conn


def counts_in(db: sqlite3.Connection, query: CountsQuery) -> str:
    """The buckets as one JSON array, built by SQLite: grouped in the primary key's
    order (by start, then value or its names id: hourly buckets need no sort), named
    and formatted there; Python neither decodes nor encodes them."""
    projection = COUNTS_BY_FIELD[query.by]
    column = query.by
    where: list[str] = []
    params: list[Any] = []
    if query.since_ns is not None:
        where.append("hour >= ?")
        params.append(query.since_ns // HOUR_NS)
    if query.until_ns is not None:
        where.append("hour < ?")
        params.append(-(-query.until_ns // HOUR_NS))  # the hour holding `until` is in
    if query.uids is not None:
        if not query.uids:
            return "[]"
        where.append(f"uid {_IN}")
        params.append(json_list(query.uids))
    named = column in NAMED_FIELDS
    if query.values is not None:
        ids = _ids_of(db, query.values) if named else {}
        if not ids:
            return "[]"
        where.append(f"{column} {_IN}")
        params.append(json_list(ids))
    step = query.hours_per_bucket
    # Floor to the bucket, negative hours (before 1970) included: SQLite's % truncates.
    start = "hour" if step == 1 else f"(hour - ((hour % {step}) + {step}) % {step})"
    grouped = (f"SELECT {start} AS start, {column} AS value, sum(n) AS n"
               f" FROM {projection.table}"
               f"{' WHERE ' + ' AND '.join(where) if where else ''}"
               f" GROUP BY start, {column} ORDER BY start, value")
    # Named (NO_ACTOR, 0, has no name: null) and formatted in C, after the grouping;
    # the rows keep the subquery's order (SQLite never flattens an ordered subquery
    # into an aggregate). One row holding every bucket: sqlite3 gives the GIL up for
    # each row it steps and waits to get it back from a busy event loop.
    shown = "(SELECT value FROM names WHERE id = g.value)" if named else "g.value"
    (document,) = db.execute(
        "SELECT json_group_array(json_array("
        "strftime('%Y-%m-%dT%H:00:00Z', g.start * 3600, 'unixepoch'),"
        f" {shown}, g.n)) FROM ({grouped}) g", params).fetchone()
    return str(document)


def _ids_of(db: sqlite3.Connection, values: tuple[str, ...]) -> dict[int, str]:
    return {int(i): str(v) for i, v in db.execute(
        f"SELECT id, value FROM names WHERE value {_IN}", (json_list(values),))}


def actor_in(db: sqlite3.Connection, actor: str, uid: int | None) -> dict[str, Any] | None:
    """The summary of `actor` (only `uid`'s events unless uid is None); None when it
    has no events the caller may see."""
    sql = ("SELECT min(first_ts), max(last_ts), sum(total), max(last_seq) FROM actor_summary"
           " WHERE actor = (SELECT id FROM names WHERE value = ?)")
    params: list[Any] = [actor]
    if uid is not None:
        sql += " AND uid = ?"
        params.append(uid)
    first, last, total, last_seq = db.execute(sql, params).fetchone()
    if not total:
        return None
    return {"actor": actor, "first_seen": rfc3339(first), "last_seen": rfc3339(last),
            "total": int(total), "last_seq": int(last_seq),
            "last_event": _event_at(db, int(last_seq))}


def _event_at(db: sqlite3.Connection, seq: int) -> dict[str, Any] | None:
    """A short form of the event at `seq`: hot row first (a row is released only once
    its partition is catalogued), else its sealed partition's record."""
    row = db.execute("SELECT seq, id, ts, type, actor, target, uid, comm FROM events_view"
                     " WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        found = db.execute("SELECT file FROM partitions WHERE first_seq <= ?1"
                           " AND last_seq >= ?1", (seq,)).fetchone()
        if found is None:
            return None
        from auditd.store.partition.read import SealedPartition

        main = Path(db.execute("PRAGMA database_list").fetchone()[2])
        with SealedPartition(main.parent / PARTITIONS_DIR / found[0]) as part:
            record = part.record(seq)
        if record is None:
            return None
        event = event_from_record(record)
        row = (event.seq, event.id, event.ts, event.type, event.actor, event.target,
               event.uid, event.comm)
    keys = ("seq", "id", "ts", "type", "actor", "target", "uid", "comm")
    shown = dict(zip(keys, row, strict=True))
    shown["ts"] = rfc3339(int(shown["ts"]))
    return shown
