"""The SQLite store: schema via migrations, batch inserts, the checkpoint, dead letters.

All SQL runs on threads, never on the event loop: the writer's connection on a thread
of its own, WAL checkpoints on another, readers on aiosqlite's. Every sqlite3 error is
translated as it leaves the store, at one boundary (sqlite_errors.classify), into
TransientStoreError (retry), PermanentStoreError (dead-letter) or StoreFaultError (the
database is unusable: say so). The writer is the only caller of the write methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import aiosqlite
import structlog

from auditd.errors import BatchSkippedError, StoreError, StoreFaultError
from auditd.logs import RecurringFault
from auditd.schema import StoredEvent, id_hash
from auditd.store.connection import (
    WAL_CHECKPOINT_PAGES,
    WRITER_CACHE_KB,
    Progress,
    connect_sync,
    open_writer,
    watched,
)
from auditd.store.sealing import catalog
from auditd.store.sealing.id_keys import stored_id_keys
from auditd.store.sealing.sealed_set import SealedSet
from auditd.store.sqlite_errors import classify
from auditd.store.statements import (
    DEAD_LETTERS,
    EVENTS,
    NAMES,
    STREAMS,
    event_row,
    insert_rows,
    json_list,
    transaction,
)

log = structlog.get_logger("auditd.store.store")
_T = TypeVar("_T")

DB_NAME = "auditd.db"
_NAMES_CACHE_MAX = 200_000
# Often, so that each checkpoint's two fsyncs flush little: a journal fdatasync issued
# meanwhile waits for the disk to flush them too. At 5,000 events/s one at a time (~40 MB
# of WAL a second: a few B-tree pages rewritten per event), checkpoints every 0.1 s took
# 6.5 ms and 60-90% of the fsync-mode replies over 4 ms overlapped one; every 0.02 s
# they take 3-4 ms, and reply p99 fell from 5.1-6.1 to 3.7-5.4 ms. 0.01 and 0.005 s gave
# no more. In catch-up the interval is long again: throughput, not latency, counts there.
_CHECKPOINT_EVERY_S = 0.02
_CHECKPOINT_RETRY_S = 1.0  # after a failed checkpoint
_CATCH_UP_CACHE_KB = 48 * 1024
_CATCH_UP_CHECKPOINT_PAGES = 65_536
_CATCH_UP_CHECKPOINT_EVERY_S = 1.0
# A WAL that grew during catch-up is cut back to this at the next checkpoint reset (not
# during catch-up: cutting a file that grows again at once made replay 30% slower).
_WAL_SIZE_LIMIT = 64 * 1024 * 1024



class BatchProjector(Protocol):
    """Read models kept in the batch's transaction (auditd.projections.Projector).

    `project` runs inside the transaction, after the events' INSERT, with the events'
    rows (statements.event_row tuples, in seq order; names already ids) and the
    batch's checkpoint; `committed` after its COMMIT. Both on the store's thread.
    """

    def project(self, db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]],
                checkpoint: int) -> None: ...

    def committed(self, checkpoint: int) -> None: ...


class BatchLedger(Protocol):
    """The Merkle tree kept in the batch's transaction (auditd.proofs.ledger.Ledger).

    `load` at open (after migrations, on the store's thread); `extend` inside each
    batch's transaction with its events and dead letters; then `committed` after its
    COMMIT or `rolled_back` when it failed."""

    def load(self, db: sqlite3.Connection, progress: Progress | None) -> None: ...

    def extend(self, db: sqlite3.Connection, events: Sequence[Any],
               dead: Sequence[Any]) -> None: ...

    def committed(self) -> None: ...

    def rolled_back(self) -> None: ...


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



class Store:
    """The writer's connection lives on one dedicated thread, and a whole batch (names,
    events, streams, dead letters, checkpoint, COMMIT) is one call to it. That lets the
    writer queue the next batch behind the one committing (`submit_batch`), so the
    thread never waits for a busy event loop in between: it sat idle a fifth of the time
    with one aiosqlite round trip per statement. Readers (`lookup_ids`) keep their own
    aiosqlite connection, and WAL checkpoints have a connection and thread of their own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partitions_dir = path.parent / catalog.PARTITIONS_DIR
        self.sealed = SealedSet(self.partitions_dir)
        self._db: sqlite3.Connection | None = None  # touched only on self._thread
        self._thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._names: dict[str, int] = {}  # names-table ids, filled as batches commit
        self._checkpoint = 0  # the last committed checkpoint, as the store's thread saw it
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoint_db: sqlite3.Connection | None = None  # only on _checkpointer
        self.checkpoint_every_s = _CHECKPOINT_EVERY_S
        self.commits = 0  # batches committed, counted on the store's thread
        # Every seq through this is on disk: committed before a WAL checkpoint began
        # that then completed (with synchronous=NORMAL a commit is durable only then).
        self.durable_seq = 0
        self.on_durable: Callable[[int], None] | None = None  # told when durable_seq grows
        # Told on the store's thread, after each COMMIT, of the batch's events and their
        # events-table rows (the query package's hot index), and after a partition is
        # open for reads, of its last seq.
        self.after_commit: Callable[[list[StoredEvent], list[tuple[Any, ...]]], None] | None \
            = None
        self.after_seal: Callable[[int], None] | None = None
        # Set before the first batch (the daemon sets auditd.projections' Projector).
        self.projector: BatchProjector | None = None
        self.ledger: BatchLedger | None = None  # set before open (auditd.proofs)

    def _call(self, function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run `function` on the store's thread, after everything queued before it."""
        return _on(self._thread, function, *args)

    async def open(self, progress: Progress | None = None) -> None:
        """Open (and migrate: `progress` is called as migrations run) the database."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="auditd-store")
        try:
            self._db = await self._call(open_writer, self.path, progress)
            if self.ledger is not None:
                await self._call(self.ledger.load, self._db, progress)
            await self.sealed.add(await self._call(self._catalog_at_start))
            self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="auditd-checkpoint")
            self._checkpoint_db = await _on(self._checkpointer, connect_sync, self.path)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA synchronous=NORMAL")
            await self._reader.execute("PRAGMA busy_timeout=200")
        except sqlite3.Error as exc:
            raise classify(exc, f"opening {self.path}") from exc

    def _catalog_at_start(self) -> list[catalog.CatalogEntry]:
        removed = catalog.remove_leftovers(self.db, self.partitions_dir)
        if removed:
            log.warning("partition_leftovers_removed", files=removed,
                        note="a seal that did not reach its catalog commit; sealed again")
        return catalog.entries(self.db)

    async def close(self) -> None:
        await self.sealed.aclose()
        if self._reader is not None:
            await self._reader.close()
        if self._checkpointer is not None:
            if self._checkpoint_db is not None:
                await _on(self._checkpointer, self._checkpoint_db.close)
            self._checkpointer.shutdown(wait=True)
        # The writer's connection closes last: the last one out checkpoints the WAL.
        if self._db is not None:
            await self._call(self._db.close)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._reader = self._db = self._thread = None
        self._checkpoint_db = self._checkpointer = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store not open"
        return self._db

    async def load_state(self) -> StoreState:
        try:
            return await self._call(self._load_state)
        except sqlite3.Error as exc:
            raise classify(exc, "reading the commit checkpoint and streams") from exc

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

    async def id_hashes(self, sink: Callable[[int], None],
                        progress: Progress | None = None) -> int:
        """Feed every stored id hash to `sink` (in the database thread); return the count."""
        def scan(db: sqlite3.Connection) -> int:
            count = 0
            with watched(db, progress):
                for (value,) in db.execute("SELECT id_hash FROM events"):
                    sink(value)
                    count += 1
                for keys in stored_id_keys(db, self.partitions_dir):
                    for value in keys:
                        sink(value)
                    count += len(keys)
            return count

        try:
            conn = connect_sync(self.path)
            try:
                return await asyncio.to_thread(scan, conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise classify(exc, "reading the stored ids") from exc

    async def lookup_ids(self, ids: Iterable[str]) -> dict[str, int]:
        """The seq under which each of these ids is stored, for those that are."""
        wanted = {event_id: id_hash(event_id) for event_id in ids}
        if not wanted:
            return {}
        assert self._reader is not None
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT id, seq FROM events WHERE id_hash IN (SELECT value FROM json_each(?))",
                (json_list(wanted.values()),))
        except sqlite3.Error as exc:
            raise classify(exc, "looking up ids") from exc
        found = {str(event_id): int(seq) for event_id, seq in rows if event_id in wanted}
        if len(found) < len(wanted):
            found.update(await self.sealed.lookup_ids(i for i in wanted if i not in found))
        return found

    async def on_writer(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(writer_connection, *args)` on the store's thread, between two
        batches (a projection's rebuild step); sqlite3 errors classified."""
        try:
            return await self._call(function, self.db, *args)
        except sqlite3.Error as exc:
            raise classify(exc, f"{getattr(function, '__name__', 'a step')}") from exc

    # -- sealing (sealing.sealer calls these) ---------------------------------------

    async def sealed_through(self) -> int:
        return await self._call(catalog.sealed_through, self.db)

    async def catalog_partition(self, entry: catalog.CatalogEntry) -> None:
        """Make a sealed file part of the store (on the writer's thread, between two
        batches), then open it for reads, before any hot row it holds is released."""
        try:
            await self._call(catalog.add, self.db, entry)
        except sqlite3.Error as exc:
            raise classify(exc, f"cataloguing partition {entry.file}") from exc
        await self.sealed.add([entry])
        if self.after_seal is not None:
            await self._call(self.after_seal, entry.last_seq)

    async def release_hot(self) -> int:
        """Delete the hot rows that sealed partitions hold, a chunk per transaction."""
        total = 0
        try:
            while gone := await self._call(catalog.release_chunk, self.db):
                total += gone
        except sqlite3.Error as exc:
            raise classify(exc, "releasing sealed hot rows") from exc
        return total

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
            with transaction(db):
                missing = self._missing_names(events)
                if missing:
                    fresh = _resolve_names(db, missing)
                lookup = self._names | fresh if fresh else self._names
                name_id = lookup.__getitem__
                rows = [event_row(e, name_id) for e in events]
                insert_rows(db, EVENTS, rows)
                if self.projector is not None:
                    self.projector.project(db, rows, checkpoint)
                streams = {e.stream: (e.stream_seq, e.seq) for e in events if e.stream}
                insert_rows(db, STREAMS, [(lookup[s], v, q) for s, (v, q) in streams.items()])
                insert_rows(db, DEAD_LETTERS, [_dead_row(d) for d in dead])
                if self.ledger is not None:
                    self.ledger.extend(db, events, dead)
                if resolved_dead:
                    db.execute(
                        "DELETE FROM dead_letters WHERE dlq_id IN (SELECT value FROM json_each(?))",
                        (json_list(resolved_dead),))
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'committed_seq' AND value < ?",
                    (checkpoint, checkpoint))
        except BaseException as exc:
            if self.ledger is not None:
                self.ledger.rolled_back()
            if not isinstance(exc, sqlite3.Error):
                raise
            error = classify(exc, "committing a batch")
            if isinstance(error, StoreFaultError):
                # A statement that failed to prepare (a trigger naming a missing table)
                # never looked at the schema on disk: one that runs does, so the next
                # attempt sees an operator's fix made through another connection.
                with contextlib.suppress(sqlite3.Error):
                    db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            raise error from exc
        self._checkpoint = max(self._checkpoint, checkpoint)
        self.commits += 1
        if self.ledger is not None:
            self.ledger.committed()
        if self.after_commit is not None and events:
            self._tell_after_commit(events, rows)
        if self.projector is not None:
            self.projector.committed(checkpoint)
        if fresh:  # only names that are committed join the cache
            if len(self._names) > _NAMES_CACHE_MAX:
                self._names.clear()
            self._names.update(fresh)

    def _tell_after_commit(self, events: list[StoredEvent], rows: list[tuple[Any, ...]]) -> None:
        assert self.after_commit is not None
        try:
            self.after_commit(events, rows)
        except Exception as exc:  # the batch is committed: a hook must not undo that
            log.error("after_commit_failed", first_seq=events[0].seq, n=len(events),
                      error=repr(exc))

    def _missing_names(self, events: list[StoredEvent]) -> set[str]:
        names = self._names
        return {value for e in events for value in (e.type, e.actor, e.target, e.stream, e.comm)
                if value is not None and value not in names}

    async def catch_up(self, on: bool) -> None:
        """Settings for committing a long backlog (journal replay at start), when
        throughput is all that counts: a page cache that holds the hot leaf of every
        index key past a million events, and checkpoints every second rather than
        every 20 ms, so each hot leaf is copied to the database file once per many
        batches rather than after every one."""
        cache_kb, pages, wal_limit = (
            (_CATCH_UP_CACHE_KB, _CATCH_UP_CHECKPOINT_PAGES, -1) if on
            else (WRITER_CACHE_KB, WAL_CHECKPOINT_PAGES, _WAL_SIZE_LIMIT))
        self.checkpoint_every_s = _CATCH_UP_CHECKPOINT_EVERY_S if on else _CHECKPOINT_EVERY_S
        try:
            await self._call(self.db.executescript, f"PRAGMA cache_size=-{cache_kb};"
                             f"PRAGMA wal_autocheckpoint={pages};"
                             f"PRAGMA journal_size_limit={wal_limit};")
        except sqlite3.Error as exc:
            raise classify(exc, "setting the writer's cache") from exc

    async def checkpoint_wal(self, mode: Literal["PASSIVE", "FULL"] = "PASSIVE") -> bool:
        """Copy the WAL into the database file; True when every frame was copied.

        With synchronous=NORMAL a commit is durable against power loss only after
        this, so journal segments are released only behind a complete checkpoint; a
        complete one advances `durable_seq` to what was committed before it began.
        PASSIVE never waits; FULL (at shutdown, the writer drained) waits, through the
        busy timeout, for readers of an older snapshot, which PASSIVE leaves behind.
        """
        db = self._checkpoint_db
        assert db is not None, "store not open"
        committed = self._checkpoint  # set on the store's thread once a COMMIT returned
        try:
            busy, log_frames, copied = await _on(
                self._checkpointer,
                lambda: db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())
        except sqlite3.Error as exc:
            raise classify(exc, "checkpointing the WAL") from exc
        complete = bool(busy == 0 and log_frames == copied)
        if complete and committed > self.durable_seq:
            self.durable_seq = committed
            if self.on_durable is not None:
                self.on_durable(committed)
        return complete

    async def checkpoint_forever(self) -> None:
        """Checkpoint every `checkpoint_every_s` while batches commit.

        PASSIVE: it copies what no reader still needs and never blocks the writer,
        which appends to the WAL meanwhile. Also when no batch committed since, as long
        as the last commit is not known durable (replies may wait for it: see
        Journal.database_durable). Failures are logged once each and retried, slower.
        """
        seen = -1
        fault = RecurringFault(log, "wal_checkpoint_failed", "wal_checkpoint_recovered",
                               level="warning")
        while True:
            await asyncio.sleep(_CHECKPOINT_RETRY_S if fault.error else self.checkpoint_every_s)
            if self.commits == seen and self.durable_seq >= self._checkpoint:
                continue
            seen = self.commits
            try:
                await self.checkpoint_wal()
            except StoreError as exc:
                fault.failed(exc)
                continue
            fault.succeeded()

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        with contextlib.suppress(OSError):  # absent, or a file vanishing meanwhile
            total += sum(p.stat().st_size for p in self.partitions_dir.iterdir())
        return total


def _on(thread: ThreadPoolExecutor | None, function: Callable[..., _T],
        *args: Any) -> asyncio.Future[_T]:
    """Run `function` on one of the store's own single threads."""
    assert thread is not None, "store not open"
    return asyncio.get_running_loop().run_in_executor(thread, function, *args)


def _resolve_names(db: sqlite3.Connection, values: set[str]) -> dict[str, int]:
    insert_rows(db, NAMES, [(v,) for v in values])
    # One row holding them all: sqlite3 gives the GIL up for every row it fetches and
    # waits to get it back from a busy event loop: the bench's first batch, 6,000 new
    # names among 4,096 events, took 630 ms that way and 100-180 ms with one row.
    (found,) = db.execute(
        "SELECT json_group_object(value, id) FROM names"
        " WHERE value IN (SELECT value FROM json_each(?))", (json_list(values),)).fetchone()
    return {str(value): int(name_id) for value, name_id in json.loads(found).items()}


def _dead_row(entry: DeadLetter) -> tuple[Any, ...]:
    now = time.time_ns()
    return (entry.seq, entry.source, entry.code, entry.reason, entry.raw, len(entry.raw),
            entry.uid, entry.attempts, entry.first_failed_at, now)


def _scalar(db: sqlite3.Connection, sql: str) -> Any:
    row = db.execute(sql).fetchone()
    return None if row is None else row[0]
