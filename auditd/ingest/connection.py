"""One ingest connection: bytes in, frames queued, replies out in frame order.

The connection holds frames while something holds it back (a full buffer, a database
id lookup, a client not reading its replies) and pauses reading meanwhile, which is
what pushes back on the client. It decides nothing about events: its `FrameHandler`
(the ingest server) does. The handler is a protocol defined here so that this module
never imports the server that creates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from typing import Any, Protocol, cast

import structlog

from auditd.ingest.framing import FrameDecoder, encode_frame
from auditd.ingest.scheduler import FrameScheduler
from auditd.ingest.sequencer import Peer
from auditd.schema import reply_bytes
from auditd.stats import Stats

log = structlog.get_logger("auditd.ingest.server")

_PEERCRED = struct.Struct("3i")
# Frames read ahead of the one being handled: past this the socket is not read, so a
# flooding client's bytes wait in the kernel (backpressure), not in this process.
_READ_AHEAD_FRAMES = 4


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            comm = handle.read().strip()
    except OSError:
        comm = ""
    return Peer(pid, uid, gid, comm)


class ConnectionLimits(Protocol):
    @property
    def max_frame_bytes(self) -> int: ...
    @property
    def max_connections(self) -> int: ...


class FrameHandler(Protocol):
    """What a connection needs of the server that accepted it."""

    @property
    def limits(self) -> ConnectionLimits: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def connections(self) -> set[Connection]: ...
    @property
    def blocked(self) -> set[Connection]: ...
    @property
    def scheduler(self) -> FrameScheduler: ...

    def handle(self, conn: Connection, body: bytes) -> bool:
        """Answer one frame; False when it must wait (the connection is then held)."""
        ...


class Connection(asyncio.Protocol):
    def __init__(self, server: FrameHandler) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.limits.max_frame_bytes)
        self.frames: deque[tuple[bytes, float]] = deque()
        # (wait, body, started): a reply goes out once it and all before it are ready
        self.replies: deque[tuple[asyncio.Future[None] | None, bytes, float]] = deque()
        self.held: set[str] = set()
        # About the frame at the head of the queue, until it is answered:
        self.stored_ids: dict[str, int] | None = None  # the database's id lookup answers
        self.lookup_seq = 0  # sequencer.last_seq when that lookup began
        self.lookup_error: str | None = None  # the lookup gave up: answer with this
        self.frame_holds: set[str] = set()  # reasons it was held for, each counted once
        self._wake: asyncio.TimerHandle | None = None  # ends a hold_for() ...
        self._wake_reason = ""  # ... of this reason
        self._reading = True  # the transport reads (asyncio starts it reading)
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
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

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

    @property
    def uid(self) -> int:
        return self.peer.uid

    def process(self) -> None:
        """Something changed (frames read, a hold ended): run the queued frames through
        the scheduler, which takes every connection's frames in a fair order, or, with
        nothing to run, write what is ready and read again."""
        if self.frames and not self.held and not self.closing:
            self.server.scheduler.want(self)
        else:
            self.settle()

    def run_one(self) -> bool:
        """Handle the first queued frame (the scheduler's call); whether more may run."""
        frames, server = self.frames, self.server
        if frames and not self.held and not self.closing:
            body, self._started = frames[0]
            if not body:
                error = self.decoder.error
                assert error is not None
                frames.clear()
                self.reply_error(error.code, error.message, fatal=True)
            elif server.handle(self, body):
                if frames:  # a fatal reply clears the queue
                    frames.popleft()
                self.frame_holds.clear()
                server.stats.frames += 1
        return bool(frames) and not self.held and not self.closing

    def settle(self) -> None:
        """Write every reply that is ready, read again if few frames wait, close once
        an ended client has had every reply."""
        self.flush()
        self._set_reading()
        self._close_if_done()

    def _set_reading(self) -> None:
        """Read from the socket only while nothing holds the connection and few frames
        wait: what keeps a client's bytes in the kernel, and so pushes back on it."""
        want = not self.held and len(self.frames) < _READ_AHEAD_FRAMES
        if want != self._reading and self.transport is not None and not self.closing:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def block(self, reason: str) -> None:
        self.held.add(reason)
        self._set_reading()

    def hold_for(self, reason: str, seconds: float) -> None:
        """block(reason) until a timer unblocks it (or unblock() does): no polling."""
        self.block(reason)
        if self._wake is not None:
            self._wake.cancel()
        self._wake_reason = reason
        self._wake = asyncio.get_running_loop().call_later(seconds, self.unblock, reason)

    def unblock(self, reason: str) -> None:
        if reason not in self.held:
            return
        self.held.discard(reason)
        if self._wake is not None and reason == self._wake_reason:
            self._wake.cancel()
            self._wake = None
        if reason == "buffer":
            self.server.blocked.discard(self)
        if not self.held and not self.closing and self.transport is not None:
            self.process()  # resumes reading once few frames wait

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
            self.flush()

    def send_reply(self, body: bytes, wait: asyncio.Future[None] | None) -> None:
        """Queue a reply behind the earlier ones; it goes out with the next flush after
        `wait` (the fsync that covers its events) is done."""
        self.replies.append((wait, encode_frame(body), self._started))
        if wait is not None:
            wait.add_done_callback(self._ready)

    def _ready(self, _done: object) -> None:
        self.flush()
        self._close_if_done()

    def flush(self) -> None:
        """Write every reply that is ready, in order, in one write.

        Called once per pass over received data (and per fsync), not per frame: a
        send(2) to a client's socket also wakes the client, and one per frame was 8% of
        the event loop's time under the batched flood.
        """
        replies, ready = self.replies, []
        while replies and (replies[0][0] is None or replies[0][0].done()):
            ready.append(replies.popleft())
        transport = self.transport
        if ready:
            now = time.perf_counter()
            observe = self.server.stats.reply_latency_ms.observe
            for _, _, started in ready:
                observe((now - started) * 1000)
            if transport is not None and not transport.is_closing():
                transport.write(b"".join([body for _, body, _ in ready]))
        if self.closing and not replies and transport is not None:
            transport.close()

    def transport_close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()
