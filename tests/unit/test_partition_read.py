"""Reading sealed partitions: every filter, alone and combined, agrees with a scan of
the same events; ids, streams and records come back; the plan uses an index for
every filter; the file cannot be written and a flipped byte is found."""

from __future__ import annotations

import random
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from partition_events import ACTORS, TYPES, Item, brute_query, varied_items

from auditd.store.partition import PartitionFormatError, SealedPartition, seal_partition
from auditd.store.records import record_bytes

COUNT = 3000
QUERY_KEYS = ("since_ns", "until_ns", "after_seq", "before_seq", "limit", "descending")


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return varied_items(COUNT, first_seq=101)


@pytest.fixture(scope="module")
def sealed(items: list[Item], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sealed")
    # Runs of 512 records: terms spread over runs as in a large partition.
    info = seal_partition(((seq, record) for seq, record, _ in items), directory, 101,
                          100 + COUNT, run_records=512)
    return info.path


@pytest.fixture
def part(sealed: Path) -> Iterator[SealedPartition]:
    with SealedPartition(sealed) as opened:
        yield opened


def _events(items: list[Item]) -> list[Any]:
    return [event for _, _, event in items if event is not None]


def _values(items: list[Item], name: str) -> list[str]:
    found = {getattr(e, name) for e in _events(items)} - {None}
    return [*sorted(found)[:25], "no-such-value"]


SINGLE_FILTERS = {
    "type": lambda items: [*TYPES, "no.such"],
    "actor": lambda items: [*ACTORS, "nobody"],
    "target": lambda items: _values(items, "target"),
    "stream": lambda items: _values(items, "stream"),
    "correlation_id": lambda items: _values(items, "correlation_id"),
    "causation_id": lambda items: _values(items, "causation_id"),
    "uid": lambda items: ["0", "1000", "1001", "7", "x"],
    "comm": lambda items: ["python3", "curl", "auditctl", "bash"],
    "tag": lambda items: ["env=prod", "env=staging", "region=ap", "note=a=b", "note=a",
                          "env=", "zz=1"],
    "q": lambda items: ["alpha", "Corp", "grüße", "école", "json", "10", "delta 7", "x",
                        "y", "omega", "corp example", "nothing"],
}


@pytest.mark.parametrize("name", SINGLE_FILTERS)
def test_each_filter_alone_agrees_with_a_scan(part: SealedPartition, items: list[Item],
                                              name: str) -> None:
    for value in SINGLE_FILTERS[name](items):
        for descending in (True, False):
            filters = {name: [value]}
            expected = brute_query(items, filters, limit=COUNT, descending=descending)
            assert part.query(filters, limit=COUNT, descending=descending) == expected, value
            assert part.query(filters, limit=3, descending=descending) == expected[:3]


def test_repeated_values_or_and_filters_and(part: SealedPartition, items: list[Item]) -> None:
    cases: list[dict[str, list[str]]] = [
        {"actor": ["alice@corp.example", "root"]},
        {"type": ["file.read", "file.write"], "tag": ["env=prod", "region=ap"]},
        {"actor": ["bob@corp.example"], "q": ["alpha"], "uid": ["1000"]},
        {"stream": ["acct-3", "acct-4"], "comm": ["curl"]},
        {"q": ["json", "corp"]},
    ]
    for filters in cases:
        assert part.query(filters, limit=COUNT) == brute_query(items, filters, limit=COUNT)


def test_random_combinations_with_ranges(part: SealedPartition, items: list[Item]) -> None:
    rng = random.Random(5)
    events = _events(items)
    names = list(SINGLE_FILTERS)
    for _ in range(150):
        event = rng.choice(events)
        filters: dict[str, list[str]] = {}
        for name in rng.sample(names, rng.randint(0, 3)):
            if name in ("tag", "q"):
                filters[name] = rng.sample(SINGLE_FILTERS[name](items), 1)
            else:
                value = str(event.uid) if name == "uid" else getattr(event, name)
                filters[name] = [value if value is not None else "none"]
        options: dict[str, Any] = {"limit": rng.choice([1, 7, 100, COUNT]),
                                   "descending": rng.random() < 0.6}
        if rng.random() < 0.5:
            options["since_ns"] = event.ts - rng.randrange(2 * 10**12)
            options["until_ns"] = event.ts + rng.randrange(10**12)
        if rng.random() < 0.4:
            options["after_seq"] = rng.randrange(COUNT)
            options["before_seq"] = options["after_seq"] + rng.randrange(COUNT)
        assert part.query(filters, **options) == brute_query(items, filters, **options), (
            filters, options)


def test_time_and_seq_ranges_alone(part: SealedPartition, items: list[Item]) -> None:
    events = _events(items)
    for since, until in [(events[100].ts, events[400].ts), (None, events[50].ts),
                         (events[-30].ts, None), (0, 1)]:
        for descending in (True, False):
            options = {"since_ns": since, "until_ns": until, "limit": 500,
                       "descending": descending}
            assert part.query({}, **options) == brute_query(items, {}, **options)
    assert part.query({}, after_seq=200, before_seq=260, limit=COUNT) == brute_query(
        items, {}, after_seq=200, before_seq=260, limit=COUNT)
    # Paging after a cursor walks the whole range with no repeat and no hole.
    pages, cursor = [], None
    while page := part.query({"type": ["file.read"]}, before_seq=cursor, limit=40):
        pages += page
        cursor = page[-1]
    assert pages == brute_query(items, {"type": ["file.read"]}, limit=COUNT)


def test_dead_letters_are_records_but_never_match(part: SealedPartition,
                                                  items: list[Item]) -> None:
    dead = [seq for seq, _, event in items if event is None]
    assert dead and part.dead_letters() == dead
    everything = part.query({}, limit=COUNT, descending=False)
    assert not set(dead) & set(everything) and len(everything) == COUNT - len(dead)
    records = {seq: record for seq, record, _ in items}
    assert [part.record(seq) for seq in dead] == [records[seq] for seq in dead]


def test_explain_uses_an_index_for_every_filter(part: SealedPartition,
                                                items: list[Item]) -> None:
    event = _events(items)[10]
    queries: list[tuple[dict[str, list[str]], dict[str, Any]]] = [
        ({name: [SINGLE_FILTERS[name](items)[0]]}, {}) for name in SINGLE_FILTERS]
    queries += [({}, {"since_ns": event.ts, "until_ns": event.ts + 10**11}),
                ({}, {"after_seq": 500, "before_seq": 900}),
                ({"actor": ACTORS[:2], "q": ["corp"]}, {"since_ns": event.ts})]
    for filters, options in queries:
        plans = part.explain(filters, limit=20, **options)
        assert plans, filters
        for plan in plans:
            assert "SCAN" not in plan and "SEARCH" in plan, plan


def test_lookup_id(part: SealedPartition, items: list[Item]) -> None:
    for seq, _, event in items[::7]:
        if event is not None:
            assert part.lookup_id(event.id) == seq
    assert part.lookup_id("no-such-id") is None
    assert part.lookup_id(_events(items)[0].id + "x") is None


def test_streams(part: SealedPartition, items: list[Item]) -> None:
    streams: dict[str, list[tuple[int, int]]] = {}
    for seq, _, event in items:
        if event is not None and event.stream is not None:
            streams.setdefault(event.stream, []).append((event.stream_seq or 0, seq))
    for stream, pairs in streams.items():
        assert part.stream_last(stream) == pairs[-1]
        assert part.stream_range(stream, 1, 10**9) == pairs
        assert part.stream_range(stream, pairs[3][0], pairs[9][0]) == pairs[3:10]
    assert part.stream_last("acct-none") is None and part.stream_range("x", 1, 9) == []


def test_records_by_seq(part: SealedPartition, items: list[Item]) -> None:
    records = {seq: record for seq, record, _ in items}
    for seq in (101, 102, 164, 165, 2000, 100 + COUNT):
        assert part.record(seq) == records[seq]
    assert part.record(100) is None and part.record(101 + COUNT) is None
    seqs = random.Random(2).sample(sorted(records), 300)
    assert part.records(seqs) == [records[seq] for seq in seqs]
    with pytest.raises(KeyError):
        part.records([150, 99])


def test_file_is_not_writable_through_a_partition(part: SealedPartition, sealed: Path) -> None:
    before = sealed.read_bytes()
    for statement in ("DELETE FROM meta", "CREATE TABLE x (y)", "PRAGMA user_version = 3"):
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            part.conn.execute(statement)
    assert sealed.read_bytes() == before


def test_check_finds_a_flipped_byte_in_a_record_block(sealed: Path, tmp_path: Path) -> None:
    with SealedPartition(sealed) as part:
        assert part.check() == []
        block = part.conn.execute("SELECT data FROM record_stream WHERE row = 3").fetchone()[0]
    copy = tmp_path / sealed.name
    shutil.copy(sealed, copy)
    data = bytearray(copy.read_bytes())
    at = data.find(block[1000:1100]) + 50  # the middle of a compressed block
    data[at] ^= 0x10
    copy.write_bytes(bytes(data))
    with SealedPartition(copy) as damaged:
        problems = damaged.check()
    assert problems and any("block" in problem for problem in problems), problems


def test_unknown_format_version_is_refused(sealed: Path, tmp_path: Path) -> None:
    copy = tmp_path / sealed.name
    shutil.copy(sealed, copy)
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    with pytest.raises(PartitionFormatError, match="format version 99"):
        SealedPartition(copy)
    garbage = tmp_path / "p000000000001-000000000002.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(PartitionFormatError):
        SealedPartition(garbage)


def test_unknown_filter_and_bad_tag(part: SealedPartition) -> None:
    with pytest.raises(ValueError, match="unknown filter"):
        part.query({"colour": ["red"]}, limit=1)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        part.query({"tag": ["env"]}, limit=1)
    assert part.query({"actor": []}, limit=5) == []


def test_stream_seqs_that_skip_are_kept(tmp_path: Path) -> None:
    """The sequencer gives a stream consecutive stream_seqs; a partition keeps any."""
    items = varied_items(1200, seed=11, dead_every=0)
    skipping = []
    for seq, _, event in items:
        assert event is not None
        if event.stream is not None:
            event = msgspec.structs.replace(event, stream_seq=(event.stream_seq or 0) * 3)
        skipping.append((seq, record_bytes(event), event))
    info = seal_partition(((seq, record) for seq, record, _ in skipping), tmp_path, 1, 1200,
                          run_records=256)
    with SealedPartition(info.path) as part:
        for stream in {event.stream for _, _, event in skipping if event and event.stream}:
            pairs = [(e.stream_seq or 0, seq) for seq, _, e in skipping if e and e.stream == stream]
            assert part.stream_last(stream) == pairs[-1]
            assert part.stream_range(stream, pairs[2][0], pairs[5][0] + 1) == pairs[2:6]
        assert part.check() == []
