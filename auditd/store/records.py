"""The record `E` of a seq (proofs.md, "The log"): what export writes and the leaf hashes.

An event's record is one MessagePack map whose keys come in a fixed order (the
order of `StoredEvent`'s fields, `id_hash` left out: it is derived from `id`), with
absent fields omitted. `tags` and `data` are embedded as the MessagePack they already
are, not decoded and encoded again, so a client's payload reaches the record byte for
byte; `ts` and `received_at` are integer nanoseconds. A dead letter's record is the
map `seq, dead_letter: true, code, reason, raw_sha256` (32 bytes of SHA-256 of the raw
frame): it proves what was refused without keeping it in the log.

The codecs are Structs built once here: encoding a record is one Struct and one
`encode` call (no dict per event), which matters because it runs per event on the
ingest path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
from msgspec import Raw, Struct

from auditd.schema import StoredEvent, id_hash

_NO_RAW = Raw()


class _EventRecord(Struct, omit_defaults=True, gc=False):
    """Encoding side: None fields are left out; tags and data are `Raw`."""

    seq: int
    id: str
    ts: int
    received_at: int
    type: str
    actor: str | None = None
    target: str | None = None
    stream: str | None = None
    stream_seq: int | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tags: Raw | None = None
    data: Raw | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    comm: str | None = None


class _EventFields(Struct, gc=False):
    """Decoding side: msgspec cannot decode `Raw | None`, so an absent payload is the
    empty Raw (a present one is at least one byte)."""

    seq: int
    id: str
    ts: int
    received_at: int
    type: str
    actor: str | None = None
    target: str | None = None
    stream: str | None = None
    stream_seq: int | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tags: Raw = _NO_RAW
    data: Raw = _NO_RAW
    pid: int = 0
    uid: int = 0
    gid: int = 0
    comm: str = ""


class DeadLetterRecord(Struct, omit_defaults=False, gc=False):
    """The record of a seq held by a dead letter."""

    seq: int
    dead_letter: bool
    code: str
    reason: str
    raw_sha256: bytes


class _Kind(Struct, gc=False):
    """Just enough of any record to tell which kind it is (other keys are skipped)."""

    seq: int
    dead_letter: bool = False


_encoder = msgspec.msgpack.Encoder()
_encode = _encoder.encode
_event_decoder = msgspec.msgpack.Decoder(_EventFields)
_dead_letter_decoder = msgspec.msgpack.Decoder(DeadLetterRecord)
_kind_decoder = msgspec.msgpack.Decoder(_Kind)
# Every event record starts with its map header and the key "seq"; the key after the
# seq value is "id" for an event and "dead_letter" for a dead letter.
_SEQ_KEY = b"\xa3seq"
_ID_KEY = b"\xa2id"
_DEAD_LETTER_KEY = b"\xabdead_letter"
_INT_WIDTH = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}


def _event_record(event: StoredEvent) -> _EventRecord:
    tags, data = event.tags, event.data
    return _EventRecord(
        event.seq, event.id, event.ts, event.received_at, event.type, event.actor,
        event.target, event.stream, event.stream_seq, event.correlation_id,
        event.causation_id, None if tags is None else Raw(tags),
        None if data is None else Raw(data), event.pid, event.uid, event.gid, event.comm)


def record_bytes(event: StoredEvent) -> bytes:
    """The record E of an accepted event."""
    return _encode(_event_record(event))


def event_leaf_hashes(events: Sequence[StoredEvent]) -> list[bytes]:
    """SHA-256(0x00 || E) of each event's record (proofs.md's leaf hash), each record
    encoded into one buffer after its 0x00 rather than made a bytes and concatenated
    (a copy less per event in the writer's transaction)."""
    buffer, into, sha = bytearray(b"\x00"), _encoder.encode_into, hashlib.sha256
    leaves = []
    for event in events:
        into(_event_record(event), buffer, 1)
        leaves.append(sha(buffer).digest())
    return leaves


def event_from_record(record: bytes) -> StoredEvent:
    """The stored event a record was made from (ValueError for a dead letter's)."""
    try:
        fields = _event_decoder.decode(record)
    except msgspec.ValidationError as exc:
        if is_dead_letter(record):
            raise ValueError("the record is a dead letter's, not an event's") from None
        raise ValueError(f"not an event record: {exc}") from None
    tags, data = fields.tags, fields.data
    return StoredEvent(
        fields.seq, fields.id, fields.ts, fields.received_at, fields.type, fields.actor,
        fields.target, fields.stream, fields.stream_seq, fields.correlation_id,
        fields.causation_id, bytes(tags) if len(tags) else None,
        bytes(data) if len(data) else None, fields.pid, fields.uid, fields.gid, fields.comm,
        id_hash(fields.id))


def dead_letter_record(seq: int, code: str, reason: str, raw: bytes) -> bytes:
    """The record E of a seq that a dead letter holds."""
    return _encode(DeadLetterRecord(seq, True, code, reason, hashlib.sha256(raw).digest()))


def dead_letter_from_record(record: bytes) -> DeadLetterRecord:
    return _dead_letter_decoder.decode(record)


def is_dead_letter(record: bytes) -> bool:
    """Whether a record is a dead letter's: read from its first bytes when it has the
    shape record_bytes and dead_letter_record give, decoded otherwise."""
    at = 1 if 0x80 <= record[0] <= 0x8F else 3 if record[0] == 0xDE else 0
    if at and record[at:at + 4] == _SEQ_KEY:
        first = record[at + 4]
        at += 4 + (1 if first < 0x80 else _INT_WIDTH.get(first, 0))
        if record[at:at + 3] == _ID_KEY:
            return False
        if record[at:at + 12] == _DEAD_LETTER_KEY:
            return True
    return _kind_decoder.decode(record).dead_letter


def record_seq(record: bytes) -> int:
    """The seq a record holds, of either kind."""
    return _kind_decoder.decode(record).seq


def merged_records(rows: Sequence[Sequence[Any]], dead: Sequence[Sequence[Any]],
                   record_of: Callable[[Sequence[Any]], bytes]) -> Iterator[tuple[int, bytes]]:
    """(seq, E) of event rows and dead-letter rows (seq, code, reason, raw), both in seq
    order, merged by seq: an event's seq is its record (a letter whose retry committed
    is not), and a seq dead-lettered twice is its first letter."""
    letters = iter(dead)
    letter = next(letters, None)
    seen = 0
    for row in rows:
        seq = row[0]
        while letter is not None and letter[0] <= seq:
            if letter[0] < seq and letter[0] != seen:  # a seq's first letter only
                seen = letter[0]
                yield seen, dead_letter_record(*letter)
            letter = next(letters, None)
        seen = seq
        yield seq, record_of(row)
    while letter is not None:
        if letter[0] != seen:
            seen = letter[0]
            yield seen, dead_letter_record(*letter)
        letter = next(letters, None)
