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

Each batch (query/batches.py) encodes its JSON lines once, on first read, and
remembers what each selector picks of it, so a hundred followers with the same
filters cost one match and one encoding per event.

A subscription carries every seq after `start_seq`, the last seq committed when it
was made: a follower reads the store up to start_seq first (subscribe, then read),
and drops any seq it has already written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from auditd.query.batches import EVERY_EVENT, CommittedBatch, Selector
from auditd.schema import StoredEvent
from auditd.stats import LATENCY_BUCKETS_MS, Histogram

SLOW_READER = "slow_reader"
DAEMON_STOPPING = "daemon_stopping"
# Between two writes to one follower, at least this long per follower connected (at
# most _GAP_MOST_S): with many followers each batch would wake every one of them, and
# the loop's time would go to wake-ups; this keeps them to about 2,000/s in all. One
# follower (tail -f) is never held back (a gap under a millisecond is not slept).
_GAP_PER_FOLLOWER_S = 0.0005
_GAP_MOST_S = 0.05


class FeedRefused(Exception):
    """No new follower now (too many, or the daemon is stopping); str() says which."""


class Subscription:
    """One follower's cursor into the feed. Made by CommitFeed.subscribe."""

    def __init__(self, feed: CommitFeed, selector: Selector) -> None:
        self.feed = feed
        self.selector = selector
        self.start_seq = feed.last_seq
        self.covered_seq = feed.last_seq  # every seq up to here has been taken or skipped
        self._ordinal = feed.next_ordinal  # the batch read next
        # When the oldest batch of the last take() was published (time.monotonic()):
        # the follower observes commit -> write with it, then clears it.
        self.oldest_taken: float | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None

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
        return feed.events_total - batch.first_index

    @property
    def lag_bytes(self) -> int:
        feed = self.feed
        batch = feed.batch_at(self._ordinal)
        return 0 if batch is None else feed.bytes_total - batch.bytes_before

    @property
    def ready(self) -> bool:
        """Whether take() has something (or the subscription has ended)."""
        return self._ordinal < self.feed.next_ordinal or self.ended.done()

    def take(self, max_bytes: int) -> list[bytes]:
        """The selected lines of the next batches, a piece per batch (one bytes object
        shared by every follower of the selector), until about `max_bytes` are taken;
        covered_seq moves past those batches. A batch is never split: a follower's
        buffer may hold one batch beyond `max_bytes`."""
        feed, pieces, room = self.feed, [], max_bytes
        while room > 0 and not self.ended.done():
            batch = feed.batch_at(self._ordinal)
            if batch is None:
                break
            chosen = batch.selection(self.selector)
            if chosen.size:
                pieces.append(chosen.blob())
                room -= chosen.size
                if self.oldest_taken is None:
                    self.oldest_taken = batch.published_at
            self._ordinal += 1
            self.covered_seq = batch.last_seq
        return pieces

    async def wait(self, seconds: float) -> None:
        """Until take() has something, the subscription ends, or `seconds` pass."""
        if self.ready:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    def passed(self, batch: CommittedBatch) -> None:
        """The feed skipped `batch` for this follower: nothing in it is selected."""
        self._ordinal += 1
        self.covered_seq = batch.last_seq

    def wake(self) -> None:
        if self._waiter is not None:
            _wake(self._waiter)

    def close(self) -> None:
        self.feed.unsubscribe(self)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        self.sessions = 0  # followers connected, live or still reading the store
        self.cut: dict[str, int] = {SLOW_READER: 0, DAEMON_STOPPING: 0}
        self.served = 0  # followers served since start
        # commit -> lines handed to the follower's socket, per write
        self.delivery_ms = Histogram(LATENCY_BUCKETS_MS)
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
        # Only a cursor behind the previous batch can be over the bound: a cursor at the
        # new batch lags by that batch alone, and is cut only if the batch is too big.
        behind = self.next_ordinal - 2
        over = [s for s in self._subscriptions
                if (s.ordinal <= behind or len(events) > self.max_lag_events
                    or batch.size > self.max_lag_bytes)
                and (s.lag_events > self.max_lag_events or s.lag_bytes > self.max_lag_bytes)]
        for subscription in over:
            self._end(subscription, SLOW_READER)
        self._trim()
        newest = self.next_ordinal - 1
        for subscription in self._subscriptions:
            # An idle follower with nothing in this batch is moved past it here rather
            # than woken for nothing: a hundred followers of rare events sleep on.
            if subscription.waiting and subscription.ordinal == newest \
                    and batch.selects_none(subscription.selector):
                subscription.passed(batch)
            else:
                subscription.wake()

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

    def subscribe(self, selector: Selector = EVERY_EVENT) -> Subscription:
        if self.closed:
            raise FeedRefused("the daemon is stopping")
        subscription = Subscription(self, selector)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            self._trim()
        if not subscription.ended.done():
            subscription.ended.set_result("closed")
        subscription.wake()

    def batch_at(self, ordinal: int) -> CommittedBatch | None:
        index = ordinal - self._first_ordinal
        return self._log[index] if 0 <= index < len(self._log) else None

    def write_gap(self) -> float:
        """The least time between two writes to one follower, now."""
        return min(_GAP_MOST_S, self.sessions * _GAP_PER_FOLLOWER_S)

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
                "delivery_ms": dict(self.delivery_ms.percentiles(),
                                    count=self.delivery_ms.count),
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
        subscription.wake()

    def _trim(self) -> None:
        """Let go of the batches every subscription has read."""
        keep = min((s.ordinal for s in self._subscriptions), default=self.next_ordinal)
        while self._log and self._first_ordinal < keep:
            self._log.popleft()
            self._first_ordinal += 1
        if not self._log:
            self._first_ordinal = self.next_ordinal
