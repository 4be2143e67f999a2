"""Client: the pipelining client for plain blocking scripts (poll(), no event loop)."""

from __future__ import annotations

import math
import select
import socket
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from auditd.client.common import (
    _DROPPED,
    MAX_REPLY_BYTES,
    DisconnectedError,
    Event,
    FrameError,
    Outage,
    OverloadedError,
    Reply,
    _ClientBase,
    batches,
    check_rejected,
    check_rejected_many,
    classify,
    decode_reply,
    encode,
    retry_delay,
)
from auditd.errors import ClientError
from auditd.ingest.framing import FrameDecoder


class Client(_ClientBase):
    """Blocking client on a plain socket driven by poll(); no event loop, no thread.

    Every call returns with nothing in flight: after a frame error it writes nothing new,
    collects the replies still due, then raises; interrupted (Ctrl-C) with frames in
    flight, it drops the connection so a stale reply can never be matched to a new frame.
    """

    def _init_connection(self) -> None:
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(MAX_REPLY_BYTES)

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        self._must_be_open()
        if self._sock is None:
            if self._connected_once and self.reconnect:
                self._reconnect(Outage(self.reconnect_deadline))
            else:
                self._open()

    def send(self, event: Event) -> Reply:
        return check_rejected(self._exchange([encode(event)])[0], self.raise_on_reject)

    def send_batch(self, events: Sequence[Event]) -> Reply:
        return check_rejected(self._exchange([encode(events)])[0], self.raise_on_reject)

    def send_many(self, events: Sequence[Event], batch: int = 100) -> list[Reply]:
        """Send `events` in frames of `batch`, pipelined; replies in frame order."""
        chunks = batches(events, batch)
        replies = self._exchange([encode(chunk) for chunk in chunks])
        return check_rejected_many(replies, [len(c) for c in chunks], self.raise_on_reject)

    def send_frames(self, frames: Sequence[bytes]) -> list[Reply]:
        """Send frames already built with `encode` (ids set), pipelined; their replies.

        Rejections are left in the replies: the caller built the frames and counts them.
        """
        return self._exchange(list(frames))

    def close(self) -> None:
        self._closed = True
        self._drop()

    def _exchange(self, wires: list[bytes]) -> list[Reply]:
        """Send the frames with at most max_in_flight unacknowledged; return their replies."""
        self.connect()
        todo: deque[int] = deque(range(len(wires)))  # frame indexes to write, in order
        retry: deque[int] = deque()  # answered overloaded: written again before `todo`
        paused_until = 0.0  # monotonic time before which nothing new is written
        pending: deque[int] = deque()  # written on this connection, unacknowledged
        written = [False] * len(wires)
        attempts = [0] * len(wires)
        replies: list[Reply | None] = [None] * len(wires)
        failure: ClientError | None = None
        outage: Outage | None = None
        out = bytearray()

        def requeue_and_reconnect(cause: BaseException | None, reply: Reply | None) -> None:
            nonlocal outage
            todo.extendleft(reversed(pending))
            pending.clear()
            out.clear()
            outage = outage or Outage(self.reconnect_deadline)
            if reply is not None:
                outage.wait_at_least(reply)
            self._reconnect(outage, cause)

        try:
            while pending or retry or todo:
                now = time.monotonic()
                while now >= paused_until and (retry or todo) and len(pending) < self.max_in_flight:
                    pending.append((retry or todo).popleft())
                    written[pending[-1]] = True
                    out += wires[pending[-1]]
                wait = paused_until - now if (retry or todo) and now < paused_until else None
                if not pending:
                    time.sleep(wait or 0)
                    continue
                try:
                    bodies = self._pump(out, wait)
                except _DROPPED as exc:
                    requeue_and_reconnect(exc, None)
                    continue
                for body in bodies:
                    if not pending:
                        self._drop()
                        raise ClientError("auditd sent a reply for no frame")
                    reply = decode_reply(body)
                    try:
                        action = classify(reply)
                        if action == "retry" and attempts[pending[0]] >= self.overload_retries:
                            raise OverloadedError(reply)
                    except FrameError as exc:
                        # Write nothing new, but frames already written keep going
                        # (resent after a drop) so none is left in doubt.
                        action, failure = "done", failure or exc
                        todo = deque(index for index in todo if written[index])
                        retry.clear()
                    if action == "reconnect":
                        requeue_and_reconnect(None, reply)  # the rest of `bodies` is stale
                        break
                    outage = None
                    frame = pending.popleft()
                    if action == "retry":
                        # One pause for a burst of overloaded replies, not one per reply;
                        # replies still due keep being read meanwhile.
                        attempts[frame] += 1
                        retry.append(frame)
                        paused_until = max(paused_until, time.monotonic() + retry_delay(reply))
                    else:
                        replies[frame] = reply
        except BaseException:
            if pending:
                self._drop()
            raise
        if failure is not None:
            raise failure
        return [reply for reply in replies if reply is not None]

    def _pump(self, out: bytearray, wait: float | None) -> list[bytes]:
        """Wait until the socket can move data; write some of `out`, read what arrived."""
        sock = self._sock
        if sock is None:
            raise EOFError("not connected")
        poller = select.poll()
        poller.register(sock, select.POLLIN | (select.POLLOUT if out else 0))
        bodies: list[bytes] = []
        for _fd, mask in poller.poll(None if wait is None else math.ceil(wait * 1000)):
            if mask & select.POLLOUT and out:
                try:
                    del out[: sock.send(out)]
                except BrokenPipeError:
                    # The daemon closed; replies it sent first may still be buffered,
                    # so read on until EOF rather than resend frames already answered.
                    out.clear()
            if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                data = sock.recv(1 << 16)
                if not data:
                    raise EOFError("auditd closed the connection")
                bodies = self._decoder.feed(data)
                if self._decoder.error is not None:
                    raise EOFError("reply stream out of step")
        return bodies

    def _reconnect(self, outage: Outage, cause: BaseException | None = None) -> None:
        self._drop()
        while self.reconnect and (delay := outage.next_delay()) is not None:
            time.sleep(delay)
            try:
                return self._open()
            except DisconnectedError:
                continue
        raise self._gave_up() from cause

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.path)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise self._refused(exc) from exc
        self._sock = sock
        self._decoder = FrameDecoder(MAX_REPLY_BYTES)
        self._connected_once = True

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
