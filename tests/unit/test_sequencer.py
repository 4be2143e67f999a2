"""Sequencer: seq and stream_seq in arrival order, expect, id idempotency, undo; IdFilter."""

from __future__ import annotations

import random
import re
from typing import Any

import msgspec

from auditd.ingest.sequencer import IdFilter, Peer, Sequencer
from auditd.ingest.validation import ValidEvent, decode_body
from auditd.schema import hash64, id_hash, uuid7

PEER = Peer(pid=4242, uid=1000, gid=100, comm="tester")
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def valid(*events: dict[str, Any]) -> list[ValidEvent]:
    frame = decode_body(msgspec.msgpack.encode(list(events)), 10_000, 262_144)
    assert frame.rejected == []
    return frame.valid


def fresh(last_seq: int = 0, streams: dict[str, int] | None = None,
          recent_limit: int = 100) -> Sequencer:
    return Sequencer(last_seq, dict(streams or {}), recent_limit)


def test_id_filter_has_no_false_negatives_and_few_false_positives() -> None:
    rng = random.Random(7)
    members = [rng.getrandbits(64) - (1 << 63) for _ in range(20_000)]
    id_filter = IdFilter(capacity=20_000)
    for hashed in members:
        id_filter.add(hashed)
    assert all(id_filter.may_contain(h) for h in members)
    outsiders = [rng.getrandbits(64) - (1 << 63) for _ in range(20_000)]
    false_positives = sum(id_filter.may_contain(h) for h in outsiders)
    assert false_positives < 20_000 * 0.02


def test_id_keys_of_uuid7_ids_rise_with_time_and_others_are_plain_hashes() -> None:
    ids = [f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7abc-8def-0123{ms % 65536:08x}"
           for ms in range(1_700_000_000_000, 1_700_000_000_000 + 50_000, 7)]
    keys = [id_hash(event_id) for event_id in ids]
    assert len(set(keys)) == len(keys)
    millis = [((key + (1 << 63)) >> 20) + 1_577_836_800_000 for key in keys]
    assert millis == sorted(millis) and millis[0] == 1_700_000_000_000  # time leads
    assert id_hash(ids[0]) == keys[0]  # stable
    # Not a UUIDv7 (version 4, not hex, not canonical text): the plain 64-bit hash.
    for other in ("order-17-created", "018f2a4c-1b2c-4d3e-8f40-123456789abc", "x" * 36,
                  "0000000g-0000-7000-8000-000000000000",
                  "00000000-0000-7000-8000-000000000000"):  # before 2020: no time key
        assert id_hash(other) == hash64(other)


def test_id_filter_spreads_time_ordered_keys() -> None:
    """Keys of UUIDv7 ids share their leading bits; the filter still rules out
    almost every id it has not seen."""
    id_filter = IdFilter(capacity=20_000)
    for _ in range(20_000):
        id_filter.add(id_hash(uuid7()))
    false_positives = sum(id_filter.may_contain(id_hash(uuid7())) for _ in range(20_000))
    assert false_positives < 20_000 * 0.02


def test_id_filter_grows_past_its_capacity_without_forgetting() -> None:
    id_filter = IdFilter(capacity=100)
    hashes = [id_hash(f"id-{i}") for i in range(1000)]
    for hashed in hashes:
        id_filter.add(hashed)
    assert len(id_filter._filters) > 1
    assert all(id_filter.may_contain(h) for h in hashes)
    assert not IdFilter(capacity=100).may_contain(hashes[0])


def test_accept_assigns_gap_free_seq_and_stamps_the_peer() -> None:
    sequencer = fresh(last_seq=41)
    result = sequencer.accept(valid({"type": "a", "actor": "alice", "id": "x1", "ts": 5},
                                    {"type": "b", "data": {"k": 1}}), PEER, 1000, {})
    assert [e.seq for e in result.stored] == [42, 43]
    assert sequencer.last_seq == 43
    first, second = result.stored
    assert (first.id, first.type, first.actor, first.ts, first.received_at) == (
        "x1", "a", "alice", 5, 1000)
    assert second.ts == 1000  # defaults to the receive time
    assert UUID7.match(second.id)
    assert msgspec.msgpack.decode(second.data) == {"k": 1}  # type: ignore[arg-type]
    assert first.data is None
    assert (first.pid, first.uid, first.gid, first.comm) == (4242, 1000, 100, "tester")
    assert result.rejected == [] and result.duplicates == []
    assert result.seq_before == 41


def test_stream_seq_is_per_stream_and_gap_free() -> None:
    sequencer = fresh(streams={"b": 7})
    result = sequencer.accept(valid(
        {"type": "t", "stream": "a"}, {"type": "t", "stream": "b"}, {"type": "t"},
        {"type": "t", "stream": "a"}, {"type": "t", "stream": "b"}), PEER, 1, {})
    assert [(e.seq, e.stream, e.stream_seq) for e in result.stored] == [
        (1, "a", 1), (2, "b", 8), (3, None, None), (4, "a", 2), (5, "b", 9)]
    assert sequencer.streams == {"a": 2, "b": 9}


def test_expect_conflict_names_the_current_version_and_takes_no_seq() -> None:
    sequencer = fresh(streams={"acct": 3})
    result = sequencer.accept(valid(
        {"type": "t", "stream": "acct", "expect": 2},
        {"type": "t", "stream": "acct", "expect": 3},
        {"type": "t", "stream": "acct", "expect": 3},
        {"type": "t", "stream": "new", "expect": 0},
        {"type": "t", "stream": "new2", "expect": 1}), PEER, 1, {})
    assert result.rejected == [
        (0, "conflict", "stream 'acct' is at version 3, not 2"),
        (2, "conflict", "stream 'acct' is at version 4, not 3"),
        (4, "conflict", "stream 'new2' is at version 0, not 1"),
    ]
    assert [(e.seq, e.stream, e.stream_seq) for e in result.stored] == [
        (1, "acct", 4), (2, "new", 1)]
    assert sequencer.streams == {"acct": 4, "new": 1}


def test_duplicate_ids_within_a_frame_and_across_frames() -> None:
    sequencer = fresh()
    first = sequencer.accept(valid({"type": "t", "id": "a"}, {"type": "t", "id": "a"}),
                             PEER, 1, {})
    assert [e.seq for e in first.stored] == [1]
    assert first.duplicates == [(1, 1)]
    sequencer.commit(first)
    second = sequencer.accept(valid({"type": "t", "id": "b"}, {"type": "t", "id": "a"}),
                              PEER, 1, {})
    assert [(e.seq, e.id) for e in second.stored] == [(2, "b")]
    assert second.duplicates == [(1, 1)]


def test_duplicate_answered_from_the_database_lookup() -> None:
    sequencer = fresh(last_seq=500)
    result = sequencer.accept(valid({"type": "t", "id": "old"}, {"type": "t", "id": "new"}),
                              PEER, 1, {"old": 17})
    assert result.duplicates == [(0, 17)]
    assert [(e.seq, e.id) for e in result.stored] == [(501, "new")]


def test_pending_lookups_only_for_ids_the_filter_cannot_rule_out() -> None:
    sequencer = fresh()
    assert sequencer.pending_lookups(valid({"type": "t", "id": "x"}, {"type": "t"})) == []
    accepted = sequencer.accept(valid({"type": "t", "id": "x"}), PEER, 1, {})
    sequencer.commit(accepted)
    # In the recent window: answered without the database.
    assert sequencer.pending_lookups(valid({"type": "t", "id": "x"})) == []
    # A stored id outside the window (e.g. after a restart) is in the filter only.
    sequencer.id_filter.add(id_hash("stored-long-ago"))
    assert sequencer.pending_lookups(valid({"type": "t", "id": "stored-long-ago"},
                                           {"type": "t", "id": "brand-new"})) == [
        "stored-long-ago"]


def test_undo_restores_seq_streams_and_ids() -> None:
    sequencer = fresh(last_seq=10, streams={"s": 2})
    kept = sequencer.accept(valid({"type": "t", "id": "kept", "stream": "s"}), PEER, 1, {})
    sequencer.commit(kept)
    failed = sequencer.accept(valid({"type": "t", "id": "lost", "stream": "s"},
                                    {"type": "t", "id": "lost2", "stream": "brand"}), PEER, 1, {})
    assert sequencer.last_seq == 13
    sequencer.undo(failed)
    assert sequencer.last_seq == 11
    assert sequencer.streams == {"s": 3}
    again = sequencer.accept(valid({"type": "t", "id": "lost", "stream": "s"},
                                   {"type": "t", "id": "kept"}), PEER, 1, {})
    assert [(e.seq, e.id, e.stream_seq) for e in again.stored] == [(12, "lost", 4)]
    assert again.duplicates == [(1, 11)]


def test_trim_keeps_a_window_of_committed_ids() -> None:
    sequencer = fresh(recent_limit=4)
    for i in range(10):
        sequencer.commit(sequencer.accept(valid({"type": "t", "id": f"i{i}"}), PEER, 1, {}))
    sequencer.trim(committed_seq=5)  # only committed ids may leave
    assert set(sequencer._recent) == {f"i{i}" for i in range(5, 10)}
    assert sequencer.evicted_through == 5
    sequencer.trim(committed_seq=10)
    assert set(sequencer._recent) == {f"i{i}" for i in range(6, 10)}
    assert sequencer.evicted_through == 6
    # Evicted ids are still in the filter, so the database is asked about them.
    assert sequencer.pending_lookups(valid({"type": "t", "id": "i0"})) == ["i0"]


def test_restore_takes_in_replayed_events() -> None:
    source = fresh()
    events = source.accept(valid({"type": "t", "id": "r1", "stream": "s"},
                                 {"type": "t", "id": "r2", "stream": "s"}), PEER, 1, {}).stored
    target = fresh()
    for event in events:
        target.restore(event)
    assert target.last_seq == 2
    assert target.streams == {"s": 2}
    again = target.accept(valid({"type": "t", "id": "r2"}, {"type": "t", "stream": "s"}),
                          PEER, 1, {})
    assert again.duplicates == [(0, 2)]
    assert [(e.seq, e.stream_seq) for e in again.stored] == [(3, 3)]
