"""FrameScheduler: frames run in slices, least-served uid first, a uid's connections in turn."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from auditd.ingest.fairness import LoopShares
from auditd.ingest.scheduler import FrameScheduler


class FakeConnection:
    """A connection's side of the protocol: queued frames that each cost `cost_s`."""

    def __init__(self, uid: int, frames: int, cost_s: float, log: list[str],
                 name: str) -> None:
        self.uid = uid
        self.frames = deque(range(frames))
        self.cost_s = cost_s
        self.log = log
        self.name = name
        self.held = False
        self.settled = 0

    def run_one(self) -> bool:
        if self.frames and not self.held:
            self.frames.popleft()
            self.log.append(self.name)
            end = time.perf_counter() + self.cost_s
            while time.perf_counter() < end:
                pass
        return bool(self.frames) and not self.held

    def settle(self) -> None:
        self.settled += 1
        self.log.append(f"{self.name}:settled")


def test_a_polite_uid_goes_before_a_flood_that_has_used_the_loop() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        scheduler = FrameScheduler(LoopShares(), slice_s=0.005)
        flood = [FakeConnection(0, 20, 0.001, log, f"f{i}") for i in range(2)]
        for conn in flood:
            scheduler.want(conn)
        await asyncio.sleep(0)  # one slice of flood frames
        polite = FakeConnection(1, 3, 0.0, log, "p")
        scheduler.want(polite)
        for _ in range(10_000):  # loop iterations: each runs one slice
            if not any(c.frames for c in [*flood, polite]):
                break
            await asyncio.sleep(0)
        return log

    log = [entry for entry in asyncio.run(main()) if not entry.endswith(":settled")]
    first_polite = log.index("p")
    # Its first frame runs as soon as the next slice starts, its three back to back
    # (it is brought up to the flood's virtual time, then uses almost none of it).
    assert log[first_polite:first_polite + 3] == ["p", "p", "p"]
    # It waited for one slice (~5 of the flood's frames; fewer on a busy machine, never
    # more), not for a flood frame after it: it came in one credit behind the flood.
    assert first_polite <= 6
    # The flood's two connections took turns.
    flood_order = [name for name in log if name != "p"]
    assert flood_order[:6] == ["f0", "f1", "f0", "f1", "f0", "f1"]


def test_a_slice_ends_after_its_time_and_the_loop_goes_round() -> None:
    async def main() -> tuple[int, int, int]:
        log: list[str] = []
        scheduler = FrameScheduler(LoopShares(), slice_s=0.005)
        conn = FakeConnection(0, 300, 0.001, log, "f")
        scheduler.want(conn)
        ticks = 0
        while conn.frames:
            await asyncio.sleep(0)
            ticks += 1
        return len([e for e in log if e == "f"]), ticks, conn.settled

    frames, ticks, settled = asyncio.run(main())
    assert frames == 300
    assert ticks >= 300 // 6  # at most ~5-6 frames a slice: the loop went round between
    assert settled >= ticks - 1  # settled (replies written) after every slice


def test_a_held_connection_leaves_the_queue_and_comes_back_when_wanted() -> None:
    async def main() -> FakeConnection:
        log: list[str] = []
        scheduler = FrameScheduler(LoopShares(), slice_s=0.05)
        conn = FakeConnection(0, 5, 0.0, log, "c")
        conn.held = True
        scheduler.want(conn)
        await asyncio.sleep(0)
        assert len(conn.frames) == 5 and scheduler.shares.waiting == {}
        conn.held = False
        scheduler.want(conn)
        await asyncio.sleep(0)
        return conn

    conn = asyncio.run(main())
    assert not conn.frames


def test_a_connection_with_nothing_left_to_run_has_its_replies_written_at_once() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        scheduler = FrameScheduler(LoopShares(), slice_s=0.05)
        flood = FakeConnection(0, 10, 0.001, log, "f")
        polite = FakeConnection(1, 1, 0.0, log, "p")
        scheduler.want(flood)
        scheduler.want(polite)
        for _ in range(1000):  # loop iterations: each runs one slice
            if not flood.frames:
                break
            await asyncio.sleep(0)
        return log

    log = asyncio.run(main())
    # Its reply does not wait for the rest of the slice's flood frames.
    assert log.index("p:settled") == log.index("p") + 1
    assert log.index("p:settled") < log.index("f", log.index("p"))
