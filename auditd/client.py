"""Client library: AsyncClient for asyncio (and uvloop), Client for plain blocking scripts.

Both pipeline frames and match replies in FIFO order, which protocol.md guarantees. Every
event gets an `id` before it is first sent, so a frame whose reply was lost (daemon restart,
`shutting_down`) is simply sent again after reconnecting: the daemon answers the events it
already stored under `duplicates`, and each event is stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

from auditd.errors import ClientError, RejectedError
from auditd.framing import HEADER_BYTES, FrameDecoder, encode_frame
from auditd.schema import uuid7

Event = dict[str, Any]
# Replies are small, but a refused 10,000-event batch lists 10,000 messages; a length
# beyond this cannot be a reply and means the stream is out of step.
MAX_REPLY_BYTES = 64 * 1024 * 1024
# OSError covers ConnectionResetError, BrokenPipeError, FileNotFoundError (socket file
# gone while the daemon restarts), ConnectionRefusedError and TimeoutError.
_DROPPED = (OSError, EOFError, asyncio.IncompleteReadError)


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """One reply frame: the daemon's answer to one client frame (protocol.md)."""

    ok: int
    first: int | None = None
    last: int | None = None
    rejected: list[tuple[int, str, str]] = msgspec.field(default_factory=list)
    duplicates: list[tuple[int, int]] = msgspec.field(default_factory=list)
    error: str | None = None
    message: str | None = None
    retry_after_ms: int | None = None
    fatal: bool = False


class FrameError(ClientError):
    """The daemon refused a whole frame (batch_too_large, bad_frame, frame_too_large...)."""

    def __init__(self, reply: Reply) -> None:
        self.code = reply.error or "bad_reply"
        self.message = reply.message or self.code
        self.fatal = reply.fatal
        self.reply = reply
        super().__init__(f"{self.code}: {self.message}")


class OverloadedError(FrameError):
    """The daemon still answered `overloaded` after the configured number of retries."""


class DisconnectedError(ClientError):
    """No connection, and none could be (re)made in time; unacknowledged frames are lost."""


class ClientClosedError(DisconnectedError):
    """The client was closed while the call was outstanding, or before it."""


_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def prepare(events: Iterable[Event]) -> None:
    """Give every event without an `id` a UUIDv7, in place.

    In place on purpose: a caller that retries with the same dicts after an error then
    resends the same ids, so its own retry is idempotent too.
    """
    for event in events:
        if not isinstance(event, dict):
            raise TypeError(f"an event is a dict, not {type(event).__name__}")
        if event.get("id") is None:
            event["id"] = uuid7()


def encode(payload: Event | Sequence[Event]) -> bytes:
    """One frame for an event (a map) or a batch (an array), ids set first."""
    prepare([payload] if isinstance(payload, dict) else payload)
    return encode_frame(_encoder.encode(payload))


def decode_reply(body: bytes) -> Reply:
    """Decode a reply body; an undecodable one becomes a `bad_reply` refusal of its frame."""
    try:
        return _reply_decoder.decode(body)
    except msgspec.DecodeError as exc:
        return Reply(ok=0, error="bad_reply", message=f"undecodable reply: {exc}")


Action = Literal["done", "retry", "reconnect"]


def classify(reply: Reply) -> Action:
    """What to do with a frame's reply; raises FrameError when the frame itself was refused.

    `retry`: overloaded, send it again after retry_after_ms. `reconnect`: send it and every
    frame after it again on a new connection.
    """
    if reply.error is None:
        return "done"
    if reconnects(reply):
        return "reconnect"
    if reply.error == "overloaded":
        return "retry"
    raise FrameError(reply)


def reconnects(reply: Reply) -> bool:
    """shutting_down, or overloaded and fatal (too many connections): the link is done for,
    and nothing of the frame was accepted."""
    return reply.error == "shutting_down" or (reply.error == "overloaded" and reply.fatal)


def retry_delay(reply: Reply) -> float:
    return max(reply.retry_after_ms if reply.retry_after_ms is not None else 100, 0) / 1000


def check_rejected(reply: Reply, raise_on_reject: bool = True) -> Reply:
    if reply.rejected and raise_on_reject:
        raise RejectedError(_describe(reply.rejected), reply.rejected,
                            msgspec.to_builtins(reply))
    return reply


def check_rejected_many(replies: list[Reply], sizes: list[int],
                        raise_on_reject: bool = True) -> list[Reply]:
    """Raise one RejectedError for all frames; its indexes point into the whole event list."""
    if not raise_on_reject or not any(reply.rejected for reply in replies):
        return replies
    rejected: list[tuple[int, str, str]] = []
    duplicates: list[tuple[int, int]] = []
    offset = 0
    for reply, size in zip(replies, sizes, strict=True):
        rejected += [(offset + index, code, text) for index, code, text in reply.rejected]
        duplicates += [(offset + index, seq) for index, seq in reply.duplicates]
        offset += size
    total = {"ok": sum(reply.ok for reply in replies), "rejected": rejected,
             "duplicates": duplicates}
    raise RejectedError(_describe(rejected), rejected, total)


def _describe(rejected: list[tuple[int, str, str]]) -> str:
    index, code, text = rejected[0]
    return f"{len(rejected)} event(s) rejected; first: #{index} {code}: {text}"


def batches(events: Sequence[Event], size: int) -> list[Sequence[Event]]:
    if size < 1:
        raise ValueError("batch must be at least 1")
    return [events[start : start + size] for start in range(0, len(events), size)]


class Outage:
    """One outage: from the first drop until a reply shows the daemon is back.

    It spans several connections on purpose: a daemon that accepts and then answers
    `shutting_down` again must not restart the deadline each time.
    """

    def __init__(self, deadline: float) -> None:
        self.ends = time.monotonic() + deadline
        self.delay = 0.0

    def wait_at_least(self, reply: Reply) -> None:
        if reply.retry_after_ms is not None:
            self.delay = max(self.delay, retry_delay(reply))

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt (0 first), None once the deadline passed."""
        left = self.ends - time.monotonic()
        if left <= 0:
            return None
        delay, self.delay = self.delay, min(max(self.delay * 2, 0.05), 1.0)
        return min(delay, left)


class _ClientBase:
    """Settings and helpers both clients share."""

    def __init__(self, path: str, *, max_in_flight: int = 1024, connect_timeout: float = 5.0,
                 reconnect: bool = True, reconnect_deadline: float = 30.0,
                 overload_retries: int = 10, raise_on_reject: bool = True) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.path = path
        self.max_in_flight = max_in_flight
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.reconnect_deadline = reconnect_deadline
        self.overload_retries = overload_retries
        self.raise_on_reject = raise_on_reject
        self._connected_once = False
        self._closed = False
        self._init_connection()

    def _init_connection(self) -> None:
        """Set up the subclass's connection state (so the signature above is written once)."""

    def _must_be_open(self) -> None:
        if self._closed:
            raise ClientClosedError("client is closed")

    def _gave_up(self) -> DisconnectedError:
        if not self.reconnect:
            return DisconnectedError("connection to auditd lost and reconnect is off")
        return DisconnectedError(
            f"auditd at {self.path} did not come back within {self.reconnect_deadline} s")

    def _refused(self, exc: OSError) -> DisconnectedError:
        return DisconnectedError(f"cannot connect to {self.path}: {exc}")


class AsyncClient(_ClientBase):
    """Pipelining asyncio client; one reader task matches replies to frames in FIFO order.

    Invariant: `_pending` holds the unacknowledged frames in the order written on the
    current connection; whoever appends writes the frame in the same step (no await in
    between), except during a reconnect, which then writes them all. Cancelling a send
    only stops the wait: its frame keeps its place so later replies still match, and it
    is not resent after a reconnect. The first connection is a single attempt so a wrong
    path fails fast; later ones retry until `reconnect_deadline` when `reconnect` is on.
    """

    def _init_connection(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._pending: deque[tuple[bytes, asyncio.Future[Reply]]] = deque()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._outage: Outage | None = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        async with self._connect_lock:
            self._must_be_open()
            if self._reader_task is not None:
                return
            if self._connected_once and self.reconnect:
                reader = await self._reconnect()
            else:
                reader, self._writer = await self._open()
            self._connected_once = True
            self._reader_task = asyncio.create_task(self._read_replies(reader))

    async def send(self, event: Event) -> Reply:
        return check_rejected(await self._send(encode(event)), self.raise_on_reject)

    async def send_batch(self, events: Sequence[Event]) -> Reply:
        return check_rejected(await self._send(encode(events)), self.raise_on_reject)

    async def send_many(self, events: Sequence[Event], batch: int = 100) -> list[Reply]:
        """Send `events` in frames of `batch`, all pipelined; replies in frame order."""
        chunks = batches(events, batch)
        # Every id is set before the first frame goes out: the frames are built here.
        sends = [self._send(encode(chunk)) for chunk in chunks]
        results = await asyncio.gather(*sends, return_exceptions=True)
        replies = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            replies.append(result)
        return check_rejected_many(replies, [len(c) for c in chunks], self.raise_on_reject)

    async def close(self) -> None:
        """Close the connection; calls still waiting get ClientClosedError."""
        self._closed = True
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._fail_pending(ClientClosedError("client closed"))
        await self._drop()

    async def _send(self, wire: bytes) -> Reply:
        async with self._slots:
            for _attempt in range(self.overload_retries + 1):
                if self._reader_task is None:
                    await self.connect()
                self._must_be_open()
                future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
                self._pending.append((wire, future))
                # A closing writer means a drop the reader task has yet to see; it will
                # resend `_pending`, and writing now would only be discarded.
                if self._writer is not None and not self._writer.is_closing():
                    self._writer.write(wire)
                    # A failed drain is a drop, which the reader task handles by
                    # reconnecting and resending; here it means nothing to wait for.
                    with contextlib.suppress(OSError):
                        await self._writer.drain()
                reply = await future
                if classify(reply) == "done":
                    return reply
                await asyncio.sleep(retry_delay(reply))
            raise OverloadedError(reply)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        """The single reader: resolves futures in order; reconnects and resends on drops."""
        try:
            while True:
                try:
                    length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
                    if not 0 < length <= MAX_REPLY_BYTES or not self._pending:
                        raise EOFError("reply stream out of step")
                    body = await reader.readexactly(length)
                except _DROPPED:
                    if not self._pending:
                        break  # idle: the next send connects again
                    reader = await self._reconnect()
                    continue
                reply = decode_reply(body)
                if reconnects(reply):
                    reader = await self._reconnect(reply)
                    continue
                self._outage = None
                future = self._pending.popleft()[1]
                if not future.done():
                    future.set_result(reply)
        except Exception as exc:  # CancelledError is no Exception: close() handles that
            self._outage = None
            if not isinstance(exc, ClientError):
                exc = DisconnectedError(f"reading replies failed: {exc!r}")
            self._fail_pending(exc)
        finally:
            if self._reader_task is asyncio.current_task():
                self._reader_task = None
                await self._drop()

    async def _reconnect(self, reply: Reply | None = None) -> asyncio.StreamReader:
        """Connect again within the outage's deadline and resend `_pending` in order."""
        await self._drop()
        if not self.reconnect:
            raise self._gave_up()
        outage = self._outage = self._outage or Outage(self.reconnect_deadline)
        if reply is not None:
            outage.wait_at_least(reply)
        while (delay := outage.next_delay()) is not None:
            await asyncio.sleep(delay)
            try:
                reader, writer = await self._open()
            except DisconnectedError:
                continue
            self._pending = deque(item for item in self._pending if not item[1].cancelled())
            writer.writelines([wire for wire, _future in self._pending])
            self._writer = writer
            return reader
        raise self._gave_up()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_unix_connection(self.path)
        except OSError as exc:  # TimeoutError included
            raise self._refused(exc) from exc

    async def _drop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            # The connection is being thrown away; how it ended does not matter.
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _fail_pending(self, exc: ClientError) -> None:
        pending, self._pending = self._pending, deque()
        for _wire, future in pending:
            if not future.done():
                future.set_exception(exc)


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
