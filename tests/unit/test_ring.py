"""RingBuffer: pending vs. recently committed, correlation index, eviction, both bounds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from auditd.ring import RingBuffer


@dataclass(frozen=True)
class Item:
    seq: int
    correlation_id: str | None = None


def items(first: int, last: int, correlation: str | None = None) -> list[Item]:
    return [Item(s, correlation) for s in range(first, last + 1)]


def seqs(entries: list[Item]) -> list[int]:
    return [e.seq for e in entries]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer[Item](0, 100)


def test_empty_ring() -> None:
    ring = RingBuffer[Item](8, 1000)
    assert ring.pending == 0
    assert ring.free == 8
    assert ring.pending_bytes == 0
    assert ring.peek_pending(10) == []
    assert ring.recent(10) == []
    assert ring.by_correlation("c") == []
    assert ring.oldest_retained_seq() is None
    assert ring.oldest_pending() is None
    assert ring.below_low_water()


def test_push_peek_commit_moves_entries_from_pending_to_recent() -> None:
    ring = RingBuffer[Item](8, 1000)
    ring.push(items(1, 5), [10] * 5)
    assert ring.pending == 5 and ring.free == 3 and ring.pending_bytes == 50
    assert seqs(ring.peek_pending(3)) == [1, 2, 3]
    assert seqs(ring.peek_pending(100)) == [1, 2, 3, 4, 5]
    assert ring.pending == 5  # peeking takes nothing
    assert ring.recent(10) == []  # nothing committed yet
    ring.mark_committed(3)
    assert ring.pending == 2 and ring.free == 6 and ring.pending_bytes == 20
    assert seqs(ring.recent(10)) == [1, 2, 3]
    assert seqs(ring.recent(2)) == [2, 3]
    assert seqs(ring.peek_pending(10)) == [4, 5]
    oldest = ring.oldest_pending()
    assert oldest is not None and oldest.seq == 4
    assert ring.oldest_retained_seq() == 1


def test_cannot_commit_more_than_pending() -> None:
    ring = RingBuffer[Item](4, 1000)
    ring.push(items(1, 2), [1, 1])
    with pytest.raises(ValueError, match="more than is pending"):
        ring.mark_committed(3)
    assert ring.pending == 2


def test_pending_entries_are_never_overwritten() -> None:
    ring = RingBuffer[Item](4, 1000)
    ring.push(items(1, 4), [1] * 4)
    assert ring.free == 0
    assert not ring.has_room(1, 1)
    with pytest.raises(OverflowError, match="full"):
        ring.push(items(5, 5), [1])
    assert seqs(ring.peek_pending(10)) == [1, 2, 3, 4]


def test_recent_window_is_evicted_oldest_first_as_new_entries_arrive() -> None:
    ring = RingBuffer[Item](4, 1000)
    ring.push(items(1, 4), [1] * 4)
    ring.mark_committed(4)
    assert seqs(ring.recent(10)) == [1, 2, 3, 4]
    ring.push(items(5, 6), [1, 1])  # overwrites 1 and 2
    assert ring.oldest_retained_seq() == 3
    assert seqs(ring.recent(10)) == [3, 4]
    assert seqs(ring.peek_pending(10)) == [5, 6]
    ring.mark_committed(2)
    assert seqs(ring.recent(10)) == [3, 4, 5, 6]
    # Wrap around many times: the window is always the last `capacity` committed.
    for first in range(7, 100, 3):
        ring.push(items(first, first + 2), [1] * 3)
        ring.mark_committed(3)
    assert seqs(ring.recent(100)) == [96, 97, 98, 99]
    assert seqs(ring.recent(1)) == [99]
    assert ring.pending == 0 and ring.pending_bytes == 0


def test_by_correlation_spans_committed_and_pending_and_forgets_evicted() -> None:
    ring = RingBuffer[Item](4, 1000)
    ring.push([Item(1, "a"), Item(2, "b"), Item(3, "a")], [1] * 3)
    ring.mark_committed(2)
    ring.push([Item(4, "a")], [1])
    assert seqs(ring.by_correlation("a")) == [1, 3, 4]  # committed and pending
    assert seqs(ring.by_correlation("b")) == [2]
    assert ring.by_correlation("zzz") == []
    ring.mark_committed(2)
    ring.push([Item(5, None), Item(6, "b")], [1, 1])  # evicts 1 (a) and 2 (b)
    assert seqs(ring.by_correlation("a")) == [3, 4]
    assert seqs(ring.by_correlation("b")) == [6]
    ring.mark_committed(2)
    ring.push([Item(7), Item(8)], [1, 1])  # evicts 3 and 4: "a" is gone
    assert ring.by_correlation("a") == []
    assert "a" not in ring._by_correlation  # no empty index entries left behind


def test_has_room_counts_free_slots() -> None:
    ring = RingBuffer[Item](8, 10_000)
    assert ring.has_room(8, 80)
    assert not ring.has_room(9, 90)
    ring.push(items(1, 6), [10] * 6)
    assert ring.has_room(2, 20)
    assert not ring.has_room(3, 30)
    ring.mark_committed(6)  # committed entries do not take room
    assert ring.has_room(8, 80)


def test_has_room_respects_max_bytes_but_always_admits_into_an_empty_ring() -> None:
    ring = RingBuffer[Item](100, 1000)
    assert ring.has_room(1, 5000)  # larger than max_bytes, but the ring is empty
    ring.push(items(1, 1), [600])
    assert ring.has_room(1, 400)
    assert not ring.has_room(1, 401)
    ring.push(items(2, 2), [400])
    assert ring.pending_bytes == 1000
    assert not ring.has_room(1, 1)
    ring.mark_committed(1)
    assert ring.pending_bytes == 400
    assert ring.has_room(1, 600)


def test_low_water_mark_is_three_quarters_of_both_bounds() -> None:
    ring = RingBuffer[Item](8, 1000)
    ring.push(items(1, 7), [1] * 7)
    assert not ring.below_low_water()
    ring.mark_committed(1)  # 6 pending = 3/4 of 8
    assert ring.below_low_water()
    big = RingBuffer[Item](100, 1000)
    big.push(items(1, 2), [500, 300])
    assert not big.below_low_water()  # 800 bytes > 750
    big.mark_committed(1)
    assert big.below_low_water()


def test_full_ring_answers_recent_and_correlation() -> None:
    # How fast (the bar is < 1 ms a call) is measured by `auditd bench --ring`.
    ring = RingBuffer[Item](10_000, 1 << 30)
    ring.push([Item(s, f"c{s % 100}") for s in range(1, 10_001)], [100] * 10_000)
    ring.mark_committed(10_000)
    assert seqs(ring.recent(100)) == list(range(9901, 10_001))
    assert seqs(ring.by_correlation("c7")) == list(range(7, 10_001, 100))


def test_recent_window_is_bounded_by_bytes_as_well_as_slots() -> None:
    ring = RingBuffer[Item](100, 10_000, window_bytes=250)
    ring.push(items(1, 10), [100] * 10)
    ring.mark_committed(10)  # 1,000 bytes committed: only the newest 250 stay
    assert seqs(ring.recent(100)) == [9, 10]
    assert ring.window_size == 200
    assert ring.oldest_retained_seq() == 9
    ring.push(items(11, 11, "c"), [300])  # pending bytes never count against the window
    assert ring.pending_bytes == 300
    ring.mark_committed(1)  # a window of one oversized entry holds nothing older
    assert seqs(ring.recent(100)) == []
    assert ring.window_size == 0
    assert ring.by_correlation("c") == []


def test_recent_window_bytes_default_to_an_eighth_of_max_bytes() -> None:
    assert RingBuffer[Item](8, 8000).window_bytes == 1000


def test_a_big_commit_evicts_a_bounded_step_and_the_pushes_after_it_the_rest() -> None:
    """The loop never pays for thousands of evictions at once, and the window still
    comes back within its bytes however big the frames are."""
    ring = RingBuffer[Item](20_000, 10**9, window_bytes=1_000)
    ring.push(items(1, 5_000, "c"), [10] * 5_000)
    ring.mark_committed(5_000)
    assert ring.window_size == 50_000 - 512 * 10  # one step only
    for first in range(5_001, 15_001, 1_000):  # frames as big as a commit, committed
        ring.push(items(first, first + 999, "c"), [10] * 1_000)
        ring.mark_committed(1_000)
    assert ring.window_size <= 1_000 + 1_000 * 10
    ring.push(items(15_001, 15_001, "c"), [10])
    assert ring.window_size <= 1_000
    assert next(e.seq for e in ring.by_correlation("c")) == ring.oldest_retained_seq()
