"""Partition term filters: the Bloom filter itself, the builder's filter against every
value its partition holds, and the query engine over a real store (partitions sealed by
seal_partition) with filters, without them (partitions sealed before filters existed)
and with filters that say "maybe" to everything: the same answers as a brute force in
each, and partitions skipped only where a filter rules them out."""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from multidict import MultiDict
from partition_events import event_words, varied_items

from auditd.bench.query_store import LONG_CORRELATION_EVERY, RARE_WORD, BenchEvents, build_store
from auditd.query.engine import QueryEngine
from auditd.query.hot_index import HotIndex
from auditd.query.rebuild import hot_batches
from auditd.query.rows import connect_reader
from auditd.query.spec import QuerySpec, matches, parse_query
from auditd.store.partition import SealedPartition, seal_partition
from auditd.store.partition.layout import ACTOR, TYPE, WORD, term_key
from auditd.store.partition.term_filter import (
    FILTER_META,
    TermFilter,
    probe_groups,
)

# --- the filter ----------------------------------------------------------------------


def test_every_key_built_in_is_held_and_few_others_are() -> None:
    rng = random.Random(11)
    keys = [rng.getrandbits(32) for _ in range(50_000)]
    built = TermFilter.build(keys + keys[:500])  # repeats: sized by the distinct count
    assert all(map(built.may_hold, keys))
    absent = [rng.getrandbits(32) for _ in range(50_000)]
    false_positives = sum(map(built.may_hold, absent)) / len(absent)
    assert false_positives < 0.02  # 1.2 % expected at 10 bits a key, 4 hashes
    assert 62_500 - 8 <= built.nbytes <= 62_500 + 8  # 10 bits a key, whole 64-bit words


def test_bytes_round_trip_and_damage_is_refused() -> None:
    built = TermFilter.build(range(1000))
    again = TermFilter.from_bytes(built.to_bytes())
    assert (again.bits, again.size, again.hashes) == (built.bits, built.size, built.hashes)
    with pytest.raises(ValueError, match="term filter"):
        TermFilter.from_bytes(built.to_bytes()[:-1])
    with pytest.raises(ValueError, match="term filter"):
        TermFilter.from_bytes(b"\x09" + built.to_bytes()[1:])
    empty = TermFilter.build([])
    assert not empty.may_hold(12345)


def test_groups_and_and_keys_or() -> None:
    built = TermFilter.build([term_key(ACTOR + "alice"), term_key(TYPE + "login"),
                              term_key(WORD + "alice")])
    assert not built.rules_out(probe_groups({"actor": ["alice"]}))
    assert not built.rules_out(probe_groups({"actor": ["nobody", "alice"]}))
    assert not built.rules_out(probe_groups({"actor": ["alice"], "q": ["Alice"]}))
    assert built.rules_out(probe_groups({"actor": ["alice"], "type": ["logout"]}))
    assert built.rules_out(probe_groups({"q": ["alice nowhere"]}))
    assert built.rules_out(probe_groups({"actor": ["login"]}))  # another field's value


def test_the_builders_filter_holds_every_value_of_its_partition(tmp_path: Path) -> None:
    """Every field of every event (non-ASCII words, nested data, a tag value with "="),
    with small runs so that values recur across runs as in a large partition."""
    items = varied_items(3000)
    info = seal_partition(((seq, record) for seq, record, _ in items), tmp_path, 1, 3000,
                          run_records=512)
    with SealedPartition(info.path) as part:
        held = part.term_filter()
    assert held is not None and held.nbytes == info.filter_bytes
    for _, _, event in items:
        if event is None:
            continue
        tags = msgspec.msgpack.decode(event.tags) if event.tags else {}
        filters: dict[str, list[str]] = {
            "type": [event.type], "uid": [str(event.uid)], "comm": [event.comm],
            "q": [" ".join(sorted(event_words(event)))],
            **{name: [value] for name in ("actor", "target", "stream", "correlation_id",
                                          "causation_id")
               if (value := getattr(event, name)) is not None}}
        groups = probe_groups(filters)
        groups += [g for key, value in tags.items()
                   for g in probe_groups({"tag": [f"{key}={value}"]})]
        assert not held.rules_out(groups), event


def test_check_finds_a_filter_that_misses_terms(tmp_path: Path) -> None:
    items = varied_items(1200)
    info = seal_partition(((seq, record) for seq, record, _ in items), tmp_path, 1, 1200)
    with SealedPartition(info.path) as part:
        assert part.check() == []
        held = part.term_filter()
    assert held is not None
    with sqlite3.connect(info.path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = ?",
                   (TermFilter(bytes(held.nbytes), held.size).to_bytes(), FILTER_META))
    with SealedPartition(info.path) as part:
        problems = part.check()
    assert problems and all("not in the term filter" in p for p in problems)


# --- the engine over a store ---------------------------------------------------------

COUNT, PARTITION = 5000, 1000  # 4 partitions sealed (1-4000), 1000 hot
EVENTS = BenchEvents(long_correlation_every=LONG_CORRELATION_EVERY).events(0, COUNT)


class Files:
    def __init__(self, lib: Path) -> None:
        self.lib = lib

    def files(self) -> list[tuple[int, int, Path]]:
        with sqlite3.connect(self.lib / "auditd.db") as db:
            rows = db.execute("SELECT first_seq, last_seq, file FROM partitions "
                              "ORDER BY first_seq").fetchall()
        return [(a, b, self.lib / "partitions" / f) for a, b, f in rows]


def rewrite_filters(lib: Path, which: list[int], blob: bytes | None) -> None:
    """Partitions number `which` (0: oldest) get this filter blob; None: none at all,
    as a file sealed before filters existed."""
    files = Files(lib).files()
    for at in which:
        with sqlite3.connect(files[at][2]) as db:
            db.execute("DELETE FROM meta WHERE key = ?", (FILTER_META,))
            if blob is not None:
                db.execute("INSERT INTO meta VALUES (?, ?)", (FILTER_META, blob))


@pytest.fixture(scope="module")
def stores(tmp_path_factory: Any) -> dict[str, Path]:
    root: Path = tmp_path_factory.mktemp("stores")
    build_store(root / "filtered", COUNT, PARTITION, say=lambda _: None)
    shutil.copytree(root / "filtered", root / "mixed")
    rewrite_filters(root / "mixed", [0, 2], None)
    shutil.copytree(root / "filtered", root / "saturated")
    everything = TermFilter(b"\xff" * 8, 64)  # "maybe" to every key
    rewrite_filters(root / "saturated", [0, 1, 2, 3], everything.to_bytes())
    shutil.copytree(root / "filtered", root / "damaged")
    rewrite_filters(root / "damaged", [1], b"\x01\x04garbage")
    return {name: root / name for name in ("filtered", "mixed", "saturated", "damaged")}


@pytest.fixture(scope="module")
def index(stores: dict[str, Path]) -> HotIndex:
    hot = HotIndex()
    conn = connect_reader(stores["filtered"] / "auditd.db")
    try:
        assert hot.rebuild(hot_batches(conn, 4000)) == 1000
    finally:
        conn.close()
    return hot


def run(lib: Path, index: HotIndex, spec: QuerySpec,
        **options: Any) -> tuple[list[int], dict[str, Any]]:
    engine = QueryEngine(lib / "auditd.db", index, Files(lib), lambda seqs: {}, **options)

    async def go() -> tuple[list[int], dict[str, Any]]:
        try:
            found = [e.seq for e in (await engine.query(spec)).events]
            return found, engine.figures()
        finally:
            await engine.aclose()
    return asyncio.run(go())


def brute(spec: QuerySpec) -> list[int]:
    found = [e.seq for e in EVENTS if matches(e, spec)]
    return (found[::-1] if spec.descending else found)[:spec.limit]


in_p1, in_p3 = EVENTS[500], EVENTS[2500]  # seqs 501 and 2501: partitions 0 and 2
CASES: list[list[tuple[str, str]]] = [
    [("type", in_p3.type)], [("type", "no.such.type")],
    [("actor", in_p3.actor or "")], [("actor", "nobody@nowhere.example")],
    [("actor", "nobody@nowhere.example"), ("actor", in_p1.actor or "")],
    [("target", in_p3.target or "")], [("target", in_p1.target or ""),
                                       ("target", in_p3.target or "")],
    [("target", in_p1.target or ""), ("actor", in_p3.actor or "")],
    [("stream", in_p1.stream or "")], [("stream", "account-none")],
    [("correlation_id", in_p3.correlation_id or "")], [("correlation_id", "op-long-000000")],
    [("causation_id", EVENTS[2499].id)], [("causation_id", "no-such-id")],
    [("uid", "1000")], [("uid", "4321")], [("comm", "audit-client")], [("comm", "nope")],
    [("tag.region", "eu-central-1")], [("tag.region", "mars")],
    [("tag.region", "eu-central-1"), ("tag.env", "nowhere")],
    [("q", RARE_WORD)], [("q", "zyzzyva")], [("q", f"{RARE_WORD} zyzzyva")],
    [("q", "quok*"), ("actor", in_p3.actor or "")],
    [("after", "1500"), ("before", "3600"), ("target", in_p3.target or "")],
]
STORES = ["filtered", "mixed", "saturated", "damaged"]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("pairs", CASES)
def test_the_same_answers_with_and_without_filters(
        stores: dict[str, Path], index: HotIndex, pairs: list[tuple[str, str]],
        order: str) -> None:
    for limit in ("2", "10000"):
        spec = parse_query(MultiDict([*pairs, ("order", order), ("limit", limit)]))
        for name in STORES:
            assert run(stores[name], index, spec)[0] == brute(spec), name


def figures_of(stores: dict[str, Path], index: HotIndex, name: str,
               pairs: list[tuple[str, str]]) -> dict[str, Any]:
    spec = parse_query(MultiDict([*pairs, ("limit", "10000")]))
    found, figures = run(stores[name], index, spec)
    assert found == brute(spec)
    return figures


def test_a_partition_that_cannot_hold_the_value_is_skipped(
        stores: dict[str, Path], index: HotIndex) -> None:
    absent = figures_of(stores, index, "filtered", [("actor", "nobody@nowhere.example")])
    assert (absent["partitions_skipped"], absent["partitions_probed"]) == (4, 0)
    assert absent["filters"] == 4 and absent["filter_bytes"] > 0
    caused = figures_of(stores, index, "filtered", [("causation_id", EVENTS[2499].id)])
    assert (caused["partitions_skipped"], caused["partitions_probed"]) == (3, 1)
    # Two filters AND: each partition holds one of them, none both.
    both = figures_of(stores, index, "filtered", [("target", in_p1.target or ""),
                                                  ("causation_id", EVENTS[2499].id)])
    assert both["partitions_skipped"] == 4
    # ORed values: a partition is asked if either may be there.
    either = figures_of(stores, index, "filtered", [("target", in_p1.target or ""),
                                                    ("target", in_p3.target or "")])
    assert either["partitions_probed"] >= 2
    # A second tag key, which the index is not asked for, rules partitions out too.
    tags = figures_of(stores, index, "filtered", [("tag.region", "eu-central-1"),
                                                  ("tag.env", "nowhere")])
    assert tags["partitions_skipped"] == 4
    # No filter field at all: nothing to rule out.
    newest = figures_of(stores, index, "filtered", [])
    assert (newest["partitions_skipped"], newest["partitions_probed"]) == (0, 4)


def test_old_partitions_without_a_filter_are_searched(stores: dict[str, Path],
                                                      index: HotIndex) -> None:
    figures = figures_of(stores, index, "mixed", [("causation_id", EVENTS[2499].id)])
    # Partitions 0 and 2 have no filter: asked (2 holds the answer); 1 and 3 skipped.
    assert figures["partitions_unfiltered"] == 2
    assert (figures["partitions_skipped"], figures["partitions_probed"]) == (2, 2)
    assert figures["filters"] == 2
    damaged = figures_of(stores, index, "damaged", [("actor", "nobody@nowhere.example")])
    assert (damaged["partitions_unfiltered"], damaged["partitions_skipped"]) == (1, 3)


def test_false_positives_only_cost_probes(stores: dict[str, Path], index: HotIndex) -> None:
    figures = figures_of(stores, index, "saturated", [("actor", "nobody@nowhere.example")])
    assert (figures["partitions_skipped"], figures["partitions_probed"]) == (0, 4)


def test_a_streams_partitions_are_skipped_too(stores: dict[str, Path],
                                             index: HotIndex) -> None:
    stream = in_p1.stream or ""
    expected = [e.seq for e in EVENTS if e.stream == stream]
    for name in STORES:
        engine = QueryEngine(stores[name] / "auditd.db", index, Files(stores[name]),
                             lambda seqs: {})

        async def go(engine: QueryEngine = engine) -> tuple[list[int], dict[str, Any]]:
            try:
                found = await engine.stream(stream, 1, 1 << 40, 1000, None)
                return [e.seq for e in found], engine.figures()
            finally:
                await engine.aclose()
        found, figures = asyncio.run(go())
        assert found == expected, name
        if name == "filtered":
            holding = {(e.seq - 1) // PARTITION for e in EVENTS
                       if e.stream == stream and e.seq <= 4000}
            assert figures["partitions_skipped"] == 4 - len(holding)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_past_the_memory_budget_the_oldest_partitions_go_without(
        stores: dict[str, Path], index: HotIndex, order: str) -> None:
    sizes = []
    for _, _, path in Files(stores["filtered"]).files():
        with SealedPartition(path) as part:
            held = part.term_filter()
            assert held is not None
            sizes.append(held.nbytes)
    spec = parse_query(MultiDict([("actor", "nobody@nowhere.example"), ("order", order)]))
    found, figures = run(stores["filtered"], index, spec, filter_budget=sizes[-1] + 1)
    assert found == []
    assert (figures["filters"], figures["filter_bytes"]) == (1, sizes[-1])
    assert figures["filters_over_budget"] == 3
    # Oldest first, each partition's filter serves its own check before the next one
    # (newer) takes its place; newest first, the newest keeps it and the rest go without.
    assert (figures["partitions_skipped"], figures["partitions_unfiltered"]) == (
        (1, 3) if order == "desc" else (4, 0))
    for pairs in CASES:
        spec = parse_query(MultiDict([*pairs, ("order", order), ("limit", "10000")]))
        assert run(stores["filtered"], index, spec, filter_budget=sizes[-1] + 1)[0] == brute(
            spec)
