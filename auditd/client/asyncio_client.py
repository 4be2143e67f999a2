"""AsyncClient: the pipelining client for asyncio (and uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from auditd.client.common import (
    _DROPPED,
    MAX_REPLY_BYTES,
    ClientClosedError,
    DisconnectedError,
    Event,
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
    reconnects,
    retry_delay,
)
from auditd.errors import ClientError
from auditd.ingest.framing import HEADER_BYTES


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

