"""The ingest socket: frame -> validate -> sequence -> journal -> ring -> reply.

One asyncio.Protocol per connection and no coroutine per frame. Frames wait in a
per-connection queue while something holds the connection back (buffer full, a
database id lookup, the client not reading its replies); reading is paused meanwhile,
which is what pushes back on the client. Replies leave in frame order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import structlog

from auditd.errors import DaemonRunningError, JournalError, ProtocolError
from auditd.framing import FrameDecoder, encode_frame
from auditd.journal import Journal, encode_record
from auditd.ring import RingBuffer
from auditd.schema import encoder, reply_bytes
from auditd.sequencer import Acceptance, Peer, Sequencer
from auditd.stats import Stats
from auditd.store import DeadLetter, Store
from auditd.validation import DecodedFrame, ValidEvent, decode_body
from auditd.writer import Pending, Writer

log = structlog.get_logger("auditd.ingest")

_PEERCRED = struct.Struct("3i")
_RETRY_AFTER_MS = 100


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


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            comm = handle.read().strip()
    except OSError:
        comm = ""
    return Peer(pid, uid, gid, comm)


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
        self.tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._room = asyncio.Event()  # set after each commit, for inject()

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

    def set_refusal(self, reason: str | None) -> None:
        if reason != self.refusal:
            (log.warning if reason else log.info)(
                "ingest_refusing" if reason else "ingest_resumed", reason=reason)
        self.refusal = reason
        if reason is None:
            self.journal_fault = None
            self.capacity_freed()

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
        wait = self.journal.wait_synced(conn.sync_position) if (
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


class Connection(asyncio.Protocol):
    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.limits.max_frame_bytes)
        self.frames: deque[tuple[bytes, float]] = deque()
        self.replies: deque[list[Any]] = deque()  # [ready, body, started]
        self.held: set[str] = set()
        self.stored_ids: dict[str, int] | None = None
        self.sync_position = 0
        self.closing = False
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self.peer = Peer(0, -1, -1, "")
        self._started = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server, stats = self.server, self.server.stats
        self.peer = peer_of(self.transport.get_extra_info("socket"))
        server.connections.add(self)
        stats.connections += 1
        stats.connections_total += 1
        stats.connections_by_uid[self.peer.uid] += 1
        if len(server.connections) > server.limits.max_connections:
            log.warning("connection_refused", reason="max_connections", uid=self.peer.uid)
            self.reply_error("overloaded", f"too many connections (max "
                             f"{server.limits.max_connections})", fatal=True,
                             retry_after_ms=1000)

    def connection_lost(self, exc: Exception | None) -> None:
        server, stats = self.server, self.server.stats
        server.connections.discard(self)
        server.blocked.discard(self)
        stats.connections -= 1
        stats.connections_by_uid[self.peer.uid] -= 1
        if stats.connections_by_uid[self.peer.uid] <= 0:
            del stats.connections_by_uid[self.peer.uid]
        self.frames.clear()
        self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        now = time.perf_counter()
        decoder = self.decoder
        for body in decoder.feed(data):
            self.frames.append((body, now))
        if decoder.error is not None:
            self.frames.append((b"", now))  # stands for the framing error, in order
        self.process()

    def eof_received(self) -> bool:
        """The client has said all it will; it still gets every reply it is owed."""
        self.eof = True
        self._close_if_done()
        return True  # keep the transport open for those replies

    def _close_if_done(self) -> None:
        if self.eof and not self.frames and not self.replies and self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.block("writing")  # the client is not reading its replies

    def resume_writing(self) -> None:
        self.unblock("writing")

    # -- flow ----------------------------------------------------------------------

    def process(self) -> None:
        frames, server = self.frames, self.server
        while frames and not self.held and not self.closing:
            body, self._started = frames[0]
            if not body:
                error = self.decoder.error
                assert error is not None
                frames.clear()
                self.reply_error(error.code, error.message, fatal=True)
                return
            if not server.handle(self, body):
                return
            if frames:  # a fatal reply clears the queue
                frames.popleft()
            server.stats.frames += 1
        self._close_if_done()

    def block(self, reason: str) -> None:
        if not self.held and self.transport is not None:
            self.transport.pause_reading()
        self.held.add(reason)

    def unblock(self, reason: str) -> None:
        if reason not in self.held:
            return
        self.held.discard(reason)
        if reason == "buffer":
            self.server.blocked.discard(self)
        if not self.held and not self.closing and self.transport is not None:
            self.transport.resume_reading()
            self.process()

    # -- replies -------------------------------------------------------------------

    def reply_error(self, code: str, message: str, *, fatal: bool = False,
                    retry_after_ms: int | None = None) -> None:
        reply: dict[str, Any] = {"ok": 0, "error": code, "message": message}
        if retry_after_ms is not None:
            reply["retry_after_ms"] = retry_after_ms
        if fatal:
            reply["fatal"] = True
        self.send_reply(reply_bytes(reply), None)
        if fatal:
            self.closing = True
            self.frames.clear()
            if not self.replies and self.transport is not None:
                self.transport.close()

    def send_reply(self, body: bytes, wait: asyncio.Future[None] | None) -> None:
        entry = [wait is None, encode_frame(body), self._started]
        if wait is None and not self.replies:
            self._write(entry)
            return
        self.replies.append(entry)
        if wait is not None:
            wait.add_done_callback(functools.partial(self._ready, entry))

    def _ready(self, entry: list[Any], _done: object = None) -> None:
        entry[0] = True
        replies = self.replies
        while replies and replies[0][0]:
            self._write(replies.popleft())
        if self.closing and not replies and self.transport is not None:
            self.transport.close()
        self._close_if_done()

    def _write(self, entry: list[Any]) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(entry[1])
        self.server.stats.reply_latency_ms.observe((time.perf_counter() - entry[2]) * 1000)

    def transport_close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()
