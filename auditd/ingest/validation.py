"""Frame body -> validated wire events, or per-event and per-frame errors. No I/O.

A body is one event (a map) or a batch (an array of maps). Each event is validated on
its own, so one bad event never costs its neighbours their acceptance, and a body
nested too deep costs only the events that nest so (protocol.md, "Depth").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from auditd.errors import ProtocolError
from auditd.ingest import depth
from auditd.schema import (
    InvalidEvent,
    WireEvent,
    check_event,
    describe_validation_error,
    raw_list_decoder,
    timestamp_ns,
    wire_decoder,
)

# msgspec may recurse this many levels: half of Python's default recursion limit, which
# its decoders count against (one level each) together with the caller's frames.
_SAFE_LEVELS = 500
_EVENT_LEVELS = depth.MAX_DEPTH + 1  # the event's own map, then `data`'s levels
_TOO_DEEP = f"data: nested deeper than {depth.MAX_DEPTH} levels"
_any_decoder = msgspec.msgpack.Decoder()


def _undecodable(data: msgspec.Raw) -> str | None:
    """Why `data` (kept as raw bytes) is not a value every reader can decode, if it is
    not: a string that is not UTF-8 or a timestamp out of range (not MessagePack at
    all), or a map used as a map key. Queries, text search and sealing decode it, and
    one such payload accepted once failed its whole partition's seal (2026-12-02)."""
    try:
        _any_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        text = str(exc).removeprefix("MessagePack data is malformed: ")
        return text[:1].lower() + text[1:]
    return None

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
    """Validate every event of a frame body; raise ProtocolError for frame-level errors.

    Depth first: msgspec recurses once per level of nesting, so it is handed only
    bytes proven to nest at most `_SAFE_LEVELS` deep, far inside Python's recursion
    limit. `depth.container_bound` proves it for ordinary frames in one C-speed pass;
    any other frame is split by the iterative scan, and an event nested deeper than
    that is validated in its flattened form (see `depth.flatten`). Too deep is an
    event's fault (`invalid`), never the frame's.
    """
    first = body[0]
    frame = DecodedFrame()
    if first not in _MAP_FIRST and first not in _ARRAY_FIRST:
        _require_msgpack(body)  # a scalar first: msgspec reads one value, nothing nests
        kind = type(msgspec.msgpack.decode(body)).__name__
        raise _bad_frame(f"body must be a map (one event) or an array (a batch), got {kind}")
    if len(body) <= _SAFE_LEVELS or depth.container_bound(body) <= _SAFE_LEVELS:
        if first in _MAP_FIRST:
            _validate(frame, 0, body, max_event_bytes, unchecked=True)
            return frame
        try:
            items = raw_list_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise _bad_frame(f"body is not valid MessagePack: {exc}") from None
        _check_batch_size(len(items), max_batch_events)
        for index, item in enumerate(items):
            _validate(frame, index, bytes(item), max_event_bytes, unchecked=False)
        return frame
    try:
        events = ([(body, depth.value_depth(body))] if first in _MAP_FIRST
                  else depth.array_items(body, _SAFE_LEVELS))
    except depth.MalformedError as exc:
        raise _bad_frame(f"body is not valid MessagePack: {exc}") from None
    if first in _ARRAY_FIRST:
        _check_batch_size(len(events), max_batch_events)
    for index, (event, levels) in enumerate(events):
        shown = depth.flatten(event, _EVENT_LEVELS + 1) if levels > _SAFE_LEVELS else None
        _validate(frame, index, event, max_event_bytes, unchecked=False, shown=shown)
    return frame


def _check_batch_size(events: int, max_batch_events: int) -> None:
    if events > max_batch_events:
        raise ProtocolError(
            "batch_too_large", f"batch of {events} events exceeds {max_batch_events}")


def _validate(frame: DecodedFrame, index: int, raw: bytes, max_event_bytes: int,
              *, unchecked: bool, shown: bytes | None = None) -> None:
    """Validate one event: `raw` is what the client sent (kept for the dead letter),
    `shown` what msgspec decodes (the same bytes unless flattened). `unchecked`: the
    bytes are not yet known to be well-formed MessagePack (a bare map's)."""
    if len(raw) > max_event_bytes:
        if unchecked:
            _require_msgpack(raw)
        frame.reject(index, "too_large",
                     f"event is {len(raw)} bytes, over the {max_event_bytes}-byte limit", raw)
        return
    try:
        event = wire_decoder.decode(raw if shown is None else shown)
        ts = timestamp_ns(event.ts) if event.ts is not msgspec.UNSET else None
        check_event(event)
    except msgspec.ValidationError as exc:
        if unchecked:
            _require_msgpack(raw)  # malformed bytes after the first schema error
        frame.reject(index, "invalid", describe_validation_error(exc), raw)
        return
    except msgspec.DecodeError as exc:
        raise _bad_frame(f"body is not valid MessagePack: {exc}") from None
    except InvalidEvent as exc:
        frame.reject(index, "invalid", str(exc), raw)
        return
    if event.data is not msgspec.UNSET:
        if not depth.within(event.data, depth.MAX_DEPTH):
            frame.reject(index, "invalid", _TOO_DEEP, raw)
            return
        problem = _undecodable(event.data)
        if problem is not None:
            frame.reject(index, "invalid", f"data: {problem}", raw)
            return
    frame.valid.append(ValidEvent(index, event, ts, raw))
