"""The ingest socket: frame -> validate -> sequence -> journal -> ring -> reply.

One asyncio.Protocol per connection (connection.py) and no coroutine per frame; this
module decides what each frame gets: accepted, rejected, refused or held back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from auditd.errors import DaemonRunningError, JournalError, ProtocolError
from auditd.ingest.connection import Connection
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


@dataclass(slots=True)
class IngestLimits:
    max_frame_bytes: int
    max_batch_events: int
    max_event_bytes: int
    max_connections: int
    overflow: str
    fsync: bool


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
        for conn in list(self.blocked):
            conn.unblock("buffer")

    async def aclose(self) -> None:
        for conn in list(self.connections):
            conn.transport_close()
        if self._server is not None:
            await self._server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def capacity_freed(self) -> None:
        """Called after each commit: resume senders blocked on a full buffer."""
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
        valid = frame.valid
        if valid:
            size = sum(v.size for v in valid)
            if len(valid) > self.ring.capacity:
                self._refuse_batch(conn, body, f"batch of {len(valid)} events exceeds "
                                   f"the buffer capacity of {self.ring.capacity}")
                return True
            if self.refusal is not None or not self.ring.has_room(len(valid), size):
                if self.limits.overflow == "reject":
                    conn.reply_error("overloaded", self.refusal or "the buffer is full",
                                     retry_after_ms=_RETRY_AFTER_MS)
                    return True
                conn.block("buffer")
                self.blocked.add(conn)
                return False
            if conn.stored_ids is None:
                lookups = self.sequencer.pending_lookups(valid)
                if lookups:
                    self._look_up(conn, lookups)
                    return False
        acceptance = self._accept(conn, frame)
        if acceptance is None:
            return self.limits.overflow == "reject"
        self._reply(conn, frame, acceptance)
        return True

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
            self.journal_fault = str(exc)
            self.set_refusal(str(exc))
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
            self.writer.wake()
            self.stats.accepted += len(stored)
        return acceptance

    async def inject(self, valid: list[ValidEvent], peer: Peer) -> Acceptance:
        """Accept events the daemon itself originates (admin actions, dead-letter retries),
        waiting for buffer room instead of refusing."""
        size = sum(v.size for v in valid)
        ids = self.sequencer.pending_lookups(valid)
        stored_ids = await self.store.lookup_ids(ids) if ids else {}
        while self.refusal is not None or not self.ring.has_room(len(valid), size):
            self._room.clear()
            await self._room.wait()
        acceptance = self.accept_events(valid, peer, stored_ids)
        if acceptance.stored and self.limits.fsync:
            await self.journal.wait_synced(self.journal.written)
        return acceptance

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
        """Ask the database about ids the Bloom filter cannot rule out, off the loop."""
        conn.block("lookup")
        seq_at_start = self.sequencer.last_seq

        async def look_up() -> None:
            try:
                found = await self.store.lookup_ids(ids)
            except Exception as exc:  # a failed lookup must not wedge the connection
                log.error("id_lookup_failed", error=str(exc))
                found = None
            if found is not None and self.sequencer.evicted_through <= seq_at_start:
                conn.stored_ids = found
            conn.unblock("lookup")

        task = asyncio.get_running_loop().create_task(look_up())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
