"""The indexed fields of a record, decoded once: what the builder indexes and what a
reader rechecks a candidate against."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec
from msgspec import Struct

from auditd.store.partition.layout import (
    ACTOR,
    CAUSATION,
    COMM,
    CORRELATION,
    STREAM,
    TAG,
    TAG_SEPARATOR,
    TARGET,
    TYPE,
    UID,
    WORD,
    words,
)


class IndexedFields(Struct, gc=False):
    """Either kind of record: a dead letter has only seq and dead_letter."""

    seq: int
    dead_letter: bool = False
    id: str = ""
    ts: int = 0
    type: str = ""
    actor: str | None = None
    target: str | None = None
    stream: str | None = None
    stream_seq: int | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tags: dict[str, str] | None = None
    data: msgspec.Raw = msgspec.Raw()  # decoded apart: see decode_data
    uid: int = 0
    comm: str = ""


decode_fields = msgspec.msgpack.Decoder(IndexedFields).decode


class BuildFields(Struct, gc=False):
    """What the builder reads of a record: as IndexedFields, but `tags` stays raw, for
    a record's tags are mostly one of a few maps and are looked up whole."""

    seq: int
    dead_letter: bool = False
    id: str = ""
    ts: int = 0
    type: str = ""
    actor: str | None = None
    target: str | None = None
    stream: str | None = None
    stream_seq: int | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tags: msgspec.Raw = msgspec.Raw()
    data: msgspec.Raw = msgspec.Raw()  # decoded apart: see decode_data
    uid: int = 0
    comm: str = ""


decode_build_fields = msgspec.msgpack.Decoder(BuildFields).decode
_tags_decoder = msgspec.msgpack.Decoder(dict[str, str] | None)


def decode_tags(raw: bytes) -> dict[str, str]:
    return _tags_decoder.decode(raw) or {}


_data_decoder = msgspec.msgpack.Decoder()


def decode_data(raw: bytes) -> Any:
    """A record's `data` as Python values, None when absent or undecodable.

    Stores written before ingest checked that `data` decodes hold some that do not
    (a string that is not UTF-8, a timestamp out of range): such a record is still
    sealed and read whole, its data's words are just not indexed. One bad payload
    failing its whole partition held every commit behind it (seen 2026-12-02)."""
    if not raw:
        return None
    try:
        return _data_decoder.decode(raw)
    except msgspec.MsgspecError:
        return None


def data_strings(value: Any) -> Iterator[str]:
    """The string values inside `data`, at any depth (keys are not text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from data_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from data_strings(item)


def text_strings(fields: IndexedFields) -> list[str]:
    """The strings whose words the text filter `q` searches."""
    texts = [fields.type]
    if fields.actor is not None:
        texts.append(fields.actor)
    if fields.target is not None:
        texts.append(fields.target)
    if fields.tags:
        texts.extend(fields.tags.values())
    data = decode_data(fields.data)
    if data is not None:
        texts.extend(data_strings(data))
    return texts


def record_words(fields: IndexedFields) -> set[str]:
    return {word for text in text_strings(fields) for word in words(text)}


def record_terms(fields: IndexedFields) -> set[str]:
    """Every filter term of an event record (ids and dead letters aside)."""
    terms = {TYPE + fields.type, UID + str(fields.uid), COMM + fields.comm}
    for letter, value in ((ACTOR, fields.actor), (TARGET, fields.target),
                          (STREAM, fields.stream), (CORRELATION, fields.correlation_id),
                          (CAUSATION, fields.causation_id)):
        if value is not None:
            terms.add(letter + value)
    for key, value in (fields.tags or {}).items():
        terms.add(TAG + key + TAG_SEPARATOR + value)
    terms.update(WORD + word for word in record_words(fields))
    return terms


def matches(fields: IndexedFields, letter: str, terms: Sequence[str]) -> bool:
    """Whether an event record holds one of `terms` (all of field `letter`)."""
    if fields.dead_letter:
        return False
    if letter == WORD:
        found = record_words(fields)
        return any(term[1:] in found for term in terms)
    if letter == TAG:
        pairs = {TAG + k + TAG_SEPARATOR + v for k, v in (fields.tags or {}).items()}
        return any(term in pairs for term in terms)
    value = _SCALAR[letter](fields)
    return value is not None and letter + value in terms


_SCALAR: Mapping[str, Any] = {
    TYPE: lambda f: f.type, ACTOR: lambda f: f.actor, TARGET: lambda f: f.target,
    STREAM: lambda f: f.stream, CORRELATION: lambda f: f.correlation_id,
    CAUSATION: lambda f: f.causation_id, UID: lambda f: str(f.uid), COMM: lambda f: f.comm,
}
