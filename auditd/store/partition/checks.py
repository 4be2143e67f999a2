"""A sealed partition's self-check: what `SealedPartition.check()` reports."""

from __future__ import annotations

import random
import sqlite3
from typing import TYPE_CHECKING

import msgspec
import zstandard

from auditd.store.partition.fields import IndexedFields, decode_fields, record_terms
from auditd.store.partition.layout import FORMAT_VERSION, ID, ZONE_RECORDS, term_key

if TYPE_CHECKING:
    from auditd.store.partition.read import SealedPartition

SAMPLE = 200  # event records whose every term is looked up in the index


def check_partition(part: SealedPartition) -> list[str]:
    """Problems found, empty when none: the SQLite file, the format version, every
    record (decodes, holds the seq of its place, the block's checksum holds), the dead
    letters' postings, and for a sample of records every term's postings, the id
    lookup, the term filter and the zone map."""
    problems = []
    try:
        problems += [f"sqlite: {line}" for (line,) in part.conn.execute("PRAGMA quick_check")
                     if line != "ok"]
    except sqlite3.DatabaseError as exc:
        return [f"sqlite: {exc}"]
    if part.meta.get("format_version") != FORMAT_VERSION:
        problems.append(f"format version {part.meta.get('format_version')!r}")
    if part.count != part.last_seq - part.first_seq + 1:
        problems.append(f"count {part.count} for seqs {part.first_seq}-{part.last_seq}")
    events: list[tuple[int, IndexedFields]] = []
    dead: set[int] = set()
    blocks = -(-part.count // part.block_records)
    for block in range(blocks):
        try:
            records = part.block(block)
        except (zstandard.ZstdError, sqlite3.DatabaseError, ValueError) as exc:
            problems.append(f"block {block}: {exc}")
            continue
        for index, record in enumerate(records):
            offset = block * part.block_records + index
            try:
                fields = decode_fields(record)
            except msgspec.DecodeError as exc:
                problems.append(f"seq {part.first_seq + offset}: record does not decode: {exc}")
                continue
            if fields.seq != part.first_seq + offset:
                problems.append(f"seq {part.first_seq + offset}: record holds seq {fields.seq}")
            if fields.dead_letter:
                dead.add(offset)
            else:
                events.append((offset, fields))
    if dead != part.dead_offsets():
        problems.append(f"dead letters: {len(dead)} records, {len(part.dead_offsets())} "
                        "in the index")
    problems += _sample(part, random.Random(part.first_seq).sample(
        events, min(SAMPLE, len(events))))
    return problems


def _sample(part: SealedPartition, sample: list[tuple[int, IndexedFields]]) -> list[str]:
    problems = []
    try:
        term_filter = part.term_filter()  # None: sealed before filters, nothing to check
    except ValueError as exc:
        problems.append(f"{exc}")
        term_filter = None
    zones = part.zones()
    mins, maxs = zones.mins, zones.maxs
    for offset, fields in sample:
        seq = part.first_seq + offset
        for term in [*sorted(record_terms(fields)), ID + fields.id]:
            postings = part.terms(term)
            held = offset in postings.candidates or any(
                offset in long.between(part.run, offset, offset) for long in postings.exact)
            if not held:
                problems.append(f"seq {seq}: term {term!r} not in the index")
            if term_filter is not None and term[0] != ID and not term_filter.may_hold(
                    term_key(term)):
                problems.append(f"seq {seq}: term {term!r} not in the term filter")
        if part.lookup_id(fields.id) != seq:
            problems.append(f"seq {seq}: id {fields.id} looks up {part.lookup_id(fields.id)}")
        zone = offset // ZONE_RECORDS
        if zone >= len(mins) or not mins[zone] <= fields.ts <= maxs[zone]:
            problems.append(f"seq {seq}: ts {fields.ts} outside its zone's range")
    return problems
