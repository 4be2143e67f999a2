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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from auditd import migrations
from auditd.errors import (
    BatchSkippedError,
    PermanentStoreError,
    StoreError,
    TransientStoreError,
)
from auditd.schema import StoredEvent, id_hash

log = structlog.get_logger("auditd.store")
_T = TypeVar("_T")

# Primary result codes (exc.sqlite_errorcode & 0xFF) that the same data will hit again.
_PERMANENT = {18, 19, 20, 25}  # TOOBIG, CONSTRAINT, MISMATCH, RANGE
DB_NAME = "auditd.db"
_NAMES_CACHE_MAX = 200_000
_WRITER_CACHE_KB = 16 * 1024
# SQLite's default checkpoint every 1000 pages (4 MB) of WAL. Under live ingest, every
# 64 MB measured no faster for the daemon: the loop and clients share its two cores.
_WAL_CHECKPOINT_PAGES = 1000
_CATCH_UP_CACHE_KB = 48 * 1024
_CATCH_UP_CHECKPOINT_PAGES = 65_536
# A WAL that grew during catch-up is cut back to this at the next checkpoint reset (not
# during catch-up: cutting a file that grows again at once made replay 30% slower).
_WAL_SIZE_LIMIT = 64 * 1024 * 1024

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
    """The writer's connection lives on one dedicated thread, and a whole batch (names,
    events, streams, dead letters, checkpoint, COMMIT) is one call to it. That lets the
    writer queue the next batch behind the one committing (`submit_batch`), so the
    thread never waits for a busy event loop in between: it sat idle a fifth of the time
    with one aiosqlite round trip per statement. Readers (`lookup_ids`) keep their own
    aiosqlite connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None  # touched only on self._thread
        self._thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._names: dict[str, int] = {}  # names-table ids, filled as batches commit
        self._checkpoint = 0  # the last committed checkpoint, as the store's thread saw it

    def _call(self, function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run `function` on the store's thread, after everything queued before it."""
        assert self._thread is not None, "store not open"
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def open(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="auditd-store")
        try:
            self._db = await self._call(_open_writer, self.path)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA synchronous=NORMAL")
            await self._reader.execute("PRAGMA busy_timeout=200")
        except sqlite3.Error as exc:
            raise classify(exc, f"opening {self.path}") from exc

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        if self._db is not None:
            await self._call(self._db.close)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._reader = self._db = self._thread = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store not open"
        return self._db

    async def load_state(self) -> StoreState:
        return await self._call(self._load_state)

    def _load_state(self) -> StoreState:
        db = self.db
        committed = _scalar(db, "SELECT value FROM meta WHERE key='committed_seq'")
        max_event = _scalar(db, "SELECT max(seq) FROM events")
        max_dead = _scalar(db, "SELECT max(seq) FROM dead_letters")
        rows = db.execute(
            "SELECT n.value, s.version FROM streams s JOIN names n ON n.id = s.stream")
        self._checkpoint = int(committed or 0)
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

        Cancellation: the call runs on the store's thread and is not stopped by
        cancelling this coroutine; the checkpoint in the same transaction is what keeps
        replay exactly-once either way.
        """
        await self._call(self._insert_batch, events, dead, checkpoint, resolved_dead, None)

    def submit_batch(self, events: list[StoredEvent], dead: list[DeadLetter],
                     checkpoint: int, after: int | None) -> asyncio.Future[None]:
        """Queue a batch behind the one in flight whose checkpoint is `after` (if any).

        It commits only if that one did; otherwise it fails with BatchSkippedError
        untried. The writer hands over the next batch this way while the current one
        commits, so the store's thread never waits for the event loop in between.
        """
        return self._call(self._insert_batch, events, dead, checkpoint, (), after)

    def _insert_batch(self, events: list[StoredEvent], dead: list[DeadLetter],
                      checkpoint: int, resolved_dead: tuple[int, ...],
                      after: int | None) -> None:
        if after is not None and after != self._checkpoint:
            raise BatchSkippedError(f"not attempted: the batch through seq {after} failed")
        db = self.db
        fresh: dict[str, int] = {}
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                missing = self._missing_names(events)
                if missing:
                    fresh = _resolve_names(db, missing)
                lookup = self._names | fresh if fresh else self._names
                name_id = lookup.__getitem__
                _insert(db, EVENTS, [event_row(e, name_id) for e in events])
                streams = {e.stream: (e.stream_seq, e.seq) for e in events if e.stream}
                _insert(db, STREAMS, [(lookup[s], v, q) for s, (v, q) in streams.items()])
                _insert(db, DEAD_LETTERS, [_dead_row(d) for d in dead])
                if resolved_dead:
                    db.execute(
                        "DELETE FROM dead_letters WHERE dlq_id IN (SELECT value FROM json_each(?))",
                        (_json_list(resolved_dead),))
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'committed_seq' AND value < ?",
                    (checkpoint, checkpoint))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # BEGIN itself may have failed
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise classify(exc, "committing a batch") from exc
        self._checkpoint = max(self._checkpoint, checkpoint)
        if fresh:  # only names that are committed join the cache
            if len(self._names) > _NAMES_CACHE_MAX:
                self._names.clear()
            self._names.update(fresh)

    def _missing_names(self, events: list[StoredEvent]) -> set[str]:
        names = self._names
        return {value for e in events for value in (e.type, e.actor, e.target, e.stream, e.comm)
                if value is not None and value not in names}

    async def catch_up(self, on: bool) -> None:
        """Settings for committing a long backlog (journal replay at start), when
        throughput is all that counts: a page cache that holds the hot leaf of every
        index key past a million events, and a checkpoint every 256 MB of WAL instead
        of 4 MB, so each hot leaf is copied to the database file once per many batches
        rather than after every one."""
        cache_kb, pages, wal_limit = (
            (_CATCH_UP_CACHE_KB, _CATCH_UP_CHECKPOINT_PAGES, -1) if on
            else (_WRITER_CACHE_KB, _WAL_CHECKPOINT_PAGES, _WAL_SIZE_LIMIT))
        await self._call(self.db.executescript, f"PRAGMA cache_size=-{cache_kb};"
                         f"PRAGMA wal_autocheckpoint={pages};"
                         f"PRAGMA journal_size_limit={wal_limit};")

    async def checkpoint_wal(self) -> bool:
        """Copy the WAL into the database file; True when every frame was copied.

        With synchronous=NORMAL a commit is durable against power loss only after
        this, so journal segments are released only behind a complete checkpoint.
        """
        try:
            busy, log_frames, copied = await self._call(
                lambda: self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        except sqlite3.Error as exc:
            raise classify(exc, "checkpointing the WAL") from exc
        return bool(busy == 0 and log_frames == copied)

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        return total


def _open_writer(path: Path) -> sqlite3.Connection:
    db = connect_sync(path)
    try:
        migrations.migrate(db)
        # Inserts touch a leaf of every index at a random place: once the indexes
        # outgrow SQLite's default 2 MB cache, each batch rereads pages it just wrote.
        db.execute(f"PRAGMA cache_size=-{_WRITER_CACHE_KB}")
    except BaseException:
        db.close()
        raise
    return db


def _resolve_names(db: sqlite3.Connection, values: set[str]) -> dict[str, int]:
    _insert(db, NAMES, [(v,) for v in values])
    rows = db.execute(
        "SELECT value, id FROM names WHERE value IN (SELECT value FROM json_each(?))",
        (_json_list(values),))
    return {str(value): int(name_id) for value, name_id in rows}


def _dead_row(entry: DeadLetter) -> tuple[Any, ...]:
    now = time.time_ns()
    return (entry.seq, entry.source, entry.code, entry.reason, entry.raw, len(entry.raw),
            entry.uid, entry.attempts, entry.first_failed_at, now)


def _json_list(values: Iterable[object]) -> str:
    return json.dumps(list(values))



def _insert(db: sqlite3.Connection, statement: RowsInsert,
            rows: list[tuple[Any, ...]]) -> None:
    for sql, parameters in statement.statements(rows):
        db.execute(sql, parameters)


def _scalar(db: sqlite3.Connection, sql: str) -> Any:
    row = db.execute(sql).fetchone()
    return None if row is None else row[0]
