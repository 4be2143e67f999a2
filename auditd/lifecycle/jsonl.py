"""Records as JSON lines (`--format jsonl`) and back into wire events for import.

An event's line is the status API's JSON of it (interfaces.md, "Events in JSON"); a
dead letter's is `{"seq", "dead_letter": true, "code", "reason", "raw_sha256"}` (hex).
JSON cannot hold everything MessagePack can, so a JSON line is the readable form and
the MessagePack record the exact one: on the way back, `{"$bytes": b64}` becomes bytes
and `{"$ext": code, "$bytes": b64}` an extension value again, but a MessagePack
timestamp inside `data` stays the RFC 3339 string it was shown as.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from auditd.lifecycle.manifest import ManifestError
from auditd.query.rows import event_json, rfc3339
from auditd.query.spec import BadQuery, parse_time
from auditd.store.records import dead_letter_from_record, event_from_record, is_dead_letter

__all__ = ["CARRIED", "from_json", "record_json", "rfc3339"]


def record_json(record: bytes) -> dict[str, Any]:
    """A record E as its JSON line's object."""
    if is_dead_letter(record):
        letter = dead_letter_from_record(record)
        return {"seq": letter.seq, "dead_letter": True, "code": letter.code,
                "reason": letter.reason, "raw_sha256": letter.raw_sha256.hex()}
    return event_json(event_from_record(record))


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict):
        if "$bytes" in value and len(value) <= 2:
            raw = base64.b64decode(value["$bytes"])
            if "$ext" in value:
                return msgspec.msgpack.Ext(int(value["$ext"]), raw)
            if len(value) == 1:
                return raw
        return {key: _unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unwrap(item) for item in value]
    return value


_encode = msgspec.msgpack.Encoder().encode
# The wire fields an exported event carries over; the rest are the daemon's stamps.
CARRIED = ("id", "type", "actor", "target", "stream", "correlation_id", "causation_id")


def from_json(doc: Any, line: int) -> tuple[int, bool, int, dict[str, Any]]:
    """(seq, is a dead letter, received_at ns, the wire event) of a JSON line's object."""
    if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
        raise ManifestError(f"line {line}: not an exported record (no integer seq)")
    if doc.get("dead_letter") is True:
        return doc["seq"], True, 0, {}
    try:
        ts = parse_time("ts", str(doc["ts"]))
        received = parse_time("received_at", str(doc["received_at"]))
    except (KeyError, BadQuery) as exc:
        raise ManifestError(f"line {line}: seq {doc['seq']}: {exc}") from None
    wire: dict[str, Any] = {key: doc[key] for key in CARRIED if doc.get(key) is not None}
    wire["ts"] = ts
    if doc.get("tags") is not None:
        wire["tags"] = doc["tags"]
    if doc.get("data") is not None:
        wire["data"] = msgspec.Raw(_encode(_unwrap(doc["data"])))
    return doc["seq"], False, received, wire
