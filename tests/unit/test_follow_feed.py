"""CommitFeed: seq order, shared matching, the lag bounds and the trimmed log."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from auditd.query.batches import Selector
from auditd.query.feed import DAEMON_STOPPING, SLOW_READER, CommitFeed, FeedRefused
from auditd.query.follow import selector_of
from auditd.query.lines import event_document, event_line, rfc3339_ns
from auditd.query.rows import event_json
from auditd.query.spec import matches, parse_query
from auditd.schema import StoredEvent, encoder
from auditd.store.store import DeadLetter
from auditd.store.writer import Gap


def event(seq: int, type_: str = "t", data: Any = None) -> StoredEvent:
    return StoredEvent(seq, f"id-{seq}", 1_700_000_000_123_456_789, 1_700_000_000_000_000_001,
                       type_, "alice", None, None, None, None, None,
                       encoder.encode({"k": "v"}), None if data is None else encoder.encode(data),
                       1, 1000, 1000, "sh", 0)


def gap(seq: int) -> Gap:
    return Gap(seq, DeadLetter("writer", "commit_failed", "poison", b"", seq, 0))


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_subscription_carries_every_seq_after_its_start_and_skips_gaps() -> None:
    async def body() -> None:
        feed = CommitFeed()
        feed.publish([event(1), event(2)])  # before: not carried
        sub = feed.subscribe()
        assert sub.start_seq == 2
        feed.publish([event(3), gap(4), event(5)])
        feed.publish([event(6)])
        taken = sub.take(1 << 20)
        assert b"".join(taken) == b"".join(event_line(event(s)) for s in (3, 5, 6))
        assert sub.covered_seq == 6 and not sub.ready
    run(body)


def test_same_key_matches_once_and_lines_are_shared() -> None:
    async def body() -> None:
        feed = CommitFeed()
        calls: list[int] = []

        def only_b(e: StoredEvent) -> bool:
            calls.append(e.seq)
            return e.type == "b"

        selector = Selector("b", predicate=only_b)
        first, second = feed.subscribe(selector), feed.subscribe(selector)
        feed.publish([event(1, "a"), event(2, "b"), event(3, "b")])
        one, two = first.take(1 << 20), second.take(1 << 20)
        assert one == two == [event_line(event(2, "b")) + event_line(event(3, "b"))]
        assert calls == [1, 2, 3]  # one match per event for both
        assert one[0] is two[0]  # one encoding, one joined piece
        assert first.covered_seq == 3
    run(body)


def test_take_stops_at_max_bytes_between_batches() -> None:
    async def body() -> None:
        feed = CommitFeed()
        sub = feed.subscribe()
        for seq in range(1, 11):
            feed.publish([event(seq)])
        feed.publish([event(seq) for seq in range(11, 21)])  # one batch: never split
        line = len(event_line(event(1)))
        got, takes = b"", []
        while sub.ready:
            pieces = sub.take(3 * line)
            takes.append(len(pieces))
            got += b"".join(pieces)
        assert got == b"".join(event_line(event(seq)) for seq in range(1, 21))
        assert takes == [3, 3, 3, 2] and sub.covered_seq == 20
    run(body)


def test_a_follower_over_the_lag_bound_is_cut_and_the_log_let_go() -> None:
    async def body() -> None:
        feed = CommitFeed(max_lag_events=100)
        slow, fast = feed.subscribe(), feed.subscribe()
        for start in range(1, 500, 10):
            feed.publish([event(seq) for seq in range(start, start + 10)])
            fast.take(1 << 30)
            assert feed.figures()["held_events"] <= 110
        assert slow.ended.done() and slow.ended.result() == SLOW_READER
        assert slow.take(1 << 20) == []
        assert feed.cut[SLOW_READER] == 1 and feed.figures()["live"] == 1
        assert not fast.ended.done()
        assert feed.figures()["held_events"] <= 10  # the last batch, until the next publish
    run(body)


def test_the_byte_bound_cuts_too() -> None:
    async def body() -> None:
        feed = CommitFeed(max_lag_bytes=100_000)
        sub = feed.subscribe()
        for seq in range(1, 200):
            feed.publish([event(seq, data={"blob": "x" * 2000})])
        assert sub.ended.result() == SLOW_READER
    run(body)


def test_no_subscriber_keeps_nothing() -> None:
    async def body() -> None:
        feed = CommitFeed()
        for seq in range(1, 1000):
            feed.publish([event(seq)])
        assert feed.figures()["held_events"] == 0 and feed.last_seq == 999
        sub = feed.subscribe()
        assert sub.start_seq == 999 and not sub.ready
    run(body)


def test_wait_wakes_on_publish_and_close_ends_with_daemon_stopping() -> None:
    async def body() -> None:
        feed = CommitFeed()
        feed.open_session()
        sub = feed.subscribe()
        waiter = asyncio.ensure_future(sub.wait(30))
        await asyncio.sleep(0)
        assert not waiter.done()
        feed.publish([event(1)])
        await asyncio.wait_for(waiter, 5)
        assert sub.ready
        closing = asyncio.ensure_future(feed.aclose(5))
        await asyncio.sleep(0)
        assert sub.ended.result() == DAEMON_STOPPING and feed.stopped().done()
        with pytest.raises(FeedRefused):
            feed.open_session()
        feed.close_session()
        await asyncio.wait_for(closing, 5)
    run(body)


def test_indexed_fields_and_predicates_select_the_same_events_as_matches() -> None:
    async def body() -> None:
        feed = CommitFeed()
        queries = [{"type": "b"}, {"type": "a", "actor": "alice"}, {"uid": "1000"},
                   {"uid": "7"}, {"tag": "k=v", "type": "b"}, {"q": "alice"},
                   {"type": "a", "since": "1700000000"}]
        specs = [parse_query(q) for q in queries]
        subs = [feed.subscribe(selector_of(spec)) for spec in specs]
        events = [event(seq, "ab"[seq % 2]) for seq in range(1, 40)]
        feed.publish(events)
        for spec, sub in zip(specs, subs, strict=True):
            want = b"".join(event_line(e) for e in events if matches(e, spec))
            assert b"".join(sub.take(1 << 20)) == want, spec
    run(body)


def test_an_idle_follower_is_moved_past_batches_it_selects_nothing_of() -> None:
    async def body() -> None:
        feed = CommitFeed()
        sub = feed.subscribe(selector_of(parse_query({"type": "rare"})))
        waiter = asyncio.ensure_future(sub.wait(30))
        await asyncio.sleep(0)
        feed.publish([event(1), event(2)])
        for _ in range(5):  # a woken waiter finishes within a loop turn or two
            await asyncio.sleep(0)
        assert not waiter.done() and sub.covered_seq == 2 and not sub.ready
        feed.publish([event(3, "rare")])
        await asyncio.wait_for(waiter, 5)
        assert b"".join(sub.take(1 << 20)) == event_line(event(3, "rare"))
    run(body)


def test_max_followers() -> None:
    feed = CommitFeed(max_followers=2)
    feed.open_session()
    feed.open_session()
    with pytest.raises(FeedRefused, match="2 followers"):
        feed.open_session()
    feed.close_session()
    feed.open_session()


def test_event_document_fields_as_events_answers_them() -> None:
    document = event_document(event(7, data={"b": b"\x00\x01", "n": [1, "x"]}))
    assert document["seq"] == 7 and document["ts"] == "2023-11-14T22:13:20.123456789Z"
    assert document["received_at"] == rfc3339_ns(1_700_000_000_000_000_001)
    assert document["tags"] == {"k": "v"}
    assert document["data"] == {"b": {"$bytes": "AAE="}, "n": [1, "x"]}
    assert event_document(event(8))["data"] is None
    moment = datetime.datetime(2026, 12, 2, 10, 0, 0, 250000, tzinfo=datetime.UTC)
    for data in (None, {"s": "ą text", "n": 1.5, "deep": [{"x": None}]}, {"b": b"\xff"},
                 {"at": moment}, {1: "int key"}, ["list", True]):
        one = event(9, data=data)
        assert json.loads(event_line(one)) == json.loads(json.dumps(event_json(one))), data
