"""The forwarding engine: committed events (and checkpoints) to NATS JetStream, exactly
once in the stream (docs/design/forward.md). It runs in a process of its own
(forward/worker.py, started by forward/process.py), so its per-message work never takes
the daemon's event loop from ingest.

A reader reads steps of `forward.batch` seqs past the cursor from a store snapshot in a
thread (forward.messages) and queues them; the publisher publishes each step's messages
pipelined (forward.acks: one inbox for every ack) and keeps up to `max_in_flight`
unacknowledged. Acknowledgements are awaited step by step, oldest first, each step with
one deadline of its own (`ack_timeout`). A step whose every message is acknowledged
advances the cursor (the acknowledged contiguous prefix), which goes to the sink: the
daemon persists it. On any failure the window is dropped, the forwarder backs off with
jitter and resends from the cursor: JetStream's dedupe (`Nats-Msg-Id`) absorbs what was
already stored, as it absorbs the window a SIGKILL resends.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import structlog
from nats.js.errors import APIError

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.forward.acks import AckError, AckTracker, StepAcks
from auditd.forward.connection import connect_options
from auditd.forward.cursor import Cursor
from auditd.forward.figures import ForwardFigures
from auditd.forward.messages import (
    Step,
    checkpoint_subject,
    read_step,
    render_subject,
    token,
)
from auditd.forward.stream import StreamRefused, ensure_stream
from auditd.forward.wire import Client

log = structlog.get_logger("auditd.forward")
_IDLE_POLL_S = 1.0  # a look for new checkpoints while no event arrives
_READ_AHEAD = 2  # steps read and queued before the publisher takes them


class ForwardError(AuditdError):
    """A step cannot be forwarded (a gap in the store, a refused message)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """The `errors` key a failure counts under."""
    if isinstance(exc, ForwardError):
        return exc.kind
    if isinstance(exc, StreamRefused):
        return "stream"
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return "auth"
    if isinstance(exc, ssl.SSLError | nats.errors.SecureConnRequiredError
                  | nats.errors.SecureConnWantedError | nats.errors.SecureConnFailedError):
        return "tls"
    # nats-py raises the server's -ERR during a connect as a plain Error: its words.
    text = str(exc).lower()
    if isinstance(exc, nats.errors.Error) and any(
            word in text for word in ("authorization", "authentication", "permissions")):
        return "auth"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "timeout"
    if isinstance(exc, APIError | nats.errors.NoRespondersError):
        return "server"
    if isinstance(exc, nats.errors.NoServersError | ConnectionError | OSError
                  | nats.errors.ConnectionClosedError | nats.errors.OutboundBufferLimitError
                  | nats.errors.StaleConnectionError | nats.errors.ConnectionReconnectingError):
        return "connect"
    return "other"


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, AuditdError) else f"{type(exc).__name__}: {text}"


Sink = Callable[[Cursor], None]  # told each acknowledged cursor


class Forwarder:
    """The forwarding engine; it runs in the worker process (forward/worker.py), which
    tells the daemon each acknowledged cursor for it to persist (forward/process.py)."""

    def __init__(self, config: Config, db_path: Path, partitions_dir: Path, host: str,
                 cursor: Cursor, sink: Sink) -> None:
        self.config, self.settings = config, config.forward
        self.db_path, self.partitions_dir, self._host = db_path, partitions_dir, host
        self.figures = ForwardFigures(self.settings.stream, list(self.settings.servers))
        self.figures.advanced(cursor.seq, cursor.checkpoint_size)
        self._acked = cursor
        self._sink = sink
        self._commit = asyncio.Event()
        self._nc: Client | None = None
        self._state_logged = ""
        self._error_logged: str | None = None  # the connection error last logged

    def committed(self, seq: int) -> None:
        self.figures.committed_through(seq)
        self._commit.set()

    async def run(self) -> None:
        """Forever: connect, check the stream, pump; back off with jitter on failure.
        Never raises but for cancellation."""
        failures = 0
        try:
            while True:
                at_start = self._acked
                try:
                    await self._session()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # A session that moved the cursor was a success until it failed:
                    # the backoff starts over.
                    failures = 1 if self._acked != at_start else failures + 1
                    self._failed(exc)
                    await self._close()
                    await asyncio.sleep(self._backoff(failures))
                else:
                    failures = 0
        finally:
            await self._close()

    def _backoff(self, failures: int) -> float:
        low = self.config.duration_ms("forward", "backoff_min") / 1000
        high = self.config.duration_ms("forward", "backoff_max") / 1000
        return float(min(high, low * 2.0 ** min(failures - 1, 30)) * random.uniform(0.5, 1.0))

    def _state(self, state: str, **fields: Any) -> None:
        """Each state change logged once, never once per retry: a retry's reconnect is
        not logged, and a failure the same as the last one logged is not either."""
        retrying = self.figures.state in ("backing_off", "refused")
        self.figures.state = state
        if state == "connecting" and retrying:
            return
        key = state + repr(sorted((k, v) for k, v in fields.items() if k != "cursor"))
        if key != self._state_logged:
            self._state_logged = key
            log.info(f"forward_{state}", **fields) if state in ("connected", "forwarding") \
                else log.warning(f"forward_{state}", **fields)

    def _failed(self, exc: BaseException) -> None:
        kind = error_kind(exc)
        self.figures.errors[kind] += 1
        self.figures.fault = f"forwarding to NATS fails ({kind}): {describe(exc)}"
        self.figures.in_flight = 0
        self.figures.state = "refused" if kind == "stream" else "backing_off"
        self._state(self.figures.state, kind=kind, error=describe(exc),
                    cursor=self._acked.seq)

    # -- one connection ---------------------------------------------------------------

    async def _session(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            self._state("connecting", servers=self.settings.servers)
            nc = Client()
            await nc.connect(**self._connect_options())
            self._nc = nc
        self.figures.connected = nc.is_connected
        js = nc.jetstream()
        window = self.config.duration_ms("forward", "duplicate_window") / 1000
        stream = await asyncio.wait_for(
            ensure_stream(js, self.settings, window, self._samples()),
            self.config.duration_ms("forward", "ack_timeout") / 1000)
        self.figures.replicas, self.figures.warning = stream.replicas, stream.warning
        if stream.created:
            log.info("forward_stream_created", stream=stream.name, replicas=stream.replicas)
        if stream.warning:
            log.warning("forward_stream_replicas", stream=stream.name,
                        replicas=stream.replicas, warning=stream.warning)
        self.figures.fault = self._error_logged = None
        self._state("forwarding", stream=stream.name, cursor=self._acked.seq)
        await self._pump(nc)

    def _samples(self) -> list[str]:
        """Subjects the stream must take: an event's and the checkpoints'."""
        host = token(self._host)
        return [render_subject(self.settings.subject, host, "x", "x"),
                checkpoint_subject(host)]

    def _connect_options(self) -> dict[str, Any]:
        s = self.settings

        async def error_cb(exc: Exception) -> None:
            kind = error_kind(exc)
            self.figures.errors[kind] += 1
            self.figures.fault = f"NATS connection: {describe(exc)}"
            # nats-py retries a failing connect itself (a TLS or auth failure too) without
            # raising: this is the failure's one log line, again only once it changes.
            if self.figures.fault != self._error_logged:
                self._error_logged = self.figures.fault
                log.warning("forward_connection_error", kind=kind, error=describe(exc),
                            servers=s.servers)

        async def disconnected_cb() -> None:
            if self._nc is None:  # closed on purpose, after a failure named already
                return
            self.figures.connected = False
            self.figures.fault = "disconnected from NATS; reconnecting (events are kept)"
            self._state("disconnected", servers=s.servers)

        async def reconnected_cb() -> None:
            self._error_logged = None
            self.figures.connected = True
            self.figures.reconnects += 1
            self.figures.fault = None
            self._state("connected", server=str(getattr(self._nc, "connected_url", "")))

        return {**connect_options(s), "allow_reconnect": True, "max_reconnect_attempts": -1,
                "reconnect_time_wait": 1, "error_cb": error_cb,
                "disconnected_cb": disconnected_cb, "reconnected_cb": reconnected_cb,
                # Room to buffer a window while a reconnect is under way.
                "pending_size": 64 * 1024 * 1024}

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        self.figures.connected = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

    # -- the pump ---------------------------------------------------------------------

    async def _pump(self, nc: Client) -> None:
        queue: asyncio.Queue[Step] = asyncio.Queue(_READ_AHEAD)
        acks = AckTracker(nc)
        await acks.start()
        reader = asyncio.get_running_loop().create_task(
            self._read(queue, acks.prefix, nc.max_payload), name="forward_read")
        window: deque[tuple[Step, StepAcks, float]] = deque()
        timeout = self.config.duration_ms("forward", "ack_timeout") / 1000
        try:
            while True:
                if reader.done():
                    reader.result()  # its failure is the pump's
                in_flight = sum(step.count for step, _, _ in window)
                self.figures.in_flight = in_flight
                if window and (in_flight >= self.settings.max_in_flight or queue.empty()):
                    await self._settle(acks, *window.popleft())
                    continue
                step = await self._next_step(queue, reader)
                window.append((step, await acks.publish(step),
                               time.monotonic() + timeout))
                if step.oversized:
                    while window:
                        await self._settle(acks, *window.popleft())
                    which, size = step.oversized
                    raise ForwardError(f"{which} is {size} bytes, over the NATS servers' "
                                       f"max_payload of {nc.max_payload}: raise max_payload "
                                       "on the servers", "server")
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await acks.stop()
            self.figures.in_flight = 0

    async def _next_step(self, queue: asyncio.Queue[Step], reader: asyncio.Task[None]) -> Step:
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait([getter, reader], return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            reader.result()
            raise ForwardError("the store reader stopped", "store")
        return getter.result()

    async def _settle(self, tracker: AckTracker, step: Step, acks: StepAcks,
                      deadline: float) -> None:
        """Wait for one step's acknowledgements (the oldest in flight) until its deadline;
        then the cursor covers it."""
        try:
            await tracker.settle(acks, deadline - time.monotonic())
        except TimeoutError:
            raise ForwardError(f"{acks.expected - acks.acked} of {acks.expected} messages of "
                               f"seqs up to {step.last} unacknowledged after "
                               f"{self.settings.ack_timeout}", "timeout") from None
        except AckError as exc:
            raise ForwardError(f"the stream refused a message of seqs up to {step.last}: "
                               f"{exc}", "server") from None
        figures, checkpoint = self.figures, self._acked.checkpoint_size
        checkpoints = step.checkpoint_sizes
        figures.checkpoints += len(checkpoints)
        figures.duplicates += acks.duplicates
        figures.published += acks.acked - acks.duplicates - len(checkpoints)
        self._acked = Cursor(max(self._acked.seq, step.last), max([checkpoint, *checkpoints]))
        figures.advanced(self._acked.seq, self._acked.checkpoint_size)
        self._sink(self._acked)

    async def _read(self, queue: asyncio.Queue[Step], reply_prefix: str,
                    max_payload: int) -> None:
        """Steps past the acknowledged cursor, in order, as events are committed, framed
        to ask for their acks under `reply_prefix`; up to a body past `max_payload`."""
        position, checkpoint = self._acked.seq, self._acked.checkpoint_size
        path, parts = self.db_path, self.partitions_dir
        subject, batch = self.settings.subject, self.settings.batch
        last_look = 0.0
        while True:
            committed = self.figures.committed
            idle = committed <= position
            if idle and time.monotonic() - last_look < _IDLE_POLL_S:
                self._commit.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._commit.wait(), _IDLE_POLL_S)
                continue
            last = min(committed, position + batch)
            step = await asyncio.to_thread(read_step, path, parts, subject, position + 1,
                                           last, checkpoint, reply_prefix, max_payload)
            last_look = time.monotonic()
            if step.missing:
                raise ForwardError(f"seq {step.missing[0]} has no readable record in the "
                                   "store, so nothing after it is forwarded: run `auditd "
                                   "verify`", "store")
            if step.count or step.oversized:
                await queue.put(step)
            if step.oversized:
                return  # the pump fails once what precedes it is acknowledged
            position = last
            checkpoint = max([checkpoint, *step.checkpoint_sizes])
