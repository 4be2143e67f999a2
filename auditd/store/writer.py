"""The writer task: the only caller of store writes.

It drains pending events from the ring in batches, one transaction each, and advances
the commit checkpoint in that same transaction. Failures are classified (sqlite_errors):
transient ones are retried with capped, jittered exponential backoff while ingest keeps
journaling; a permanent one splits the batch until the poison events are isolated
and dead-lettered, and their neighbours are committed; a fault of the database itself
(corrupt, read-only, cannot be opened...) is retried only every `retry_max_delay`, and
health says `failing` until a commit succeeds. Each failing state is logged once, when
it begins, not at every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from auditd.errors import (
    BatchSkippedError,
    PermanentStoreError,
    StoreError,
    StoreFaultError,
    TransientStoreError,
)
from auditd.ring import RingBuffer
from auditd.schema import StoredEvent, encoder
from auditd.stats import Stats
from auditd.store.store import DeadLetter, Store

log = structlog.get_logger("auditd.store.writer")
_CATCH_UP_FACTOR = 8


@dataclass(slots=True)
class Gap:
    """A seq whose event cannot be stored (damaged journal bytes, a poison event): it
    travels through the ring in seq order and is committed as a dead letter."""

    seq: int
    letter: DeadLetter
    correlation_id: None = None

    @property
    def received_at(self) -> int:
        return self.letter.first_failed_at


Pending = StoredEvent | Gap  # what the ring holds between ingest and the writer


class _Abandoned(Exception):
    """Stopping while the database is unusable: pending events stay in the journal (they
    replay at the next start); `dead` are seq-less rejects in hand, for the fallback."""

    def __init__(self, dead: list[DeadLetter]) -> None:
        super().__init__("stopped while the database is unusable")
        self.dead = dead


class Writer:
    def __init__(self, store: Store, ring: RingBuffer[Pending], stats: Stats, *,
                 batch_max: int, batch_delay_ms: int, retry_max_delay_ms: int,
                 fallback_path: Path, on_committed: Callable[[int], None],
                 on_batch: Callable[[list[Pending]], None] | None = None) -> None:
        self.store = store
        self.ring = ring
        self.stats = stats
        self.batch_max = self._configured_batch_max = batch_max
        self.batch_delay = batch_delay_ms / 1000
        self.retry_max_delay = retry_max_delay_ms / 1000
        self.fallback_path = fallback_path
        self.on_committed = on_committed
        # Each committed batch, in seq order, once the ring has marked it (the follow
        # feed): called on the loop, and must not block.
        self.on_batch = on_batch
        # Seqs of events _commit dead-lettered: the batch still holds them as events.
        self._poisoned: set[int] = set()
        self.dead_letters: list[DeadLetter] = []  # waiting to be written with a batch
        self.fault: str | None = None  # why commits are failing now, for health
        # Why the database cannot be written (a StoreFaultError): health's `failing`.
        self.database_fault: str | None = None
        # SQLite said the file is damaged: kept until a restart sets the file aside.
        self.database_damage: str | None = None
        self._failing_state: str | None = None  # what was last logged as failing
        self._work = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._restores: list[tuple[StoredEvent, int, asyncio.Future[str | None]]] = []
        # Cleared while the sealer is a whole bound behind (hold()): commits wait, the
        # buffer fills and ingest's overflow policy pushes back, so the hot table (and
        # memory) stays bounded when sealing cannot keep up with a flood.
        self._room = asyncio.Event()
        self._room.set()
        self.held_for: str | None = None  # why commits wait now, for health

    async def catch_up(self, on: bool) -> None:
        """Replaying a long journal at start: bigger batches, as nobody waits on a
        single event, and the store's catch-up settings. A batch dirties about one
        page per index key it touches, so eight times the rows cost far less than
        eight times the writes. Replay of 1M events: 60 s without catch-up, 35 s with
        4x batches and the bigger cache, 28 s with 8x and time-ordered id keys."""
        self.batch_max = self._configured_batch_max * (_CATCH_UP_FACTOR if on else 1)
        await self.store.catch_up(on)

    def wake(self) -> None:
        if not self._work.is_set():
            self._work.set()

    def add_dead_letters(self, entries: list[DeadLetter]) -> None:
        self.dead_letters.extend(entries)
        self.wake()

    def restore(self, event: StoredEvent, dlq_id: int) -> asyncio.Future[str | None]:
        """Re-commit a dead-lettered event under its original seq; the future gives the
        error that stopped it again, or None once it is stored and the entry removed."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._restores.append((event, dlq_id, future))
        self.wake()
        return future

    async def _run_restores(self) -> None:
        restores, self._restores = self._restores, []
        for event, dlq_id, future in restores:
            try:
                await self.store.insert_batch([event], [], 0, (dlq_id,))
            except StoreError as exc:
                future.set_result(str(exc))
            else:
                self.stats.committed += 1
                future.set_result(None)

    def hold(self, reason: str | None) -> None:
        """Commits wait while `reason` is set (the sealer's backpressure); None resumes."""
        if reason is not None and self.held_for is None:
            log.warning("commits_held", reason=reason)
        elif reason is None and self.held_for is not None:
            log.info("commits_resumed")
        self.held_for = reason
        if reason is None:
            self._room.set()
        else:
            self._room.clear()

    def stop(self) -> None:
        """Finish what is pending, then return from run() (a hold no longer applies)."""
        self._stopping = True
        self._stopped.set()
        self._room.set()
        self.wake()

    async def run(self) -> None:
        ring = self.ring
        while True:
            if self._restores:
                await self._run_restores()
            if not ring.pending and not self.dead_letters:
                if self._stopping:
                    return
                self._work.clear()
                await self._work.wait()
                if self._restores:
                    continue
                # Coming from idle: give the batch a moment to fill.
                if (self.batch_delay and ring.pending < self.batch_max
                        and not self._stopping):
                    await asyncio.sleep(self.batch_delay)
            if not self._room.is_set() and not self._stopping:
                await self._room.wait()
            batch = ring.peek_pending(self.batch_max)
            dead, self.dead_letters = self.dead_letters, []
            try:
                await self._commit_pipelined(batch, dead)
            except _Abandoned as abandoned:
                log.error("writer_abandoned", pending=ring.pending, reason=self.database_fault,
                          note="pending events stay in the journal and replay at start")
                rejects, self.dead_letters = [*abandoned.dead, *self.dead_letters], []
                if rejects:
                    self._write_fallback(rejects, str(self.database_fault))
                return

    async def _commit_pipelined(self, batch: list[Pending], dead: list[DeadLetter]) -> None:
        """Commit `batch`, and while it commits hand the store the batch after it.

        Between two batches the store's thread would otherwise wait for the event loop,
        which under load is busy reading frames: measured, a fifth of its time. The
        batch queued behind commits only if its predecessor did; when one fails, the
        failed one goes through _commit (retry, isolation) and the next is peeked again.
        """
        started = time.perf_counter()
        # Handed to the store here rather than by _commit, whose task starts later:
        # the store's thread must receive the batches in seq order.
        queued: asyncio.Future[None] | None = self._submit(batch, dead, after=None)
        while queued is not None:
            current = asyncio.ensure_future(self._commit(batch, dead, queued))
            following: list[Pending] = []
            if batch and not self._restores and not self._stopping and self._room.is_set():
                following = self.ring.peek_pending(self.batch_max, skip=len(batch))
            queued = None
            if following:
                dead, self.dead_letters = self.dead_letters, []
                queued = self._submit(following, dead, after=batch[-1].seq)
            try:
                await current
            except _Abandoned as abandoned:
                if queued is not None:  # skipped untried, since `current` did not commit
                    queued.add_done_callback(_retrieved)
                    abandoned.dead.extend(dead)
                raise
            self._account(batch, started)
            started, batch = time.perf_counter(), following

    def _submit(self, entries: list[Pending], dead: list[DeadLetter],
                after: int | None) -> asyncio.Future[None]:
        events, letters = _split(entries, dead)
        return self.store.submit_batch(events, letters, entries[-1].seq if entries else 0,
                                       after)

    def _account(self, batch: list[Pending], started: float) -> None:
        self.ring.mark_committed(len(batch))
        stats = self.stats
        stats.committed += len(batch) - sum(type(e) is Gap for e in batch)
        stats.commit_latency_ms.observe((time.perf_counter() - started) * 1000)
        stats.batch_size.observe(len(batch))
        stats.last_commit_at = time.monotonic()
        if batch:
            stats.last_committed_seq = batch[-1].seq
            poisoned, self._poisoned = self._poisoned, set()
            if self.on_batch is not None:
                self.on_batch([e for e in batch if e.seq not in poisoned] if poisoned
                              else batch)
        self.on_committed(stats.last_committed_seq)

    async def _commit(self, entries: list[Pending], dead: list[DeadLetter],
                      queued: asyncio.Future[None] | None = None) -> None:
        """Commit `entries` (in seq order) and `dead` (seq-less rejects) in one transaction.

        `queued` is this very batch already handed to the store by _commit_pipelined:
        its outcome counts as the first attempt.

        The checkpoint is the last entry's seq and never more: a seq is only passed once
        everything before it is stored or dead-lettered.
        """
        checkpoint = entries[-1].seq if entries else 0
        attempt = 0
        while True:
            try:
                if queued is not None:  # split already, by _submit: not again on the loop
                    attempt_done, queued = queued, None
                    try:
                        await attempt_done
                    except BatchSkippedError:
                        continue  # never tried: try it now
                else:
                    events, letters = _split(entries, dead)
                    await self.store.insert_batch(events, letters, checkpoint)
            except (TransientStoreError, StoreFaultError) as exc:
                events, letters = _split(entries, dead)
                attempt += 1
                self.stats.commit_failures += 1
                self._failing(exc, events=len(events), dead=len(letters))
                await self._pause(exc, attempt, dead)
                continue
            except PermanentStoreError as exc:
                events, letters = _split(entries, dead)
                if dead:
                    # First find out whether the rejects are the poison: they go alone,
                    # to the fallback file if even that fails, never an event with them.
                    dead = await self._commit_rejects(dead)
                    continue
                if len(entries) > 1:
                    half = len(entries) // 2
                    await self._commit(entries[:half], dead)
                    await self._commit(entries[half:], [])
                    return
                if events:
                    event = events[0]
                    log.error("event_dead_lettered", seq=event.seq, error=str(exc))
                    self._poisoned.add(event.seq)
                    entries = [Gap(event.seq, DeadLetter(
                        "writer", "commit_failed", str(exc), encoder.encode(event), event.seq,
                        event.uid))]
                    self.stats.dead_lettered("commit_failed")
                    continue
                self._write_fallback(letters, str(exc))
                entries, dead = [], []
                continue
            self._recovered(attempt)
            return

    async def _commit_rejects(self, dead: list[DeadLetter]) -> list[DeadLetter]:
        """Write seq-less dead letters on their own; returns what is left to write (none).

        Failures are classified as for events: retried (and shown) while the database
        may take them, written to the fallback file when it refuses these very rows.
        """
        attempt = 0
        while True:
            try:
                await self.store.insert_batch([], dead, 0)
            except (TransientStoreError, StoreFaultError) as exc:
                attempt += 1
                self.stats.commit_failures += 1
                self._failing(exc, events=0, dead=len(dead))
                await self._pause(exc, attempt, dead)
                continue
            except PermanentStoreError as exc:
                self._write_fallback(dead, str(exc))
            self._recovered(attempt)
            return []

    def _failing(self, exc: TransientStoreError | StoreFaultError, *, events: int,
                 dead: int) -> None:
        """Say why commits fail, for health; log it once per state, not per retry."""
        if isinstance(exc, StoreFaultError):
            state = exc.code
            self.fault = self.database_fault = (
                f"the database cannot be written ({exc.code}): {exc}; retried every "
                f"{self.retry_max_delay:g} s, events wait in the journal")
            if exc.damaged and self.database_damage is None:
                self.database_damage = (
                    f"SQLite reports the database file damaged ({exc.code}): {exc}; "
                    "restart the daemon: its start-up check moves the file aside and the "
                    "journal replays into a fresh one; then run `auditd recover`")
        else:
            state = "transient"
            self.database_fault = None
            self.fault = f"commits are failing and being retried: {exc}"
        if state == self._failing_state:
            return
        self._failing_state = state
        if isinstance(exc, StoreFaultError):
            log.error("database_faulted", code=exc.code, damaged=exc.damaged, error=str(exc),
                      events=events, dead_letters=dead, retry_every_s=self.retry_max_delay)
        else:
            log.warning("commit_failing", error=str(exc), events=events, dead_letters=dead)

    def _recovered(self, attempts: int) -> None:
        if self._failing_state is not None:
            log.info("commit_recovered", attempts=attempts, after=self._failing_state)
        self._failing_state = self.fault = self.database_fault = None

    async def _pause(self, exc: StoreError, attempt: int, dead: list[DeadLetter]) -> None:
        """Before the next attempt: a backoff step after a transient error; after a
        fault, `retry_max_delay`, cut short by stop(), which then abandons the work."""
        if not isinstance(exc, StoreFaultError):
            await asyncio.sleep(self._backoff(attempt))
            return
        if not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.retry_max_delay)
        if self._stopping:
            raise _Abandoned(list(dead))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.retry_max_delay, 0.01 * (2 ** min(attempt, 16)))
        return float(ceiling * random.uniform(0.5, 1.0))

    def _write_fallback(self, dead: list[DeadLetter], error: str) -> None:
        """Dead letters the database refuses go to a file, so nothing is dropped."""
        log.critical("dead_letters_to_fallback_file", path=str(self.fallback_path),
                     entries=len(dead), error=error)
        with self.fallback_path.open("ab") as handle:
            for entry in dead:
                handle.write(encoder.encode({
                    "seq": entry.seq, "source": entry.source, "code": entry.code,
                    "reason": entry.reason, "raw": entry.raw, "error": error}) + b"\n")


def _retrieved(future: asyncio.Future[None]) -> None:
    """A batch skipped untried: its error is known and expected, not left unretrieved."""
    if not future.cancelled():
        future.exception()


def _split(entries: list[Pending], dead: list[DeadLetter]) -> tuple[list[StoredEvent],
                                                                     list[DeadLetter]]:
    """A batch's events, and its dead letters: seq-less rejects and the Gaps' letters."""
    events = [e for e in entries if isinstance(e, StoredEvent)]
    return events, [*dead, *(e.letter for e in entries if isinstance(e, Gap))]
