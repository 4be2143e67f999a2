"""Fair share between writers, by uid: a token bucket per uid, and shares of the buffer.

Two independent rules decide whether a frame may go in now; neither does I/O or reads
a clock of its own (callers pass `now`, time.monotonic()), so both are unit-tested
without a daemon:

- `RateLimiter` (`ingest.rate_limit`, off by default): a token bucket per uid. A frame
  of n events passes once the bucket holds min(n, burst) tokens and then takes n, so
  the bucket may go into debt: a batch larger than the burst is never refused for
  ever, and the uid's long-run rate is still the configured one.
- `BufferShares`: who holds the buffer's pending events. Only when the buffer is
  *contended* (fewer than `reserve` slots, or reserve bytes, would be left after the
  frame) is a uid above its share held back; below that everyone shares freely, so a
  lone writer can still fill the whole buffer. The share is the capacity divided among
  the uids present (an open connection or a pending event), at least `floor`. A uid
  under its share may take the reserve: a well-behaved uid gets in while another
  floods, even though the flood keeps the buffer all but full.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from auditd.config import RateLimit

_MAX_IDLE_BUCKETS = 4096  # past this many buckets, full ones (= absent ones) are dropped


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """One token bucket per uid, created full on the uid's first frame."""

    def __init__(self, limit: RateLimit | None) -> None:
        self.limit = limit
        self._buckets: dict[int, _Bucket] = {}

    def configure(self, limit: RateLimit | None) -> None:
        """A reload: buckets keep their tokens, cut to the new burst; off forgets them."""
        self.limit = limit
        if limit is None:
            self._buckets.clear()
            return
        for bucket in self._buckets.values():
            bucket.tokens = min(bucket.tokens, limit.burst)

    def wait_s(self, uid: int, count: int, now: float) -> float:
        """0.0 when a frame of `count` events may go in now, else the seconds until it may."""
        limit = self.limit
        if limit is None:
            return 0.0
        tokens = self._refilled(uid, now).tokens
        needed = min(count, limit.burst)
        if tokens >= needed - 1e-6:  # float dust must not leave a frame waiting forever
            return 0.0
        return (needed - tokens) / limit.per_s

    def take(self, uid: int, count: int, now: float) -> None:
        """Spend `count` tokens (the caller saw wait_s() == 0); the bucket may go below 0."""
        if self.limit is not None:
            self._refilled(uid, now).tokens -= count

    def refund(self, uid: int, count: int) -> None:
        """Give back what take() spent on a frame that was not accepted after all."""
        bucket = self._buckets.get(uid)
        if bucket is not None and self.limit is not None:
            bucket.tokens = min(bucket.tokens + count, self.limit.burst)

    def tokens(self, uid: int, now: float) -> float | None:
        """The uid's tokens now (for the figures); None when there is no limit."""
        return None if self.limit is None else self._refilled(uid, now).tokens

    def _refilled(self, uid: int, now: float) -> _Bucket:
        limit = self.limit
        assert limit is not None
        bucket = self._buckets.get(uid)
        if bucket is None:
            if len(self._buckets) >= _MAX_IDLE_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[uid] = _Bucket(float(limit.burst), now)
            return bucket
        if now > bucket.stamp:
            bucket.tokens = min(float(limit.burst),
                                bucket.tokens + (now - bucket.stamp) * limit.per_s)
            bucket.stamp = now
        return bucket

    def _forget_full(self, now: float) -> None:
        assert self.limit is not None
        per_s, burst = self.limit.per_s, self.limit.burst
        full = [uid for uid, b in self._buckets.items()
                if b.tokens + (now - b.stamp) * per_s >= burst]
        for uid in full:
            del self._buckets[uid]


class BufferShares:
    """Pending events by uid, as runs of consecutive seqs in acceptance order.

    Invariant: `pending[uid]` is the number of events of that uid that were accepted
    (admitted()) and whose seq is above the last one reported committed; uids with
    none have no key. `pending` is the caller's Counter (Stats.pending_by_uid), so the
    figures read it directly. `present` counts open connections by uid.
    """

    def __init__(self, capacity: int, max_bytes: int, pending: Counter[int],
                 present: Mapping[int, int]) -> None:
        self.capacity = capacity
        self.reserve = max(1, capacity // 8)
        self.reserve_bytes = max_bytes // 8
        self.max_bytes = max_bytes
        self.floor = max(1, capacity // 16)
        self.pending = pending
        self.present = present
        self._runs: deque[list[int]] = deque()  # [uid, first seq, last seq], seq order

    def admitted(self, uid: int, first_seq: int, last_seq: int) -> None:
        """Events first_seq..last_seq (consecutive) of `uid` entered the buffer."""
        runs = self._runs
        if runs and runs[-1][0] == uid and runs[-1][2] + 1 == first_seq:
            runs[-1][2] = last_seq
        else:
            runs.append([uid, first_seq, last_seq])
        self.pending[uid] += last_seq - first_seq + 1

    def committed(self, through_seq: int) -> None:
        """Every event up to `through_seq` is committed: it no longer counts as pending."""
        runs, pending = self._runs, self.pending
        while runs and runs[0][1] <= through_seq:
            uid, first, last = runs[0]
            done = min(last, through_seq) - first + 1
            left = pending[uid] - done
            if left > 0:
                pending[uid] = left
            else:
                del pending[uid]
            if last <= through_seq:
                runs.popleft()
            else:
                runs[0][1] = through_seq + 1

    def contended(self, free: int, pending_bytes: int, count: int, size: int) -> bool:
        """Whether a frame of `count` events and `size` bytes would eat into the reserve."""
        return (free - count < self.reserve
                or pending_bytes + size > self.max_bytes - self.reserve_bytes)

    def share(self, uid: int) -> int:
        """The events `uid` may hold pending when the buffer is contended."""
        sharing = self.present.keys() | self.pending.keys()
        sharing_count = len(sharing) + (uid not in sharing)
        return max(self.floor, self.capacity // sharing_count)

    def over_share(self, uid: int, count: int) -> int | None:
        """The uid's share when `count` more events would take it past it, else None.

        Call only when contended(): the union of uids it builds is not free.
        """
        share = self.share(uid)
        return share if self.pending.get(uid, 0) + count > share else None


class LoopShares:
    """The event loop's time by uid, shared as fair queuing shares a link.

    Each uid has a virtual time: the loop time its frames have used. The scheduler
    runs a frame of the least-served uid with frames waiting next (least_served()). A
    uid that starts waiting is brought up to `credit_s` behind the least-served one
    already waiting, so idling earns at most that credit; debt is kept. The credit is
    CFS's for a waking task: without it a newcomer tied with a flood, the tie went
    to the flood, and a polite writer's one-event frame waited behind a 100-event
    frame (~3 ms) every time. Invariant: `waiting[uid]` counts the uid's connections
    (or queues) with frames to handle; uids with none have no key.
    """

    def __init__(self, credit_s: float = 0.001) -> None:
        self.credit_s = credit_s
        self.used: dict[int, float] = {}
        self.waiting: Counter[int] = Counter()

    def start_waiting(self, uid: int) -> None:
        waiting, used = self.waiting, self.used
        if not waiting[uid]:
            least = min((used.get(u, 0.0) for u in waiting if u != uid), default=None)
            if least is not None:
                used[uid] = max(used.get(uid, 0.0), least - self.credit_s)
            if len(used) > _MAX_IDLE_BUCKETS:
                for idle in [u for u in used if u not in waiting and u != uid]:
                    del used[idle]
        waiting[uid] += 1

    def stop_waiting(self, uid: int) -> None:
        left = self.waiting[uid] - 1
        if left > 0:
            self.waiting[uid] = left
        else:
            del self.waiting[uid]

    def least_served(self, uids: Iterable[int]) -> int:
        """Of `uids` (not empty), the one whose frames have used the least of the loop."""
        used = self.used
        return min(uids, key=lambda uid: used.get(uid, 0.0))

    def charge(self, uid: int, seconds: float) -> None:
        self.used[uid] = self.used.get(uid, 0.0) + seconds
