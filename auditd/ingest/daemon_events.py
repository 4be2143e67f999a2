"""Events the daemon itself originates: the admin trail and dead-letter retries.

They go through ingest like a client's (sequenced, journaled, buffered) but are never
refused for a rate limit or a share, and they wait for buffer room rather than being
answered overloaded, for a bounded time only: an operator's call must answer while
ingest refuses (a full buffer with a stalled writer, the disk below its reserve).

An admin event ingest cannot take in time is queued, in order, and a task of this
object accepts it as soon as ingest can. Whatever is still queued when the server
closes is journaled alone at that point (the writer has stopped, so no checkpoint can
pass it) and committed by the replay at the next start. Queued events live in memory
until then: a crash meanwhile loses them (the log names each one). The queue is
bounded (`max_queued`): past it, as journald does with a source over its rate limit,
an event is counted rather than kept (one log line each, with its data), and once the
queue has drained one `auditd.admin.suppressed` event records how many of each type
were left out and when: a caller spamming refused admin calls while ingest refuses
cannot grow the daemon's memory without end, and the trail still shows it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from typing import Protocol

import msgspec
import structlog

from auditd.errors import JournalError
from auditd.ingest.lookups import IdLookups
from auditd.ingest.sequencer import Acceptance, Peer, Sequencer
from auditd.ingest.validation import ValidEvent
from auditd.journal.journal import Journal, encode_record
from auditd.schema import WireEvent, encoder

log = structlog.get_logger("auditd.ingest.daemon_events")

MAX_QUEUED = 1024  # admin events held in memory while ingest refuses; past it: counted
SUPPRESSED_TYPE = "auditd.admin.suppressed"


class Fsync(Protocol):
    @property
    def fsync(self) -> bool: ...


class Ingest(Protocol):
    """What this needs of the ingest server (defined here: the server imports this)."""

    @property
    def sequencer(self) -> Sequencer: ...
    @property
    def journal(self) -> Journal: ...
    @property
    def lookups(self) -> IdLookups: ...
    @property
    def limits(self) -> Fsync: ...
    @property
    def refusal(self) -> str | None: ...

    def can_take(self, valid: list[ValidEvent]) -> bool: ...
    async def wait_for_room(self) -> None: ...
    def journal_failed(self, exc: JournalError) -> None: ...
    def accept_events(self, valid: list[ValidEvent], peer: Peer,
                      stored_ids: dict[str, int]) -> Acceptance: ...


_DAEMON = Peer(os.getpid(), os.getuid(), os.getgid(), "auditd")


class DaemonEvents:
    """inject() with a bound; record() that queues what the bound could not place."""

    def __init__(self, ingest: Ingest, max_queued: int = MAX_QUEUED) -> None:
        self.ingest = ingest
        self.max_queued = max_queued
        self.queued: deque[tuple[list[ValidEvent], Peer]] = deque()  # oldest first
        # Left out while the queue was full: count by type, first and last time (ns).
        self.suppressed: dict[str, int] = {}
        self._suppressed_span = (0, 0)
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # after aclose(): journal at once, start no task

    async def inject(self, valid: list[ValidEvent], peer: Peer,
                     within: float) -> Acceptance | None:
        """Accept the events, waiting up to `within` seconds for room; None when ingest
        could not take them in time (then nothing of them was accepted).

        Cancellation: before acceptance nothing is done; after it, the events stand.
        """
        ingest, sequencer = self.ingest, self.ingest.sequencer
        deadline = time.monotonic() + within
        while True:
            seq_at_start = sequencer.last_seq
            ids = sequencer.pending_lookups(valid)
            found = await ingest.lookups.find(ids) if ids else {}
            if found is None:
                return None
            while not ingest.can_take(valid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await ingest.wait_for_room()
            if not ids or sequencer.evicted_through <= seq_at_start:
                break  # else an id may have left the recent window meanwhile: ask again
        try:
            acceptance = ingest.accept_events(valid, peer, found)
        except JournalError as exc:
            ingest.journal_failed(exc)
            return None
        if acceptance.stored and ingest.limits.fsync:
            await ingest.journal.wait_synced(ingest.journal.written)
        return acceptance

    async def record(self, valid: list[ValidEvent], peer: Peer, within: float) -> str:
        """Record events that carry no client id (the admin trail): "recorded" once
        journaled within `within` seconds; else "queued" behind any queued before them
        and accepted as soon as ingest can take them, or "suppressed" (counted in the
        next auditd.admin.suppressed event) when the queue is full."""
        if not self.queued and await self.inject(valid, peer, within) is not None:
            return "recorded"
        if self._closed:  # a request that outlived ingest (the status server stops last)
            return "recorded" if self._journal_alone(valid, peer) else "failed"
        if len(self.queued) >= self.max_queued:
            self._suppress(valid)
            return "suppressed"
        self.queued.append((valid, peer))
        log.warning("admin_event_queued", type=valid[0].event.type, queued=len(self.queued),
                    reason=self.ingest.refusal or "the buffer is full")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._accept_queued(), name="admin_events_queued")
        return "queued"

    def _suppress(self, valid: list[ValidEvent]) -> None:
        kind = valid[0].event.type
        now = time.time_ns()
        first = self._suppressed_span[0] if self.suppressed else now
        self._suppressed_span = (first, now)
        self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
        log.warning("admin_event_suppressed", type=kind, queued=len(self.queued),
                    suppressed=sum(self.suppressed.values()),
                    record=msgspec.msgpack.decode(encoder.encode(valid[0].event)))

    def _queue_suppressed_summary(self) -> None:
        """One event saying what the full queue left out, behind what it held."""
        counts, (first, last) = self.suppressed, self._suppressed_span
        self.suppressed = {}
        data = {"suppressed": counts, "total": sum(counts.values()),
                "first_ns": first, "last_ns": last, "max_queued": self.max_queued}
        event = WireEvent(type=SUPPRESSED_TYPE, actor="auditd",
                          data=msgspec.Raw(encoder.encode(data)))
        raw = encoder.encode({"type": event.type, "actor": event.actor})
        self.queued.append(([ValidEvent(0, event, None, raw)], _DAEMON))

    async def _accept_queued(self) -> None:
        ingest, queued = self.ingest, self.queued
        while queued or self.suppressed:
            if not queued:
                self._queue_suppressed_summary()
            valid, peer = queued[0]
            if not ingest.can_take(valid):
                await ingest.wait_for_room()
                continue
            try:
                acceptance = ingest.accept_events(valid, peer, {})
            except JournalError as exc:
                ingest.journal_failed(exc)  # refusing now: wait for room again
                continue
            queued.popleft()  # in the same step as the acceptance: never twice
            log.info("admin_event_recorded", type=valid[0].event.type,
                     seq=acceptance.stored[0].seq, queued=len(queued))

    async def aclose(self) -> None:
        """Stop the task; journal what is still queued (call once the writer is done)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.suppressed:
            self._queue_suppressed_summary()
        while self.queued:
            self._journal_alone(*self.queued.popleft())

    def _journal_alone(self, valid: list[ValidEvent], peer: Peer) -> bool:
        """Into the journal without the buffer: only once the writer has stopped, so that
        no checkpoint passes these seqs in this run; the next start's replay commits them
        in seq order after whatever was pending."""
        sequencer = self.ingest.sequencer
        acceptance = sequencer.accept(valid, peer, time.time_ns(), {})
        stored = acceptance.stored
        records = b"".join([encode_record(e.seq, encoder.encode(e)) for e in stored])
        try:
            self.ingest.journal.append(records, stored[0].seq, stored[-1].seq)
        except JournalError as exc:
            sequencer.undo(acceptance)
            log.critical("admin_event_lost", error=str(exc),  # the last place it is
                         record=msgspec.msgpack.decode(encoder.encode(valid[0].event)))
            return False
        sequencer.commit(acceptance)
        log.warning("admin_event_journaled_at_stop", type=valid[0].event.type,
                    seq=stored[0].seq, note="committed at the next start")
        return True
