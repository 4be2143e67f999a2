"""Frame body -> validated wire events, or per-event and per-frame errors. No I/O.

A body is one event (a map) or a batch (an array of maps). Each event is validated on
its own, so one bad event never costs its neighbours their acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from auditd.errors import ProtocolError
from auditd.schema import (
    InvalidEvent,
    WireEvent,
    check_event,
    describe_validation_error,
    raw_list_decoder,
    timestamp_ns,
    wire_decoder,
)

_MAP_FIRST = frozenset({*range(0x80, 0x90), 0xDE, 0xDF})
_ARRAY_FIRST = frozenset({*range(0x90, 0xA0), 0xDC, 0xDD})


@dataclass(slots=True)
class ValidEvent:
    index: int
    event: WireEvent
    ts: int | None
    raw: bytes
    id_hash: int | None = None  # of the client's id, once the sequencer has computed it

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(slots=True)
class DecodedFrame:
    valid: list[ValidEvent] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    rejected_raw: list[bytes] = field(default_factory=list)  # parallel to `rejected`

    def reject(self, index: int, code: str, message: str, raw: bytes) -> None:
        self.rejected.append((index, code, message))
        self.rejected_raw.append(raw)


def _bad_frame(message: str) -> ProtocolError:
    return ProtocolError("bad_frame", message, fatal=True)


def _require_msgpack(body: bytes) -> None:
    try:
        msgspec.msgpack.decode(body)
    except msgspec.DecodeError as exc:
        raise _bad_frame(f"body is not valid MessagePack: {exc}") from None


def decode_body(body: bytes, max_batch_events: int, max_event_bytes: int) -> DecodedFrame:
    """Validate every event of a frame body; raise ProtocolError for frame-level errors."""
    first = body[0]
    frame = DecodedFrame()
    if first in _MAP_FIRST:
        _validate(frame, 0, body, max_event_bytes, bare=True)
        return frame
    if first not in _ARRAY_FIRST:
        _require_msgpack(body)
        kind = type(msgspec.msgpack.decode(body)).__name__
        raise _bad_frame(f"body must be a map (one event) or an array (a batch), got {kind}")
    try:
        items = raw_list_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise _bad_frame(f"body is not valid MessagePack: {exc}") from None
    if len(items) > max_batch_events:
        raise ProtocolError(
            "batch_too_large", f"batch of {len(items)} events exceeds {max_batch_events}")
    for index, raw in enumerate(items):
        _validate(frame, index, bytes(raw), max_event_bytes, bare=False)
    return frame


def _validate(frame: DecodedFrame, index: int, raw: bytes, max_event_bytes: int,
              *, bare: bool) -> None:
    if len(raw) > max_event_bytes:
        if bare:
            _require_msgpack(raw)
        frame.reject(index, "too_large",
                     f"event is {len(raw)} bytes, over the {max_event_bytes}-byte limit", raw)
        return
    try:
        event = wire_decoder.decode(raw)
        ts = timestamp_ns(event.ts) if event.ts is not msgspec.UNSET else None
        check_event(event)
    except msgspec.ValidationError as exc:
        if bare:
            _require_msgpack(raw)  # malformed bytes after the first schema error
        frame.reject(index, "invalid", describe_validation_error(exc), raw)
        return
    except msgspec.DecodeError as exc:
        raise _bad_frame(f"body is not valid MessagePack: {exc}") from None
    except InvalidEvent as exc:
        frame.reject(index, "invalid", str(exc), raw)
        return
    frame.valid.append(ValidEvent(index, event, ts, raw))
