"""A record as it would read under another seq: how `verify` tells a row moved or
renumbered from one edited (the leaf of E re-encoded with the seq it came from matches
that seq's leaf)."""

from __future__ import annotations

import msgspec

from auditd.store.records import (
    dead_letter_from_record,
    event_from_record,
    is_dead_letter,
    record_bytes,
)


def with_seq(record: bytes, seq: int) -> bytes | None:
    """`record` re-encoded with `seq` as its seq; None when it does not decode."""
    try:
        if is_dead_letter(record):
            letter = dead_letter_from_record(record)
            letter.seq = seq
            return msgspec.msgpack.encode(letter)
        event = event_from_record(record)
    except (ValueError, msgspec.DecodeError, IndexError):
        return None
    event.seq = seq
    return record_bytes(event)
