"""CommitFeed: committed events offered to followers, in seq order, with bounded memory.

The writer calls `publish(batch)` on the event loop after each commit (the ring has
just marked the batch committed); it never waits, whatever the followers do. The
feed keeps one shared log of the batches some follower has not read yet; each
`Subscription` is a cursor into it. A follower whose cursor falls more than
`max_lag_events` events or `max_lag_bytes` bytes behind the newest commit is cut
there and then ("slow_reader"): its cursor leaves the log, which is trimmed to the
slowest remaining cursor, so the log never holds more than one lag bound whatever
the number of followers or how they read. Dead letters (the writer's gaps) are never
offered; their seqs still count as covered.

Each batch encodes its JSON lines once, on first read, and remembers which of its
events a predicate selects under the predicate's key, so a hundred followers with
the same filters cost one match and one encoding per event.

A subscription carries every seq after `start_seq`, the last seq committed when it
was made: a follower reads the store up to start_seq first (subscribe, then read),
and drops any seq it has already written.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from auditd.query.lines import event_line
from auditd.schema import StoredEvent

Predicate = Callable[[StoredEvent], bool]
SLOW_READER = "slow_reader"
DAEMON_STOPPING = "daemon_stopping"
# What an event is assumed to take beyond its data and tags, for the byte bound: the
# Python object, its strings and its JSON line.
_EVENT_OVERHEAD = 600


class FeedRefused(Exception):
    """No new follower now (too many, or the daemon is stopping); str() says which."""


def event_bytes(event: StoredEvent) -> int:
    return _EVENT_OVERHEAD + len(event.data or b"") + len(event.tags or b"")


class CommittedBatch:
    """One commit's events, as followers read them; lines are encoded on first read."""

    __slots__ = ("_lines", "_selections", "bytes_before", "events", "first_index",
                 "last_seq", "size")

    def __init__(self, events: list[StoredEvent], last_seq: int, first_index: int,
                 bytes_before: int) -> None:
        self.events = events
        self.last_seq = last_seq  # covered through here, dead letters included
        self.first_index = first_index  # events published before this batch
        self.bytes_before = bytes_before
        self.size = sum(event_bytes(event) for event in events)
        self._lines: list[bytes | None] | None = None
        self._selections: dict[Hashable, list[int]] = {}

    def line(self, offset: int) -> bytes:
        lines = self._lines
        if lines is None:
            lines = self._lines = [None] * len(self.events)
        line = lines[offset]
        if line is None:
            line = lines[offset] = event_line(self.events[offset])
        return line

    def selection(self, key: Hashable, predicate: Predicate | None) -> Sequence[int]:
        """Offsets of the events `predicate` selects (every one when None), cached."""
        if predicate is None:
            return range(len(self.events))
        chosen = self._selections.get(key)
        if chosen is None:
            chosen = self._selections[key] = [
                offset for offset, event in enumerate(self.events) if predicate(event)]
        return chosen


class Subscription:
    """One follower's cursor into the feed. Made by CommitFeed.subscribe."""

    def __init__(self, feed: CommitFeed, key: Hashable, predicate: Predicate | None) -> None:
        self.feed = feed
        self.key = key
        self.predicate = predicate
        self.start_seq = feed.last_seq
        self.covered_seq = feed.last_seq  # every seq up to here has been taken or skipped
        self._ordinal = feed.next_ordinal  # the batch read next
        self._offset = 0  # within it
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def ordinal(self) -> int:
        """The batch this subscription reads next."""
        return self._ordinal

    @property
    def lag_events(self) -> int:
        feed = self.feed
        batch = feed.batch_at(self._ordinal)
        if batch is None:
            return 0
        return feed.events_total - batch.first_index - self._offset

    @property
    def lag_bytes(self) -> int:
        feed = self.feed
        batch = feed.batch_at(self._ordinal)
        return 0 if batch is None else feed.bytes_total - batch.bytes_before

    @property
    def ready(self) -> bool:
        """Whether take() has something (or the subscription has ended)."""
        return self._ordinal < self.feed.next_ordinal or self.ended.done()

    def take(self, max_bytes: int) -> list[tuple[int, bytes]]:
        """The next selected events' (seq, line), up to about `max_bytes` (at least one
        line when there is one); advances the cursor and covered_seq past them."""
        feed, taken, size = self.feed, [], 0
        while size < max_bytes and not self.ended.done():
            batch = feed.batch_at(self._ordinal)
            if batch is None:
                break
            chosen = batch.selection(self.key, self.predicate)
            at = bisect.bisect_left(chosen, self._offset)
            while at < len(chosen) and size < max_bytes:
                offset = chosen[at]
                line = batch.line(offset)
                taken.append((batch.events[offset].seq, line))
                size += len(line)
                at += 1
                self._offset = offset + 1
            if at < len(chosen):
                self.covered_seq = taken[-1][0]
                break
            self._ordinal += 1
            self._offset = 0
            self.covered_seq = batch.last_seq
        return taken

    async def wait(self, seconds: float) -> None:
        """Until take() has something, the subscription ends, or `seconds` pass."""
        if self.ready:
            return
        arrived = self.feed.arrival()
        await asyncio.wait((arrived, self.ended), timeout=seconds,
                           return_when=asyncio.FIRST_COMPLETED)

    def close(self) -> None:
        self.feed.unsubscribe(self)


class CommitFeed:
    def __init__(self, *, max_lag_events: int = 20_000, max_lag_bytes: int = 32 << 20,
                 max_followers: int = 256) -> None:
        self.max_lag_events = max_lag_events
        self.max_lag_bytes = max_lag_bytes
        self.max_followers = max_followers
        self.last_seq = 0  # the last seq committed (set by the daemon at start)
        self.events_total = 0  # events published while someone subscribed
        self.bytes_total = 0
        self.next_ordinal = 0  # ordinal of the next batch published
        self._log: deque[CommittedBatch] = deque()
        self._first_ordinal = 0  # ordinal of _log[0]
        self._subscriptions: set[Subscription] = set()
        self._arrived: asyncio.Future[None] | None = None
        self.sessions = 0  # followers connected, live or still reading the store
        self.cut: dict[str, int] = {SLOW_READER: 0, DAEMON_STOPPING: 0}
        self.served = 0  # followers served since start
        self.closed = False
        self._stopped: asyncio.Future[str] | None = None
        self._idle: asyncio.Event | None = None

    # -- the writer's side ---------------------------------------------------------

    def publish(self, entries: Sequence[object]) -> None:
        """A committed batch, in seq order; never blocks. Non-events (gaps) are skipped."""
        if not entries:
            return
        last_seq = getattr(entries[-1], "seq", self.last_seq)
        self.last_seq = max(self.last_seq, last_seq)
        if not self._subscriptions:
            self.next_ordinal += 1
            self._first_ordinal = self.next_ordinal
            return
        events = [entry for entry in entries if isinstance(entry, StoredEvent)]
        batch = CommittedBatch(events, last_seq, self.events_total, self.bytes_total)
        self._log.append(batch)
        self.next_ordinal += 1
        self.events_total += len(events)
        self.bytes_total += batch.size
        for subscription in [s for s in self._subscriptions
                             if s.lag_events > self.max_lag_events
                             or s.lag_bytes > self.max_lag_bytes]:
            self._end(subscription, SLOW_READER)
        self._trim()
        arrived, self._arrived = self._arrived, None
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    # -- the followers' side -------------------------------------------------------

    def open_session(self) -> None:
        """Count one more follower; FeedRefused when stopping or at max_followers."""
        if self.closed:
            raise FeedRefused("the daemon is stopping")
        if self.sessions >= self.max_followers:
            raise FeedRefused(f"{self.sessions} followers already, the most there may be")
        self.sessions += 1
        self.served += 1

    def close_session(self) -> None:
        self.sessions -= 1
        if self.sessions == 0 and self._idle is not None:
            self._idle.set()

    def subscribe(self, key: Hashable, predicate: Predicate | None) -> Subscription:
        if self.closed:
            raise FeedRefused("the daemon is stopping")
        subscription = Subscription(self, key, predicate)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            self._trim()
        if not subscription.ended.done():
            subscription.ended.set_result("closed")

    def batch_at(self, ordinal: int) -> CommittedBatch | None:
        index = ordinal - self._first_ordinal
        return self._log[index] if 0 <= index < len(self._log) else None

    def arrival(self) -> asyncio.Future[None]:
        """Done at the next publish: shared by every follower that waits."""
        if self._arrived is None:
            self._arrived = asyncio.get_running_loop().create_future()
        return self._arrived

    def stopped(self) -> asyncio.Future[str]:
        """Done (with DAEMON_STOPPING) once aclose() begins."""
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
            if self.closed:
                self._stopped.set_result(DAEMON_STOPPING)
        return self._stopped

    # -- stopping --------------------------------------------------------------------

    async def aclose(self, grace_s: float = 2.0) -> None:
        """End every subscription (daemon_stopping) and refuse new ones; wait up to
        `grace_s` for the followers to have written their final lines."""
        self.closed = True
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(DAEMON_STOPPING)
        for subscription in list(self._subscriptions):
            self._end(subscription, DAEMON_STOPPING)
        arrived, self._arrived = self._arrived, None
        if arrived is not None and not arrived.done():
            arrived.set_result(None)
        if self.sessions:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)

    # -- figures ---------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        lags = [s.lag_events for s in self._subscriptions]
        return {"followers": self.sessions, "live": len(self._subscriptions),
                "served": self.served, "cut": dict(self.cut),
                "max_lag_events": max(lags, default=0),
                "held_events": sum(len(b.events) for b in self._log),
                "held_bytes": sum(b.size for b in self._log),
                "bounds": {"lag_events": self.max_lag_events,
                           "lag_bytes": self.max_lag_bytes,
                           "followers": self.max_followers}}

    # -- inside ----------------------------------------------------------------------

    def _end(self, subscription: Subscription, reason: str) -> None:
        self._subscriptions.discard(subscription)
        if not subscription.ended.done():
            subscription.ended.set_result(reason)
            self.cut[reason] = self.cut.get(reason, 0) + 1

    def _trim(self) -> None:
        """Let go of the batches every subscription has read."""
        keep = min((s.ordinal for s in self._subscriptions), default=self.next_ordinal)
        while self._log and self._first_ordinal < keep:
            self._log.popleft()
            self._first_ordinal += 1
        if not self._log:
            self._first_ordinal = self.next_ordinal
