"""A committed event as one line of newline-delimited JSON, as /tail sends it.

The fields interfaces.md fixes: every protocol field plus `seq`, `stream_seq`,
`received_at`, `pid`, `uid`, `gid`, `comm`; bytes values as `{"$bytes": base64}`;
timestamps as RFC 3339 strings with nanoseconds; fields an event does not have are
null. The same document as /events answers (query.rows.event_json, which a test holds
it to), built faster: a follower of a busy daemon encodes every committed event.
"""

from __future__ import annotations

import base64
import datetime
import re
import time
from typing import Any

import msgspec

from auditd.schema import StoredEvent

_json = msgspec.json.Encoder()
_msgpack_any = msgspec.msgpack.Decoder()
# MessagePack's bin and ext formats. Without any of these bytes a value holds no bytes
# and can go to JSON as decoded (UTF-8 text may have them too: then the slow path).
_MAYBE_BYTES = re.compile(rb"[\xc4-\xc9\xd4-\xd8]")
_SECONDS: dict[int, str] = {}  # "2026-12-02T10:00:00" by unix second: followers' events
_SECONDS_HELD = 4096  # are recent, so a handful of entries serve nearly every line


def rfc3339_ns(ns: int) -> str:
    """`2026-12-02T10:00:00.123456789Z` (UTC) from nanoseconds since the epoch."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    text = _SECONDS.get(seconds)
    if text is None:
        if len(_SECONDS) >= _SECONDS_HELD:
            _SECONDS.clear()
        text = _SECONDS[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{fraction:09d}Z"


def _jsonable(value: Any) -> Any:
    """MessagePack values as JSON can hold them: bytes wrapped, map keys as strings."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, msgspec.msgpack.Ext):
        return {"$ext": value.code, "$bytes": base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, datetime.datetime):  # a MessagePack timestamp inside data
        return rfc3339_ns(int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000)
    return value


def _decoded(raw: bytes) -> Any:
    try:
        value = _msgpack_any.decode(raw)
        return _jsonable(value) if _MAYBE_BYTES.search(raw) else value
    except msgspec.DecodeError:  # never stored so, but a line must still be written
        return {"$bytes": base64.b64encode(raw).decode("ascii")}


def event_document(event: StoredEvent) -> dict[str, Any]:
    document: dict[str, Any] = {
        "seq": event.seq, "id": event.id, "ts": rfc3339_ns(event.ts),
        "received_at": rfc3339_ns(event.received_at), "type": event.type,
        "actor": event.actor, "target": event.target, "stream": event.stream,
        "stream_seq": event.stream_seq, "correlation_id": event.correlation_id,
        "causation_id": event.causation_id, "pid": event.pid, "uid": event.uid,
        "gid": event.gid, "comm": event.comm,
        "tags": None if event.tags is None else _decoded(event.tags),
        "data": None if event.data is None else _decoded(event.data),
    }
    return document


def event_line(event: StoredEvent) -> bytes:
    """The event's JSON document and a newline."""
    return _json.encode(event_document(event)) + b"\n"


def control_line(document: dict[str, Any]) -> bytes:
    """A heartbeat or a final line, JSON and a newline."""
    return _json.encode(document) + b"\n"
