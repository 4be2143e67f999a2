"""BufferedSender: events to auditd from a background thread; the caller never waits.

`submit` is all a logging call pays: it gives the event its id, encodes it, and appends
the bytes to a bounded buffer under a lock that the sender thread only ever holds for a
few list operations, and that `submit` waits for at most `max_block` seconds. It never
touches the socket. When the buffer is full (events or bytes) the event is dropped and
counted in `dropped`; the first drop of an episode (until an event is buffered again)
is logged once, as a warning of the `auditd.client` logger.

The sender thread takes a batch, sends it as one frame on a `Client`, and on any
disconnection keeps the batch, waits (backoff doubling up to `max_backoff`) and sends
it again on a new connection. Ids are set before the first send, so a batch resent
after a lost reply is answered under `duplicates`: each event is stored once.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from types import TracebackType
from typing import Self

import msgspec

from auditd.client.blocking import Client
from auditd.client.common import DisconnectedError, Event, FrameError, OverloadedError, Reply
from auditd.client.plain import without_surrogates
from auditd.ingest.framing import encode_frame
from auditd.schema import uuid7

log = logging.getLogger("auditd.client")

DEFAULT_SOCKET = "/run/auditd/ingest.sock"
SOCKET_ENV = "AUDITD_INGEST_SOCKET"

_encoder = msgspec.msgpack.Encoder()
# Set on a thread whose submissions must be dropped, not buffered: the sender thread
# (what it logs is about the sender) and a caller logging a drop warning (a handler of
# ours on that logger would otherwise submit again, and drop again, recursively).
_quiet = threading.local()
_live: weakref.WeakSet[BufferedSender] = weakref.WeakSet()


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


class BufferedSender:
    """A bounded buffer of encoded events and the thread that delivers them.

    Invariants: `_queue` plus the batch in flight never exceed `max_events` events nor
    `max_bytes` bytes; every submitted event ends in exactly one of `delivered`
    (stored, or already stored: a duplicate), `rejected` (the daemon or the size limit
    refused it) or `dropped` (no room, or still undelivered when `close` gave up).
    Counters are read under the lock, so they add up at any moment. What the sender
    thread itself logs, and a drop warning, is counted as dropped if it comes back to
    `submit` (through a handler of ours), never buffered.
    """

    def __init__(self, path: str | None = None, *, max_events: int = 10_000,
                 max_bytes: int = 8 << 20, batch_events: int = 500,
                 batch_bytes: int = 512 << 10, max_event_bytes: int = 256 << 10,
                 max_block: float = 0.005, connect_timeout: float = 1.0,
                 max_backoff: float = 5.0, close_timeout: float = 2.0) -> None:
        for name, value in (("max_events", max_events), ("max_bytes", max_bytes),
                            ("batch_events", batch_events), ("batch_bytes", batch_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.path = path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.max_event_bytes = max_event_bytes
        self.max_block = max_block
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.close_timeout = close_timeout
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child (the parent keeps
        delivering what it had buffered; the child's copy would only be duplicates)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the sender thread waits here
        self._idle = threading.Condition(self._lock)  # flush() waits here
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._in_flight = 0  # events of the batch being sent
        self._in_flight_bytes = 0
        self._missed: deque[int] = deque()  # lock waits given up; counted under the lock
        self._delivered = self._duplicates = self._rejected = self._dropped = 0
        self._dropping = False
        self._warned_rejected = False
        self._warned_failure = False
        self._hurry = False  # flush() asked: cut a backoff short
        self._closing = False
        self._abandoned = False  # close() gave up on what was left
        self._connected = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the caller's side ---------------------------------------------------------

    def submit(self, event: Event) -> bool:
        """Buffer `event` (its `id` set if absent) for delivery; False if it was dropped
        or refused. Waits for nothing but the buffer's lock, at most `max_block` s."""
        if getattr(_quiet, "on", False):
            self._missed.append(1)
            return False
        if event.get("id") is None:
            event["id"] = uuid7()
        try:
            try:
                body = _encoder.encode(event)
            except UnicodeEncodeError:  # rare: the slower, escaping way only then
                body = _encoder.encode(without_surrogates(event))
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return self._refuse(f"cannot encode the event: {exc}")
        if len(body) > self.max_event_bytes:
            return self._refuse(f"event of {len(body)} bytes over max_event_bytes "
                                f"{self.max_event_bytes}")
        if not self._lock.acquire(timeout=self.max_block):
            self._missed.append(1)  # deque.append is atomic: no lock needed to count it
            return False
        try:
            self._count_missed()
            room = (len(self._queue) + self._in_flight < self.max_events
                    and self._queued_bytes + self._in_flight_bytes + len(body) <= self.max_bytes)
            if room and not self._closing:
                self._queue.append(body)
                self._queued_bytes += len(body)
                self._dropping = False
                if self._thread is None:
                    self._start_thread()
                self._work.notify()
                return True
            self._dropped += 1
            first_of_episode, self._dropping = not self._dropping, True
            held = len(self._queue) + self._in_flight
        finally:
            self._lock.release()
        if first_of_episode:
            self._warn("auditd_events_dropped: buffer full (%d events) or closed; dropping "
                       "new events until there is room (count: .dropped)", held)
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is delivered, at most `timeout` s
        (default `close_timeout`); True if it was. A backoff in progress is cut short."""
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        with self._lock:
            self._hurry = True
            self._work.notify()
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or self._abandoned:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Deliver what can be within `timeout` s (default `close_timeout`), then stop;
        what is left undelivered is counted as dropped. Idempotent."""
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self.flush(max(deadline - time.monotonic(), 0))
        with self._lock:
            left = len(self._queue) + self._in_flight
            self._dropped += left
            self._queue.clear()
            self._queued_bytes = self._in_flight = self._in_flight_bytes = 0
            self._abandoned = True
            self._work.notify()
            self._idle.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(deadline - time.monotonic(), 0))
        if left:
            self._warn("auditd_sender_closed: %d events left undelivered", left)

    @property
    def delivered(self) -> int:
        """Events the daemon stored (or had stored: duplicates included)."""
        with self._lock:
            return self._delivered

    @property
    def duplicates(self) -> int:
        with self._lock:
            return self._duplicates

    @property
    def rejected(self) -> int:
        with self._lock:
            return self._rejected

    @property
    def dropped(self) -> int:
        with self._lock:
            self._count_missed()
            return self._dropped

    @property
    def pending(self) -> int:
        """Events buffered or in flight."""
        with self._lock:
            return len(self._queue) + self._in_flight

    @property
    def connected(self) -> bool:
        return self._connected

    def _count_missed(self) -> None:
        while self._missed:
            self._dropped += self._missed.popleft()

    def _refuse(self, reason: str) -> bool:
        with self._lock:
            self._rejected += 1
            warn, self._warned_rejected = not self._warned_rejected, True
        if warn:
            self._warn("auditd_event_refused: %s (further refusals are only counted: "
                       ".rejected)", reason)
        return False

    def _warn(self, message: str, *args: object) -> None:
        _quiet.on = True
        try:
            log.warning(message, *args)
        finally:
            _quiet.on = False

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="auditd-sender", daemon=True)
        self._thread.start()

    # -- the sender thread ---------------------------------------------------------

    def _run(self) -> None:
        _quiet.on = True
        client: Client | None = None
        try:
            while (batch := self._take()) is not None:
                client = self._deliver(batch, client)
        finally:
            self._connected = False
            if client is not None:
                client.close()

    def _take(self) -> list[bytes] | None:
        """The next batch, moved from the queue to in flight; None once closing and idle."""
        with self._lock:
            while not self._queue:
                if self._closing:
                    return None
                self._work.wait()
            if len(self._queue) <= self.batch_events and self._queued_bytes <= self.batch_bytes:
                # All of it: one swap, so callers never wait on a long loop of pops.
                batch, size = list(self._queue), self._queued_bytes
                self._queue.clear()
            else:
                batch, size = [], 0
                while self._queue and len(batch) < self.batch_events and (
                        not batch or size + len(self._queue[0]) <= self.batch_bytes):
                    body = self._queue.popleft()
                    batch.append(body)
                    size += len(body)
            self._queued_bytes -= size
            self._in_flight, self._in_flight_bytes = len(batch), size
            return batch

    def _deliver(self, batch: list[bytes], client: Client | None) -> Client | None:
        """Send `batch` until the daemon answers it, reconnecting with backoff; returns
        the connection to keep. Gives up only when close() abandoned the batch."""
        parts = [batch]  # a frame the daemon refuses whole is split until it fits
        backoff = 0.0
        while parts and not self._abandoned:
            part = parts[0]
            try:
                if client is None:
                    client = Client(self.path, reconnect=False, max_in_flight=1,
                                    connect_timeout=self.connect_timeout, overload_retries=3,
                                    raise_on_reject=False)
                    client.connect()
                    self._connected = True
                frame = encode_frame(_array_header(len(part)) + b"".join(part))
                (reply,) = client.send_frames([frame])
            except OverloadedError:
                backoff = self._back_off(backoff)
            except FrameError as exc:
                if exc.fatal and client is not None:  # the daemon closes this connection
                    client.close()
                    client, self._connected = None, False
                parts.pop(0)
                if len(part) > 1:
                    half = len(part) // 2
                    parts[:0] = [part[:half], part[half:]]
                    if exc.code == "batch_too_large":
                        self.batch_events = max(1, half)
                else:
                    self._settle(part, None, f"{exc.code}: {exc.message}")
            except Exception as exc:
                # Disconnected (the usual case), or anything else the connection raised:
                # either way this thread must live on, or every later event is dropped.
                if not isinstance(exc, DisconnectedError | OSError) and not self._warned_failure:
                    self._warned_failure = True
                    log.error("auditd_sender_failed: %r; reconnecting (logged once)", exc,
                              exc_info=exc)
                if client is not None:
                    client.close()
                client, self._connected = None, False
                backoff = self._back_off(backoff)
            else:
                parts.pop(0)
                backoff = 0.0
                self._settle(part, reply, None)
        return client

    def _back_off(self, previous: float) -> float:
        """Wait before the next attempt, cut short by flush() or close(); the next delay."""
        delay = min(max(previous * 2, 0.05), self.max_backoff)
        # Jittered, so many processes whose daemon restarts do not all reconnect at once.
        until = time.monotonic() + delay * random.uniform(0.5, 1.0)
        with self._lock:
            while not (self._hurry or self._abandoned):
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._work.wait(left)
            self._hurry = False
        return delay

    def _settle(self, part: list[bytes], reply: Reply | None, refusal: str | None) -> None:
        """Account for in-flight events the daemon answered (or refused whole)."""
        rejected = len(part) if reply is None else len(reply.rejected)
        if reply is not None and reply.rejected:
            index, code, text = reply.rejected[0]
            refusal = f"#{index} {code}: {text}"
        with self._lock:
            if self._abandoned:
                return  # close() already counted these as dropped
            self._in_flight -= len(part)
            self._in_flight_bytes -= sum(map(len, part))
            if reply is not None:
                self._delivered += reply.ok + len(reply.duplicates)
                self._duplicates += len(reply.duplicates)
            self._rejected += rejected
            warn = rejected > 0 and not self._warned_rejected
            self._warned_rejected = self._warned_rejected or warn
            if not self._in_flight:
                self._idle.notify_all()
        if warn:
            log.warning("auditd_event_refused: %s (further refusals are only counted: "
                        ".rejected)", refusal)


def _after_fork_in_child() -> None:
    for sender in list(_live):
        sender._reset()


def _close_all_at_exit() -> None:
    for sender in list(_live):
        sender.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered after logging's own hook, so it runs first (atexit is LIFO): handlers that
# logging.shutdown() closes then find their sender closed already, within its bound.
atexit.register(_close_all_at_exit)
