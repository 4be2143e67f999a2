"""What both clients share: events and ids, the reply codec, what each reply means, and
the reconnect policy. No I/O."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from auditd.errors import ClientError, RejectedError
from auditd.ingest.framing import encode_frame
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

