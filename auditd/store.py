"""The SQLite store: schema via migrations, batch inserts, the checkpoint, dead letters.

All SQL runs on aiosqlite's threads, never on the event loop. sqlite3 errors are
translated here, at one boundary, into TransientStoreError (retry) or
PermanentStoreError (dead-letter). The writer is the only caller of the write methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from auditd import migrations
from auditd.errors import PermanentStoreError, StoreError, TransientStoreError
from auditd.schema import StoredEvent, id_hash

log = structlog.get_logger("auditd.store")

# Primary result codes (exc.sqlite_errorcode & 0xFF) that the same data will hit again.
_PERMANENT = {18, 19, 20, 25}  # TOOBIG, CONSTRAINT, MISMATCH, RANGE
DB_NAME = "auditd.db"
_NAMES_CACHE_MAX = 200_000
_WRITER_CACHE_KB = 16 * 1024

# Multi-row statements instead of executemany: sqlite3 gives the GIL up around every
# statement it steps, and with the event loop busy the database thread waits up to the
# 5 ms switch interval to get it back. executemany steps once per row: measured 174
# rows/s against a spinning thread, and 58,000 with 1,000-row statements (134,000 vs
# 81,000 with no contention).
_MAX_PARAMETERS = 32_766  # SQLite's limit since 3.32


@dataclass(frozen=True, slots=True)
class RowsInsert:
    """An INSERT whose VALUES list repeats: `head` VALUES (?,..),(?,..) `tail`."""

    head: str
    width: int
    tail: str = ""

    def statements(self, rows: list[tuple[Any, ...]]) -> Iterator[tuple[str, list[Any]]]:
        per = _MAX_PARAMETERS // self.width
        one = "(" + ",".join("?" * self.width) + ")"
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            sql = f"{self.head} VALUES {','.join([one] * len(chunk))} {self.tail}"
            yield sql, [value for row in chunk for value in row]

    def one(self) -> str:
        return f"{self.head} VALUES ({','.join('?' * self.width)}) {self.tail}"


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


def classify(exc: sqlite3.Error, what: str) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    kind = PermanentStoreError if code in _PERMANENT else TransientStoreError
    error = kind(f"{what}: {exc}")
    error.__cause__ = exc
    return error


@dataclass(slots=True)
class DeadLetter:
    """One dead-letter entry to write; `seq` is set for accepted events."""

    source: str  # "ingest" (rejected), "writer" (poison), "journal" (corrupt record)
    code: str
    reason: str
    raw: bytes
    seq: int | None = None
    uid: int | None = None
    attempts: int = 1
    first_failed_at: int = field(default_factory=time.time_ns)


@dataclass(slots=True)
class StoreState:
    committed_seq: int
    max_seq: int
    streams: dict[str, int]


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


def connect_sync(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection with the daemon's pragmas (migrations, bench, recover)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=200")
    return conn


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._names: dict[str, int] = {}  # names-table ids, filled as batches commit

    @property
    def conn(self) -> aiosqlite.Connection:
        assert self._conn is not None, "store not open"
        return self._conn

    async def open(self) -> None:
        try:
            setup = connect_sync(self.path)
            try:
                migrations.migrate(setup)
            finally:
                setup.close()
            self._conn = await aiosqlite.connect(self.path, isolation_level=None)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            for conn in (self._conn, self._reader):
                await conn.execute("PRAGMA synchronous=NORMAL")
                await conn.execute("PRAGMA busy_timeout=200")
            # Inserts touch a leaf of every index at a random place: once the indexes
            # outgrow SQLite's default 2 MB cache, each batch rereads pages it just wrote.
            await self._conn.execute(f"PRAGMA cache_size=-{_WRITER_CACHE_KB}")
        except sqlite3.Error as exc:
            raise classify(exc, f"opening {self.path}") from exc

    async def close(self) -> None:
        for conn in (self._reader, self._conn):
            if conn is not None:
                await conn.close()
        self._conn = self._reader = None

    async def load_state(self) -> StoreState:
        conn = self.conn
        committed = await _scalar(conn, "SELECT value FROM meta WHERE key='committed_seq'")
        max_event = await _scalar(conn, "SELECT max(seq) FROM events")
        max_dead = await _scalar(conn, "SELECT max(seq) FROM dead_letters")
        rows = await conn.execute_fetchall(
            "SELECT n.value, s.version FROM streams s JOIN names n ON n.id = s.stream")
        return StoreState(
            committed_seq=int(committed or 0),
            max_seq=max(int(committed or 0), int(max_event or 0), int(max_dead or 0)),
            streams={str(name): int(version) for name, version in rows},
        )

    async def id_hashes(self, sink: Callable[[int], None]) -> int:
        """Feed every stored id hash to `sink` (in the database thread); return the count."""
        def scan(db: sqlite3.Connection) -> int:
            count = 0
            for (value,) in db.execute("SELECT id_hash FROM events"):
                sink(value)
                count += 1
            return count

        conn = connect_sync(self.path)
        try:
            return await asyncio.to_thread(scan, conn)
        finally:
            conn.close()

    async def lookup_ids(self, ids: Iterable[str]) -> dict[str, int]:
        """The seq under which each of these ids is stored, for those that are."""
        wanted = {event_id: id_hash(event_id) for event_id in ids}
        if not wanted:
            return {}
        assert self._reader is not None
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT id, seq FROM events WHERE id_hash IN (SELECT value FROM json_each(?))",
                (_json_list(wanted.values()),))
        except sqlite3.Error as exc:
            raise classify(exc, "looking up ids") from exc
        return {str(event_id): int(seq) for event_id, seq in rows if event_id in wanted}

    async def insert_batch(self, events: list[StoredEvent], dead: list[DeadLetter],
                           checkpoint: int, resolved_dead: tuple[int, ...] = ()) -> None:
        """Commit events and dead letters, and advance the checkpoint, in one transaction.

        `resolved_dead` are dead-letter entries whose events this batch re-commits.

        Cancellation: the SQL runs on aiosqlite's thread and is not stopped by
        cancelling this coroutine; the checkpoint in the same transaction is what keeps
        replay exactly-once either way.
        """
        conn = self.conn
        fresh: dict[str, int] = {}
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                missing = self._missing_names(events)
                if missing:
                    fresh = await self._resolve_names(missing)
                lookup = self._names | fresh if fresh else self._names
                name_id = lookup.__getitem__
                await _insert(conn, EVENTS, [event_row(e, name_id) for e in events])
                streams = {e.stream: (e.stream_seq, e.seq) for e in events if e.stream}
                await _insert(conn, STREAMS, [(lookup[s], v, q) for s, (v, q) in streams.items()])
                await _insert(conn, DEAD_LETTERS, [_dead_row(d) for d in dead])
                if resolved_dead:
                    await conn.execute(
                        "DELETE FROM dead_letters WHERE dlq_id IN (SELECT value FROM json_each(?))",
                        (_json_list(resolved_dead),))
                await conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'committed_seq' AND value < ?",
                    (checkpoint, checkpoint))
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # BEGIN itself may have failed
                    await conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise classify(exc, "committing a batch") from exc
        if fresh:  # only names that are committed join the cache
            if len(self._names) > _NAMES_CACHE_MAX:
                self._names.clear()
            self._names.update(fresh)

    def _missing_names(self, events: list[StoredEvent]) -> set[str]:
        names = self._names
        return {value for e in events for value in (e.type, e.actor, e.target, e.stream, e.comm)
                if value is not None and value not in names}

    async def _resolve_names(self, values: set[str]) -> dict[str, int]:
        conn = self.conn
        await _insert(conn, NAMES, [(v,) for v in values])
        rows = await conn.execute_fetchall(
            "SELECT value, id FROM names WHERE value IN (SELECT value FROM json_each(?))",
            (_json_list(values),))
        return {str(value): int(name_id) for value, name_id in rows}

    async def checkpoint_wal(self) -> bool:
        """Copy the WAL into the database file; True when every frame was copied.

        With synchronous=NORMAL a commit is durable against power loss only after
        this, so journal segments are released only behind a complete checkpoint.
        """
        try:
            rows = await self.conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise classify(exc, "checkpointing the WAL") from exc
        busy, log_frames, copied = next(iter(rows))
        return bool(busy == 0 and log_frames == copied)

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        return total


def _dead_row(entry: DeadLetter) -> tuple[Any, ...]:
    now = time.time_ns()
    return (entry.seq, entry.source, entry.code, entry.reason, entry.raw, len(entry.raw),
            entry.uid, entry.attempts, entry.first_failed_at, now)


def _json_list(values: Iterable[object]) -> str:
    return json.dumps(list(values))



async def _insert(conn: aiosqlite.Connection, statement: RowsInsert,
                  rows: list[tuple[Any, ...]]) -> None:
    for sql, parameters in statement.statements(rows):
        await conn.execute(sql, parameters)


async def _scalar(conn: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await conn.execute_fetchall(sql))
    return rows[0][0] if rows else None

