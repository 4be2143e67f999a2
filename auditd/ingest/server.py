"""The ingest socket: frame -> validate -> sequence -> journal -> ring -> reply.

One asyncio.Protocol per connection (connection.py) and no coroutine per frame; this
module decides what each frame gets: accepted, rejected, refused or held back.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from auditd.config import RateLimit
from auditd.errors import DaemonRunningError, JournalError, ProtocolError
from auditd.ingest.connection import Connection
from auditd.ingest.daemon_events import DaemonEvents
from auditd.ingest.fairness import BufferShares, LoopShares, RateLimiter
from auditd.ingest.lookups import IdLookups
from auditd.ingest.scheduler import FrameScheduler
from auditd.ingest.sequencer import Acceptance, Peer, Sequencer
from auditd.ingest.validation import DecodedFrame, ValidEvent, decode_body
from auditd.journal.journal import Journal, encode_record
from auditd.ring import RingBuffer
from auditd.schema import encoder, reply_bytes
from auditd.stats import Stats
from auditd.store.store import DeadLetter, Store
from auditd.store.writer import Pending, Writer

log = structlog.get_logger("auditd.ingest.server")

_RETRY_AFTER_MS = 100
HOLD_REASONS = ("buffer", "lookup", "writing")  # what Connection.block() is called with
_LOOKUP_RETRY_AFTER_MS = 1000


@dataclass(slots=True)
class IngestLimits:
    max_frame_bytes: int
    max_batch_events: int
    max_event_bytes: int
    max_connections: int
    overflow: str
    fsync: bool
    rate_limit: RateLimit | None = None  # ingest.rate_limit; None is off


def bind_unix(path: str, mode: int) -> socket.socket:
    """Bind a listening socket, replacing a stale file but never a live daemon's socket."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            log.info("stale_socket_replaced", path=path)
        else:
            raise DaemonRunningError(f"another daemon is already listening on {path}")
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class IngestServer:
    def __init__(self, limits: IngestLimits, sequencer: Sequencer, journal: Journal,
                 ring: RingBuffer[Pending], writer: Writer, store: Store,
                 stats: Stats) -> None:
        self.limits = limits
        self.sequencer = sequencer
        self.journal = journal
        self.ring = ring
        self.writer = writer
        self.store = store
        self.stats = stats
        self.connections: set[Connection] = set()
        self.blocked: set[Connection] = set()
        self.shutting_down = False
        self.refusal: str | None = None  # why ingest cannot accept now (disk full)
        self.journal_fault: str | None = None  # why the last journal append failed
        self._journal_refusal: str | None = None  # the journal's sync fault, as refused
        self.tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._room = asyncio.Event()  # set after each commit, for inject()
        # A failed journal sync: ingest refuses until the journal proved a new segment,
        # and the replies it covered wait for the database's copy to be on disk.
        journal.on_fault = self._journal_sync_fault
        store.on_durable = journal.database_durable
        self.rate = RateLimiter(limits.rate_limit)
        self.shares = BufferShares(ring.capacity, ring.max_bytes, stats.pending_by_uid,
                                   stats.connections_by_uid)
        self.scheduler = FrameScheduler(LoopShares())
        self.lookups = IdLookups(store, stats)
        self.own_events = DaemonEvents(self)

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        # asyncio listens again with its own backlog (default 100): keep it generous so a
        # burst of connections queues rather than being refused.
        self._server = await loop.create_unix_server(
            lambda: Connection(self), sock=sock, backlog=max(1024, self.limits.max_connections))

    def stop_accepting(self) -> None:
        """No new connections; open ones are answered shutting_down from now on."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):  # held frames now get shutting_down
            conn.unblock("rate")
            conn.unblock("buffer")

    async def aclose(self) -> None:
        for conn in list(self.connections):
            conn.transport_close()
        if self._server is not None:
            await self._server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.lookups.aclose()
        await self.own_events.aclose()

    def set_rate_limit(self, limit: RateLimit | None) -> None:
        """A reload of ingest.rate_limit. Frames held by the old limit wait out their
        timer (then meet the new one); with no limit they go on at once."""
        self.limits.rate_limit = limit
        self.rate.configure(limit)
        if limit is None:
            for conn in list(self.connections):
                conn.unblock("rate")

    def capacity_freed(self) -> None:
        """Called after each commit: resume senders blocked on a full buffer."""
        self.shares.committed(self.stats.last_committed_seq)
        self._room.set()
        if self.blocked and self.refusal is None and self.ring.below_low_water():
            for conn in list(self.blocked):
                conn.unblock("buffer")

    def held_counts(self) -> dict[str, int]:
        """Open connections held back right now, by reason: a full buffer (or a refusal),
        an id lookup, a client not reading its replies. One connection may count twice."""
        counts = dict.fromkeys(HOLD_REASONS, 0)
        for conn in self.connections:
            for reason in conn.held:
                counts[reason] = counts.get(reason, 0) + 1
        return counts

    def set_refusal(self, reason: str | None) -> None:
        if reason is None and self.journal.fault is not None:
            reason = self.journal.fault  # only the journal clears a failed sync
        if reason != self.refusal:
            (log.warning if reason else log.info)(
                "ingest_refusing" if reason else "ingest_resumed", reason=reason)
        self.refusal = reason
        if reason is None:
            self.journal_fault = None
            self.capacity_freed()

    def _journal_sync_fault(self, reason: str | None) -> None:
        """The journal's sync failed (`reason`), or a new segment synced again (None)."""
        if reason is not None:
            self.set_refusal(reason)
        elif self.refusal is not None and self.refusal == self._journal_refusal:
            self.set_refusal(None)
        self._journal_refusal = reason

    # -- one frame ---------------------------------------------------------------

    def handle(self, conn: Connection, body: bytes) -> bool:
        """Answer one frame; False when it must wait (the connection is then held)."""
        if self.shutting_down:
            conn.reply_error("shutting_down", "the daemon is stopping; nothing was accepted")
            return True
        try:
            frame = decode_body(body, self.limits.max_batch_events,
                                self.limits.max_event_bytes)
        except ProtocolError as exc:
            if exc.code == "batch_too_large":
                self._refuse_batch(conn, body, exc.message)
            else:
                conn.reply_error(exc.code, exc.message, fatal=exc.fatal)
            return True
        if frame.valid:
            gate = self._gate(conn, frame.valid, body)
            if gate is not None:
                return gate
        acceptance = self._accept(conn, frame)
        if acceptance is None:
            return self.limits.overflow == "reject"
        self._reply(conn, frame, acceptance)
        return True

    def _gate(self, conn: Connection, valid: list[ValidEvent], body: bytes) -> bool | None:
        """None when the frame may be accepted now (its tokens are then spent); else
        True once it is answered (refused) or False when it is held."""
        count, size = len(valid), sum(v.size for v in valid)
        ring, uid = self.ring, conn.peer.uid
        if count > ring.capacity:
            self._refuse_batch(conn, body, f"batch of {count} events exceeds "
                               f"the buffer capacity of {ring.capacity}")
            return True
        limit = self.limits.rate_limit
        now = time.monotonic() if limit is not None else 0.0
        if limit is not None:
            wait = self.rate.wait_s(uid, count, now)
            if wait > 0:
                return self._held_back(
                    conn, "rate_limit", count, f"uid {uid} is over ingest.rate_limit "
                    f"({limit}); nothing of the frame was accepted",
                    math.ceil(wait * 1000), wait)
        if self.refusal is not None or not ring.has_room(count, size):
            return self._held_back(conn, "buffer", count,
                                   self.refusal or "the buffer is full", _RETRY_AFTER_MS)
        # Only with events pending: their commit is what resumes a held frame, and into
        # an empty buffer any frame that fits may go.
        if ring.pending and self.shares.contended(ring.free, ring.pending_bytes, count, size):
            share = self.shares.over_share(uid, count)
            if share is not None:
                return self._held_back(
                    conn, "share", count, f"the buffer is nearly full and uid {uid} holds "
                    f"{self.shares.pending.get(uid, 0)} of its {ring.capacity} events, over "
                    f"its fair share of {share}; nothing of the frame was accepted",
                    _RETRY_AFTER_MS)
        if conn.lookup_error is not None:  # the lookup gave up: answer, and move on
            message, conn.lookup_error = conn.lookup_error, None
            self.stats.id_lookup_refused_frames += 1
            conn.reply_error("overloaded", message, retry_after_ms=_LOOKUP_RETRY_AFTER_MS)
            return True
        if conn.stored_ids is not None and self.sequencer.evicted_through > conn.lookup_seq:
            conn.stored_ids = None  # an id may have left the recent window since: ask again
        if conn.stored_ids is None:
            lookups = self.sequencer.pending_lookups(valid)
            if lookups:
                self._look_up(conn, lookups)
                return False
        if limit is not None:
            self.rate.take(uid, count, now)
        return None

    def _held_back(self, conn: Connection, reason: str, count: int, message: str,
                   retry_after_ms: int, wait_s: float = 0.0) -> bool:
        """Refuse the frame (overflow "reject": True) or hold its connection (False).

        Held for the rate limit, a timer resumes it; for the buffer or a share, the
        commit that brings the buffer below its low-water mark (capacity_freed).
        """
        uid = conn.peer.uid
        if self.limits.overflow == "reject":
            self.stats.refused_events[uid, reason] += count
            conn.reply_error("overloaded", message, retry_after_ms=retry_after_ms)
            return True
        if reason not in conn.frame_holds:  # counted once per frame and reason
            conn.frame_holds.add(reason)
            self.stats.held_events[uid, reason] += count
        if reason == "rate_limit":
            conn.hold_for("rate", wait_s)
        else:
            conn.block("buffer")
            self.blocked.add(conn)
        return False

    def _refuse_batch(self, conn: Connection, body: bytes, message: str) -> None:
        """Refused whole, yet kept as a dead letter: a fire-and-forget client's events
        can still be found (overloaded and shutting_down are not: clients resend those)."""
        self.writer.add_dead_letters([
            DeadLetter("ingest", "batch_too_large", message, body, uid=conn.peer.uid)])
        self.stats.dead_lettered("batch_too_large")
        conn.reply_error("batch_too_large", message)

    def _accept(self, conn: Connection, frame: DecodedFrame) -> Acceptance | None:
        stored_ids, conn.stored_ids = conn.stored_ids or {}, None
        try:
            return self.accept_events(frame.valid, conn.peer, stored_ids, conn)
        except JournalError as exc:
            self.rate.refund(conn.peer.uid, len(frame.valid))  # the frame comes back
            self.journal_failed(exc)
            if self.limits.overflow == "reject":
                conn.reply_error("overloaded", str(exc), retry_after_ms=1000)
            else:
                conn.block("buffer")
                self.blocked.add(conn)
            return None

    def accept_events(self, valid: list[ValidEvent], peer: Peer, stored_ids: dict[str, int],
                      conn: Connection | None = None) -> Acceptance:
        """Sequence, journal and buffer events; the caller checked the ring has room.

        On a journal failure the sequencing is undone and JournalError propagates.
        """
        acceptance = self.sequencer.accept(valid, peer, time.time_ns(), stored_ids)
        stored = acceptance.stored
        if stored:
            records = b"".join([encode_record(e.seq, encoder.encode(e)) for e in stored])
            try:
                position = self.journal.append(records, stored[0].seq, stored[-1].seq)
            except JournalError:
                self.sequencer.undo(acceptance)
                raise
            if conn is not None:
                conn.sync_position = position
            self.sequencer.commit(acceptance)
            self.ring.push(stored, acceptance.sizes)
            self.shares.admitted(peer.uid, stored[0].seq, stored[-1].seq)
            self.writer.wake()
            self.stats.accepted += len(stored)
        return acceptance

    def journal_failed(self, exc: JournalError) -> None:
        self.journal_fault = str(exc)
        self.set_refusal(str(exc))

    def can_take(self, valid: list[ValidEvent]) -> bool:
        """Whether events the daemon originates fit now (no rate limit or share applies)."""
        return self.refusal is None and self.ring.has_room(len(valid),
                                                           sum(v.size for v in valid))

    async def wait_for_room(self) -> None:
        """Until the next commit (or the end of a refusal): then check can_take() again."""
        self._room.clear()
        await self._room.wait()

    def _reply(self, conn: Connection, frame: DecodedFrame, acceptance: Acceptance) -> None:
        stats = self.stats
        stored = acceptance.stored
        reply: dict[str, Any] = {"ok": len(stored)}
        if stored:
            reply["first"], reply["last"] = stored[0].seq, stored[-1].seq
        rejected = frame.rejected + acceptance.rejected
        if rejected:
            reply["rejected"] = sorted(rejected) if acceptance.rejected else rejected
            stats.rejected += len(rejected)
            uid = conn.peer.uid
            raws = {v.index: v.raw for v in frame.valid}
            raws.update(zip((r[0] for r in frame.rejected), frame.rejected_raw, strict=True))
            self.writer.add_dead_letters([
                DeadLetter("ingest", code, message, raws[index], uid=uid)
                for index, code, message in rejected])
            stats.dead_lettered("rejected", len(rejected))
        if acceptance.duplicates:
            reply["duplicates"] = acceptance.duplicates
            stats.duplicates += len(acceptance.duplicates)
        # Past a failed journal sync, this waits for the database's copy instead.
        wait = self.journal.wait_synced(conn.sync_position, stored[-1].seq) if (
            stored and self.limits.fsync) else None
        conn.send_reply(reply_bytes(reply), wait)

    def _look_up(self, conn: Connection, ids: list[str]) -> None:
        """Ask the database about ids the Bloom filter cannot rule out, off the loop.

        A lookup that keeps failing is given up on after IdLookups' attempts: the frame
        is then answered overloaded (handle() sees conn.lookup_error), never wedged.
        """
        conn.block("lookup")
        seq_at_start = self.sequencer.last_seq

        async def look_up() -> None:
            found = await self.lookups.find(ids)
            if found is None:
                conn.lookup_error = (
                    f"the id lookup failed {self.lookups.attempts} times "
                    f"({self.lookups.last_error}); nothing of the frame was accepted, "
                    "send it again")
            elif self.sequencer.evicted_through <= seq_at_start:
                conn.stored_ids, conn.lookup_seq = found, seq_at_start
            conn.unblock("lookup")

        task = asyncio.get_running_loop().create_task(look_up())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
