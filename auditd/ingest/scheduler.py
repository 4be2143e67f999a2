"""FrameScheduler: every connection's queued frames run here, the least-served uid first.

Connections only queue what they read; the scheduler handles the frames, one at a time,
in slices of the event loop's time. Between two slices the loop goes round, so every
socket is read again before more of anyone's frames run. Within a slice the next frame
is always one of the uid that has used the least of the loop (LoopShares: virtual
time, and no credit for idling), and the connections of one uid take turns.

Why not let each connection handle its frames as it reads them (as before 2026-12-02):
the loop then handled every readable socket in one iteration, and a flooding uid's
four connections, each given a short turn but never less than one 100-event frame
(~3 ms), held the loop ~20 ms per iteration. A polite writer's socket was read once
per iteration: its one-event frames waited 16 ms at the median, however fair the
turns were among the uids whose frames had been read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

from auditd.ingest.fairness import LoopShares

# How long one slice runs frames before the loop polls the sockets again. A frame is
# never cut short, so a slice may overrun by one frame (a 1,000-event frame: ~30 ms).
_SLICE_S = 0.002


class Runnable(Protocol):
    """What the scheduler needs of a connection."""

    @property
    def uid(self) -> int: ...

    def run_one(self) -> bool:
        """Handle the first queued frame; whether there is more to run right away."""
        ...

    def settle(self) -> None:
        """After a slice: write the replies that are ready, read again if it may."""
        ...


class FrameScheduler:
    """Invariant: `_ready[uid]` holds the uid's connections that asked to run (want())
    and have not since been found with nothing to run; a connection is in at most one
    queue, and uids with none have no key. LoopShares.waiting counts those uids."""

    def __init__(self, shares: LoopShares, slice_s: float = _SLICE_S) -> None:
        self.shares = shares
        self.slice_s = slice_s
        self._ready: dict[int, deque[Runnable]] = {}
        self._queued: set[Runnable] = set()
        self._handle: asyncio.Handle | None = None

    def want(self, conn: Runnable) -> None:
        """`conn` has frames and nothing holds it: run them in the next slice."""
        if conn in self._queued:
            return
        self._queued.add(conn)
        uid = conn.uid
        queue = self._ready.get(uid)
        if queue is None:
            queue = self._ready[uid] = deque()
            self.shares.start_waiting(uid)
        queue.append(conn)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._run_slice)

    def _run_slice(self) -> None:
        self._handle = None
        ready, shares = self._ready, self.shares
        now = time.perf_counter()
        deadline = now + self.slice_s
        touched: set[Runnable] = set()
        while ready and now < deadline:
            uid = shares.least_served(ready)
            queue = ready[uid]
            conn = queue.popleft()
            touched.add(conn)
            more = conn.run_one()
            later = time.perf_counter()
            shares.charge(uid, later - now)
            now = later
            if more:
                queue.append(conn)  # the uid's other connections go next
            else:
                # Done for now: its replies go out at once, not after the rest of the
                # slice (a polite writer's one frame would wait up to a slice for them).
                self._queued.discard(conn)
                touched.discard(conn)
                conn.settle()
            if not queue:
                del ready[uid]
                shares.stop_waiting(uid)
        for conn in touched:
            conn.settle()
        if ready and self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._run_slice)
