"""Journal replay at start: every journaled event past the commit checkpoint goes to the
writer again, with the seq and stream_seq it was first given, before the daemon is ready.

Damaged journal bytes become one dead letter per seq they stood for, in seq order, so the
checkpoint never passes an event that is not stored. (Before schema 3 a long replay set
the filter indexes aside and built them at the end; the hot table has none left.)
`Stats.replay_total` is the journal's seq range past the checkpoint (exact unless the last
segment is damaged) and `replay_done` the part of it pushed so far, updated at every push;
at the end both are what the replay covered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import structlog

from auditd.ingest.sequencer import Sequencer
from auditd.journal.journal import CorruptRange, Journal
from auditd.ring import RingBuffer
from auditd.schema import id_hash, stored_decoder
from auditd.stats import Stats
from auditd.store.store import DeadLetter, Store
from auditd.store.writer import Gap, Pending, Writer
from auditd.systemd import StartProgress

log = structlog.get_logger("auditd.replay")

_YIELD_EVERY = 1000  # replayed events between turns the replay gives the event loop


class JournalReplay:
    def __init__(self, journal: Journal, ring: RingBuffer[Pending], writer: Writer,
                 store: Store, sequencer: Sequencer, stats: Stats,
                 progress: StartProgress) -> None:
        self.journal, self.ring, self.writer, self.store = journal, ring, writer, store
        self.sequencer, self.stats, self.progress = sequencer, stats, progress
        self.from_seq = 0  # the checkpoint the replay starts after
        self._space = asyncio.Event()  # set after each commit: room in the ring

    def room_made(self) -> None:
        """The writer committed: the ring may have room again."""
        self._space.set()

    async def run(self, committed_seq: int) -> None:
        """Feed journaled events past `committed_seq` to the writer, as first sequenced."""
        started, replayed, stats = time.monotonic(), 0, self.stats
        chunk = max(1, self.ring.capacity // 2)
        self.from_seq = committed_seq
        self.progress.begin("sizing the journal")
        last_on_disk = await asyncio.to_thread(self.journal.last_seq_on_disk)
        stats.replay_total = max(0, last_on_disk - committed_seq)
        self.progress.begin("replaying the journal", self._status)
        await self.writer.catch_up(True)
        for item in self.journal.replay(committed_seq):
            if isinstance(item, CorruptRange):
                gaps = self._gaps(item.first_seq, item.last_seq, item.raw,
                                  f"journal segment {item.segment} offset {item.offset}: "
                                  f"{len(item.raw)} damaged bytes")
                for start in range(0, len(gaps), chunk):
                    await self._push(gaps[start : start + chunk], len(item.raw))
                continue
            try:
                event = stored_decoder.decode(item.payload)
            except msgspec.DecodeError as exc:
                await self._push(self._gaps(item.seq, item.seq, item.payload,
                                            f"journal record cannot be decoded: {exc}"),
                                 len(item.payload))
                continue
            event.id_hash = id_hash(event.id)  # a journal may predate the current key
            await self._push([event], len(item.payload))
            self.sequencer.restore(event)
            replayed += 1
            if not replayed % _YIELD_EVERY:
                # _push suspends only on a full ring: without this, filling it held the
                # loop for seconds, and the status server and the start timeout's
                # extender with it.
                await asyncio.sleep(0)
                if not replayed % 100_000:
                    log.info("replay_progress", events=replayed, seq=event.seq)
                    self.writer.wake()
        await self.writer.catch_up(False)
        self.writer.wake()
        self.sequencer.last_seq = max(self.sequencer.last_seq, self.journal.last_seq)
        stats.replay_total = stats.replay_done
        stats.replay_finished = True
        if replayed:
            log.info("replay_finished", events=replayed, last_seq=self.sequencer.last_seq,
                     seconds=round(time.monotonic() - started, 3))

    def _status(self) -> str:
        """How far the replay got, for systemd's status line."""
        stats = self.stats
        committed = max(0, stats.last_committed_seq - self.from_seq)
        return (f"replaying journal: {stats.replay_done} of {stats.replay_total} events "
                f"({committed} committed)")

    async def _push(self, entries: list[Pending], size: int) -> None:
        """Into the ring in seq order, waiting for the writer to make room."""
        await self._wait_for_writer(lambda: self.ring.has_room(len(entries), size))
        last = entries[-1].seq
        self.sequencer.last_seq = max(self.sequencer.last_seq, last)
        self.ring.push(entries, [size] + [0] * (len(entries) - 1))
        self.stats.replay_done = last - self.from_seq  # per push: one store, no cost

    async def _wait_for_writer(self, until: Callable[[], bool]) -> None:
        """Wake the writer and wait, commit after commit, until `until()` holds."""
        while not until():
            self._space.clear()
            self.writer.wake()
            await self._space.wait()

    def _gaps(self, first: int, last: int, raw: bytes, why: str) -> list[Pending]:
        """One dead letter per seq the bytes stood for; the bytes go with the first."""
        reason = f"{why}; they stood for seq {first}..{last}"
        gaps: list[Pending] = [
            Gap(seq, DeadLetter("journal", "journal_corrupt", reason,
                                raw if seq == first else b"", seq))
            for seq in range(first, last + 1)]
        self.stats.dead_lettered("journal_corrupt", len(gaps))
        return gaps
