"""Journal replay at start: every journaled event past the commit checkpoint goes to the
writer again, with the seq and stream_seq it was first given, before the daemon is ready.

Damaged journal bytes become one dead letter per seq they stood for, in seq order, so the
checkpoint never passes an event that is not stored. Past a long replay's first 100,000
events the store's secondary indexes are set aside and built again at the end.
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

from auditd.errors import StoreError
from auditd.ingest.sequencer import Sequencer
from auditd.journal.journal import CorruptRange, Journal
from auditd.ring import RingBuffer
from auditd.schema import id_hash, stored_decoder
from auditd.stats import Stats
from auditd.store.store import DeadLetter, Store
from auditd.store.writer import Gap, Pending, Writer
from auditd.systemd import StartProgress

log = structlog.get_logger("auditd.replay")

# Past this many replayed events, and half the events already stored, the replay goes on
# without the secondary indexes and builds them at the end (migrations.deferred): below
# it, building them costs about what it saves.
_SET_INDEXES_ASIDE_AFTER = 100_000
_YIELD_EVERY = 1000  # replayed events between turns the replay gives the event loop


class JournalReplay:
    def __init__(self, journal: Journal, ring: RingBuffer[Pending], writer: Writer,
                 store: Store, sequencer: Sequencer, stats: Stats,
                 progress: StartProgress, stored_events: int) -> None:
        self.journal, self.ring, self.writer, self.store = journal, ring, writer, store
        self.sequencer, self.stats, self.progress = sequencer, stats, progress
        self.stored_events = stored_events
        self.from_seq = 0  # the checkpoint the replay starts after
        self.indexes_aside = False  # True until the indexes set aside are built again
        self._space = asyncio.Event()  # set after each commit: room in the ring

    def room_made(self) -> None:
        """The writer committed: the ring may have room again."""
        self._space.set()

    async def run(self, committed_seq: int) -> None:
        """Feed journaled events past `committed_seq` to the writer, as first sequenced."""
        started, replayed, stats = time.monotonic(), 0, self.stats
        chunk = max(1, self.ring.capacity // 2)
        set_aside_at = max(_SET_INDEXES_ASIDE_AFTER, self.stored_events // 2)
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
            if replayed == set_aside_at:
                await self._set_indexes_aside(replayed)
            if not replayed % _YIELD_EVERY:
                # _push suspends only on a full ring: without this, filling it held the
                # loop for seconds, and the status server and the start timeout's
                # extender with it.
                await asyncio.sleep(0)
                if not replayed % 100_000:
                    log.info("replay_progress", events=replayed, seq=event.seq)
                    self.writer.wake()
        if self.indexes_aside:
            self.progress.begin("committing the replay", self._status)
            await self._wait_for_writer(lambda: not self.ring.pending)  # all committed
            self.progress.begin("building the indexes set aside for the replay")
            await self.build_indexes()
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

    async def build_indexes(self) -> None:
        """Build the indexes set aside (maintenance retries a build that failed)."""
        started = time.monotonic()
        try:
            names = await self.store.build_indexes(self.progress.tick)
        except StoreError as exc:
            log.error("index_build_failed", error=str(exc),
                      note="retried by maintenance; queries are slow until it succeeds")
            return
        self.indexes_aside = False
        log.info("indexes_built", indexes=names, seconds=round(time.monotonic() - started, 3))

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

    async def _set_indexes_aside(self, replayed: int) -> None:
        try:
            names = await self.store.set_indexes_aside()
        except StoreError as exc:  # only slower without it
            log.warning("indexes_not_set_aside", error=str(exc))
            return
        self.indexes_aside = True
        log.info("indexes_set_aside", indexes=names, replayed=replayed,
                 note="built again once the replay is committed")

    def _gaps(self, first: int, last: int, raw: bytes, why: str) -> list[Pending]:
        """One dead letter per seq the bytes stood for; the bytes go with the first."""
        reason = f"{why}; they stood for seq {first}..{last}"
        gaps: list[Pending] = [
            Gap(seq, DeadLetter("journal", "journal_corrupt", reason,
                                raw if seq == first else b"", seq))
            for seq in range(first, last + 1)]
        self.stats.dead_lettered("journal_corrupt", len(gaps))
        return gaps
