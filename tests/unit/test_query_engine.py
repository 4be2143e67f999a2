"""QueryEngine in-process over a real store (sealed partitions + hot table, built by the
query bench's builder): exact answers for each filter in both orders, the same answers
from the ring's window as from the database, and no statement that scans a table."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from multidict import MultiDict

from auditd.bench.query_store import LONG_CORRELATION_EVERY, RARE_WORD, BenchEvents, build_store
from auditd.query.engine import QueryEngine
from auditd.query.hot_index import HotIndex
from auditd.query.rebuild import hot_batches
from auditd.query.rows import connect_reader
from auditd.query.spec import QuerySpec, matches, parse_query
from auditd.schema import StoredEvent
from auditd.store.partition.read import SealedPartition

COUNT, PARTITION = 3000, 1000  # 2 partitions sealed (1-2000), 1000 hot
EVENTS = BenchEvents(long_correlation_every=LONG_CORRELATION_EVERY).events(0, COUNT)


class Files:
    def __init__(self, lib: Path) -> None:
        self.lib = lib

    def files(self) -> list[tuple[int, int, Path]]:
        with sqlite3.connect(self.lib / "auditd.db") as db:
            rows = db.execute("SELECT first_seq, last_seq, file FROM partitions "
                              "ORDER BY first_seq").fetchall()
        return [(a, b, self.lib / "partitions" / f) for a, b, f in rows]


@pytest.fixture(scope="module")
def lib(tmp_path_factory: Any) -> Path:
    path: Path = tmp_path_factory.mktemp("store") / "lib"
    build_store(path, COUNT, PARTITION, say=lambda _: None)
    return path


@pytest.fixture(scope="module")
def index(lib: Path) -> HotIndex:
    hot = HotIndex()
    conn = connect_reader(lib / "auditd.db")
    try:
        assert hot.rebuild(hot_batches(conn, 2000)) == 1000
    finally:
        conn.close()
    return hot


def run(engine: QueryEngine, spec: QuerySpec) -> list[int]:
    async def go() -> list[int]:
        try:
            return [e.seq for e in (await engine.query(spec)).events]
        finally:
            await engine.aclose()
    return asyncio.run(go())


def brute(spec: QuerySpec) -> list[int]:
    found = [e.seq for e in EVENTS if matches(e, spec)]
    return (found[::-1] if spec.descending else found)[:spec.limit]


middle = EVENTS[1990]
CASES: list[list[tuple[str, str]]] = [
    [], [("type", middle.type)], [("type", middle.type), ("type", EVENTS[5].type)],
    [("actor", middle.actor or "")], [("target", middle.target or "")],
    [("stream", middle.stream or "")], [("correlation_id", middle.correlation_id or "")],
    [("correlation_id", "op-long-000000")], [("causation_id", EVENTS[2500].id)],
    [("uid", "1000")], [("comm", "audit-client")], [("tag.region", "eu-central-1")],
    [("tag.region", "eu-west-1"), ("tag.env", "staging")], [("q", RARE_WORD)],
    [("q", "firefox"), ("type", middle.type)], [("q", "quok*")],
    [("since", str(middle.ts // 10**9)), ("until", str(middle.ts // 10**9 + 5))],
    [("after", "1500"), ("before", "2600"), ("actor", EVENTS[1600].actor or "")],
]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("pairs", CASES)
def test_exact_answers_over_sealed_and_hot(lib: Path, index: HotIndex,
                                           pairs: list[tuple[str, str]], order: str) -> None:
    for limit in ("3", "10000"):
        spec = parse_query(MultiDict([*pairs, ("order", order), ("limit", limit)]))
        engine = QueryEngine(lib / "auditd.db", index, Files(lib), lambda seqs: {})
        assert run(engine, spec) == brute(spec)


def test_the_ring_window_and_the_store_agree(lib: Path, index: HotIndex) -> None:
    by_seq = {e.seq: e for e in EVENTS[-300:]}
    asked: list[int] = []

    def window(seqs: Any) -> dict[int, StoredEvent]:
        asked.extend(seqs)
        return {seq: by_seq[seq] for seq in seqs if seq in by_seq}

    for pairs in CASES:
        spec = parse_query(MultiDict([*pairs, ("order", "desc"), ("limit", "50")]))
        from_ring = QueryEngine(lib / "auditd.db", index, Files(lib), window)
        from_store = QueryEngine(lib / "auditd.db", index, Files(lib), lambda seqs: {})
        assert run(from_ring, spec) == run(from_store, spec)
    assert set(asked) & set(by_seq)  # the window was read


def traced(lib: Path, index: HotIndex, spec: QuerySpec) -> list[str]:
    engine = QueryEngine(lib / "auditd.db", index, Files(lib), lambda seqs: {})
    statements: list[str] = []

    async def go() -> None:
        def trace() -> None:
            engine.conn.set_trace_callback(statements.append)
        await engine._call(trace)
        await engine.query(spec)
        await engine.aclose()
    asyncio.run(go())
    return statements


def plans(db: sqlite3.Connection, statements: list[str]) -> Iterator[str]:
    for sql in statements:
        for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"):
            yield str(row[-1])


@pytest.mark.parametrize("pairs", CASES)
def test_no_statement_scans_a_table(lib: Path, index: HotIndex,
                                    pairs: list[tuple[str, str]]) -> None:
    spec = parse_query(MultiDict([*pairs, ("order", "desc")]))
    statements = traced(lib, index, spec)
    with sqlite3.connect(lib / "auditd.db") as db:
        steps = list(plans(db, statements))
    assert all(not step.startswith("SCAN") or "json_each" in step for step in steps), steps
    for _, _, path in Files(lib).files():
        with SealedPartition(path) as part:
            for plan in part.explain(spec.partition_filters(), limit=100,
                                     since_ns=spec.since_ns, until_ns=spec.until_ns):
                assert "SCAN" not in plan.replace("SCAN json_each", ""), plan


# -- sealed side with dead letters and awkward values (partition_events' items) -----------


@pytest.fixture(scope="module")
def varied(tmp_path_factory: Any) -> tuple[list[tuple[int, int, Path]], list[StoredEvent]]:
    from partition_events import varied_items

    from auditd.store.partition import seal_partition

    items = varied_items(1500, seed=5)
    directory = tmp_path_factory.mktemp("varied")
    files = []
    for first in (1, 751):
        part = [(seq, record) for seq, record, _ in items if first <= seq < first + 750]
        info = seal_partition(iter(part), directory, first, first + 749, run_records=256)
        files.append((first, first + 749, info.path))
    return files, [event for _, _, event in items if event is not None]


VARIED_CASES: list[list[tuple[str, str]]] = [
    [], [("type", "file.read")], [("actor", "Zoë Ünal"), ("actor", "root")],
    [("tag.note", "a=b"), ("tag.env", "prod")], [("q", "grüße")], [("q", "écol*")],
    [("uid", "1000"), ("comm", "curl")], [("after", "700"), ("before", "800")],
]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("pairs", VARIED_CASES)
def test_sealed_answers_skip_dead_letters(varied: Any, pairs: list[tuple[str, str]],
                                         order: str) -> None:
    from auditd.query.sealed_read import SealedReader

    files, events = varied
    reader = SealedReader()
    try:
        for limit in ("4", "10000"):
            spec = parse_query(MultiDict([*pairs, ("order", order), ("limit", limit)]))
            found = [e.seq for e in reader.query(files, spec, 1500, spec.limit)]
            expected = [e.seq for e in events if matches(e, spec)]
            assert found == (expected[::-1] if spec.descending else expected)[:spec.limit]
            assert all(seq % 53 for seq in found)  # every 53rd seq is a dead letter
        assert reader.events(files, [53, 106, 54]).keys() == {54}
    finally:
        reader.close()
