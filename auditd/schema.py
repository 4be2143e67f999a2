"""Wire and stored events, their validation rules, and the module-level codecs.

The wire event is what a client sends (protocol.md); the stored event is what the
daemon keeps: the wire fields plus what the daemon stamps (seq, stream_seq,
received_at, peer identity). `ts` and `data` stay as raw MessagePack so that
nanosecond timestamps and arbitrary payloads pass through without a round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

Str = Annotated[str, Meta(max_length=256)]
TagKey = Annotated[str, Meta(max_length=64)]
TagValue = Annotated[str, Meta(max_length=256)]

# Keys the daemon sets itself; a client sending one is told so by name.
RESERVED_KEYS = frozenset(
    {"seq", "stream_seq", "received_at", "pid", "uid", "gid", "comm", "hash"}
)


class WireEvent(Struct, forbid_unknown_fields=True, gc=False):
    type: Annotated[str, Meta(min_length=1, max_length=200)]
    actor: Annotated[str, Meta(max_length=256)] | None = None
    target: Annotated[str, Meta(max_length=512)] | None = None
    id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    ts: Raw | UnsetType = UNSET
    stream: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    expect: Annotated[int, Meta(ge=0)] | None = None
    correlation_id: Annotated[str, Meta(max_length=128)] | None = None
    causation_id: Annotated[str, Meta(max_length=128)] | None = None
    tags: Annotated[dict[TagKey, TagValue], Meta(max_length=32)] | None = None
    data: Raw | UnsetType = UNSET


class StoredEvent(Struct, array_like=True, gc=False):
    """An accepted event as journaled and committed. `data` is raw MessagePack."""

    seq: int
    id: str
    ts: int  # ns since the epoch
    received_at: int  # ns since the epoch
    type: str
    actor: str | None
    target: str | None
    stream: str | None
    stream_seq: int | None
    correlation_id: str | None
    causation_id: str | None
    tags: bytes | None  # encoded MessagePack map: one small object, not a dict per event
    data: bytes | None
    pid: int
    uid: int
    gid: int
    comm: str
    id_hash: int  # schema.id_hash(id), computed once at acceptance


wire_decoder = msgspec.msgpack.Decoder(WireEvent)
raw_list_decoder = msgspec.msgpack.Decoder(list[Raw])
stored_decoder = msgspec.msgpack.Decoder(StoredEvent)
encoder = msgspec.msgpack.Encoder()

_PATH_RE = re.compile(r" - at (?:`key` in )?`\$\.?([^`]*)`$")
_UNKNOWN_RE = re.compile(r"Object contains unknown field `([^`]*)`")
_MISSING_RE = re.compile(r"Object missing required field `([^`]*)`")


class InvalidEvent(Exception):
    """An event breaks the schema; str() is the client-facing message naming the field."""


def describe_validation_error(exc: msgspec.ValidationError) -> str:
    """Turn msgspec's message into `field: problem`, e.g. `actor: expected str, got int`."""
    text = str(exc)
    unknown = _UNKNOWN_RE.match(text)
    if unknown:
        key = unknown.group(1)
        if key in RESERVED_KEYS:
            return f"{key}: set by the daemon, a client may not send it"
        # As JSON when it would not read as a name: "" or one holding a newline.
        name = key if key.isprintable() and key else json.dumps(key)
        return f"{name}: unknown key"
    missing = _MISSING_RE.match(text)
    if missing:
        return f"{missing.group(1)}: required"
    match = _PATH_RE.search(text)
    field = match.group(1) if match else ""
    problem = text[: match.start()] if match else text
    problem = problem.replace(" | null", "").replace("`", "")
    problem = problem[:1].lower() + problem[1:]
    if " - at `key` in " in text:
        problem = f"key {problem}"
    if not field:
        return f"event: {problem}"
    return f"{field.replace('[...]', '')}: {problem}"


_TS_EXT32 = struct.Struct(">I")
_TS_EXT64 = struct.Struct(">Q")
_TS_EXT96 = struct.Struct(">Iq")
_number_decoder = msgspec.msgpack.Decoder(int | float | None)


def timestamp_ns(raw: Raw) -> int | None:
    """A MessagePack timestamp ext, int (ns) or float (s) as ns since the epoch."""
    view = bytes(raw)
    if len(view) == 6 and view[0] == 0xD6 and view[1] == 0xFF:
        return int(_TS_EXT32.unpack_from(view, 2)[0]) * 1_000_000_000
    if len(view) == 10 and view[0] == 0xD7 and view[1] == 0xFF:
        packed = _TS_EXT64.unpack_from(view, 2)[0]
        return int((packed & 0x3_FFFF_FFFF) * 1_000_000_000 + (packed >> 34))
    if len(view) == 15 and view[:3] == b"\xc7\x0c\xff":
        nanos, seconds = _TS_EXT96.unpack_from(view, 3)
        return int(seconds * 1_000_000_000 + nanos)
    try:
        number = _number_decoder.decode(view)
    except msgspec.DecodeError:
        raise InvalidEvent("ts: expected a timestamp, int (ns) or float (s)") from None
    if number is None:
        return None
    if isinstance(number, float):
        if number != number or abs(number) > 9.2e9:
            raise InvalidEvent("ts: float seconds out of range")
        return int(number * 1_000_000_000)
    if not -(2**63) <= number < 2**63:
        raise InvalidEvent("ts: int nanoseconds out of range")
    return int(number)


def check_event(event: WireEvent) -> None:
    """Rules msgspec's types cannot express."""
    if event.expect is not None and event.stream is None:
        raise InvalidEvent("expect: only allowed together with stream")


def uuid7() -> str:
    """A UUIDv7 string: 48-bit ms timestamp, version 7, variant 10, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_KEY_EPOCH_MS = 1_577_836_800_000  # 2020-01-01: 44 bits of milliseconds from here last 557 years


def id_hash(event_id: str) -> int:
    """The indexed idempotency key of an event id: a signed 64-bit integer, stable.

    For a UUIDv7 (what the client library generates) it is the id's millisecond since
    2020 followed by 20 of its random bits, so new keys land at the right edge of the
    index like the rowid does. A purely random key dirties a different leaf for almost
    every row of a batch: at a million rows that alone halved the insert rate. The 20
    random bits keep ids of one millisecond apart; with 15, they collided often enough
    that the Bloom filter sent frames to the database. Any other id gets a 64-bit hash
    of its text. Equal keys are told apart by the id text.
    """
    if len(event_id) == 36 and event_id[14] == "7" and event_id[8] == event_id[13] == "-":
        try:
            since = int(event_id[:8] + event_id[9:13], 16) - _KEY_EPOCH_MS
            if 0 <= since < 1 << 44:
                return (since << 20 | int(event_id[29:], 16) & 0xFFFFF) - (1 << 63)
        except ValueError:
            pass
    return hash64(event_id)


def hash64(text: str) -> int:
    """A signed 64-bit blake2b hash: the key of ids that are not UUIDv7, and schema 1's
    key of every id."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def reply_bytes(reply: dict[str, Any]) -> bytes:
    return encoder.encode(reply)
