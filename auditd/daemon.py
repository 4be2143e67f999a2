"""Wiring: open the store, replay the journal, serve, and shut down in a fixed order.

Start: store (migrations) -> state -> journal replay into the ring (the writer commits
it) -> new journal segment -> ingest socket -> ready. Stop: stop accepting -> answer
shutting_down -> let pending fsyncs finish -> writer drains the ring -> close sockets
-> checkpoint -> close the database. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from auditd.config import Config, parse_rate_limit
from auditd.errors import AuditdError, StoreError
from auditd.ingest.sequencer import Sequencer
from auditd.ingest.server import IngestLimits, IngestServer, bind_unix
from auditd.journal.journal import CorruptRange, Journal
from auditd.ring import RingBuffer
from auditd.schema import id_hash, stored_decoder
from auditd.stats import Stats
from auditd.status.control import DaemonControl
from auditd.status.server import StatusServer
from auditd.store.deadletters import DeadLetterStore
from auditd.store.recovery import read_remnant, set_aside_if_damaged
from auditd.store.store import DB_NAME, DeadLetter, Store
from auditd.store.writer import Gap, Pending, Writer
from auditd.systemd import Notifier, watchdog_interval

log = structlog.get_logger("auditd.daemon")
_GC_YOUNG_THRESHOLD = 100_000
# Past this many replayed events, and half the events already stored, the replay goes on
# without the secondary indexes and builds them at the end (migrations.deferred): below
# it, building them costs about what it saves.
_SET_INDEXES_ASIDE_AFTER = 100_000

_MAINTENANCE_S = 0.5
_STATUS_EVERY_S = 2.0
_WRITER_DRAIN_S = 30.0


class Daemon:
    def __init__(self, config: Config, *, sockets: dict[str, socket.socket] | None = None):
        self.config = config
        self.inherited = sockets or {}
        self.storage = Path(config.storage.path)
        self.stats = Stats()
        self.store = Store(self.storage / DB_NAME)
        self.stop_requested = asyncio.Event()
        self.ready = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signals = 0
        self.failed = False
        self.dead_letters = DeadLetterStore(self.store.path)
        self.control = DaemonControl(self)
        self.status = StatusServer(self.control)
        self._space = asyncio.Event()  # set after each commit: room in the ring for replay
        self.notifier = Notifier()
        self._stored_events = 0
        self._indexes_aside = False

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        config = self.config
        self._install_signals()
        # Sockets first: a live daemon on them refuses this start before anything is
        # opened, and clients connecting during replay wait in the backlog.
        ingest_sock = self.inherited.get("ingest") or bind_unix(
            config.ingest.socket, config.mode("ingest"))
        status_sock = self.inherited.get("status") or bind_unix(
            config.status.socket, config.mode("status"))
        try:
            committed_seq = await self._open()
            await self.status.start(status_sock, config.status.metrics_listen or None)
            self._spawn(self.writer.run(), "writer")
            self._spawn(self._maintain(), "maintenance")
            self._spawn(self.store.checkpoint_forever(), "wal_checkpoint")
            await self._replay(committed_seq)
            self.journal.open_segment(self.sequencer.last_seq + 1)
            if self.journal.fsync:
                self._spawn(self.journal.sync_forever(), "journal_sync")
            await self.ingest.start(ingest_sock)
        except BaseException:
            await self._abandon_start()
            raise
        self.ready = True
        # Start-up objects (modules, config, replayed state) never die: keep full
        # collections from walking them, which showed up as 15-30 ms loop pauses.
        gc.collect()
        gc.freeze()
        # Ingest allocates a score of container objects per event and frees nearly all
        # by reference count, so at the default 700 a young collection ran every few
        # dozen events and found nothing. Measured: +10-15% committed/s under a flood,
        # no change to reply p99 or peak RSS. Older generations keep their defaults.
        gc.set_threshold(_GC_YOUNG_THRESHOLD, 10, 10)
        log.info("daemon_ready", socket=config.ingest.socket, last_seq=self.sequencer.last_seq,
                 durability=config.ingest.durability)
        self.notifier.ready(self.status_line())
        await self.stop_requested.wait()
        await self._shutdown()
        return 1 if self.failed else 0

    async def _open(self) -> int:
        """Database (checked, migrated), state, components; returns the checkpoint."""
        config = self.config
        self.storage.mkdir(parents=True, exist_ok=True)
        self.damaged = await asyncio.to_thread(set_aside_if_damaged, self.store.path)
        await self.store.open()
        state = await self.store.load_state()
        if self.damaged is not None:
            remnant = await asyncio.to_thread(read_remnant, self.damaged[0])
            state.max_seq = max(state.max_seq, remnant.max_seq)
            for stream, version in (remnant.streams or {}).items():
                state.streams[stream] = max(state.streams.get(stream, 0), version)
        capacity = config.buffer.capacity
        self.ring: RingBuffer[Pending] = RingBuffer(
            capacity, config.size("buffer", "max_bytes"))
        self.sequencer = Sequencer(state.max_seq, state.streams, recent_limit=2 * capacity)
        stored = self._stored_events = await self.store.id_hashes(
            self.sequencer.id_filter.add)
        self.journal = Journal(self.storage / "journal",
                               config.size("storage", "journal_segment_bytes"),
                               fsync=config.ingest.durability == "fsync")
        self.writer = Writer(
            self.store, self.ring, self.stats, batch_max=config.writer.batch_max,
            batch_delay_ms=config.writer.batch_delay_ms,
            retry_max_delay_ms=config.duration_ms("writer", "retry_max_delay"),
            fallback_path=self.storage / "dead-letters.fallback",
            on_committed=self._committed)
        await self.dead_letters.open()
        self.stats.last_committed_seq = state.committed_seq
        self.ingest = IngestServer(
            IngestLimits(config.size("ingest", "max_frame_bytes"),
                         config.ingest.max_batch_events,
                         config.size("ingest", "max_event_bytes"),
                         config.ingest.max_connections, config.buffer.overflow,
                         config.ingest.durability == "fsync",
                         parse_rate_limit("ingest.rate_limit", config.ingest.rate_limit)),
            self.sequencer, self.journal, self.ring, self.writer, self.store, self.stats)
        log.info("daemon_starting", config=config.source or "defaults", storage=str(self.storage),
                 last_seq=state.max_seq, committed_seq=state.committed_seq, stored_ids=stored)
        return state.committed_seq

    async def _abandon_start(self) -> None:
        """A start that failed part-way: stop tasks and close what was opened, so the
        process can exit (aiosqlite's threads would otherwise keep it alive)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.status.aclose()
            await self.dead_letters.close()
            await self.store.close()

    async def _replay(self, committed_seq: int) -> None:
        """Feed journaled events past the checkpoint to the writer, as first sequenced."""
        started, replayed, stats = time.monotonic(), 0, self.stats
        chunk = max(1, self.ring.capacity // 2)
        set_aside_at = max(_SET_INDEXES_ASIDE_AFTER, self._stored_events // 2)
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
            if replayed % 100_000 == 0:
                stats.replay_done = replayed
                log.info("replay_progress", events=replayed, seq=event.seq)
                self.writer.wake()
        if self._indexes_aside:
            await self._wait_for_writer(lambda: not self.ring.pending)  # all committed
            await self._build_indexes()
        await self.writer.catch_up(False)
        self.writer.wake()
        self.sequencer.last_seq = max(self.sequencer.last_seq, self.journal.last_seq)
        stats.replay_done = replayed
        stats.replay_finished = True
        if replayed:
            log.info("replay_finished", events=replayed, last_seq=self.sequencer.last_seq,
                     seconds=round(time.monotonic() - started, 3))

    async def _push(self, entries: list[Pending], size: int) -> None:
        """Into the ring in seq order, waiting for the writer to make room."""
        await self._wait_for_writer(lambda: self.ring.has_room(len(entries), size))
        self.sequencer.last_seq = max(self.sequencer.last_seq, entries[-1].seq)
        self.ring.push(entries, [size] + [0] * (len(entries) - 1))

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
        self._indexes_aside = True
        log.info("indexes_set_aside", indexes=names, replayed=replayed,
                 note="built again once the replay is committed")

    async def _build_indexes(self) -> None:
        started = time.monotonic()
        try:
            names = await self.store.build_indexes()
        except StoreError as exc:
            log.error("index_build_failed", error=str(exc),
                      note="retried by maintenance; queries are slow until it succeeds")
            return
        self._indexes_aside = False
        log.info("indexes_built", indexes=names, seconds=round(time.monotonic() - started, 3))

    def _gaps(self, first: int, last: int, raw: bytes, why: str) -> list[Pending]:
        """One dead letter per seq the bytes stood for; the bytes go with the first."""
        reason = f"{why}; they stood for seq {first}..{last}"
        gaps: list[Pending] = [
            Gap(seq, DeadLetter("journal", "journal_corrupt", reason,
                                raw if seq == first else b"", seq))
            for seq in range(first, last + 1)]
        self.stats.dead_lettered("journal_corrupt", len(gaps))
        return gaps

    def _committed(self, seq: int) -> None:
        self.sequencer.trim(seq)
        self.ingest.capacity_freed()
        self._space.set()

    def status_line(self) -> str:
        stats = self.stats
        state = "degraded" if (self.writer.fault or self.ingest.refusal) else "ok"
        return (f"{state}: last seq {self.sequencer.last_seq}, {stats.accepted} accepted, "
                f"{stats.committed} committed, {self.ring.pending} pending, "
                f"{stats.connections} connections")

    def _writer_progressing(self, stall_after_s: float) -> bool:
        """The watchdog's question: is the writer making progress, not merely alive?

        Pings stop once events have waited `stall_after_s` without a commit, half of
        systemd's WatchdogSec: a lock held that long means systemd should step in.
        """
        oldest = self.ring.oldest_pending()
        if oldest is None:
            return True
        waited = (time.time_ns() - oldest.received_at) / 1e9
        since_commit = time.monotonic() - self.stats.last_commit_at
        return waited < stall_after_s or since_commit < stall_after_s

    async def _maintain(self) -> None:
        """Disk reserve, journal release, dead-letter quota, systemd status and watchdog."""
        reserve = self.config.size("storage", "reserve_bytes")
        watchdog_every = watchdog_interval()
        last_ping = last_status = 0.0
        while True:
            await asyncio.sleep(_MAINTENANCE_S)
            now = time.monotonic()
            if (watchdog_every and now - last_ping >= watchdog_every
                    and self._writer_progressing(watchdog_every)):
                self.notifier.watchdog()
                last_ping = now
            if now - last_status >= _STATUS_EVERY_S:
                self.notifier.status(self.status_line())
                last_status = now
            try:
                await self.control.refresh()
                vfs = os.statvfs(self.storage)
                free = vfs.f_bavail * vfs.f_frsize
                if free < reserve:
                    self.ingest.set_refusal(
                        f"disk space low: {free} bytes free on {self.storage}, "
                        f"reserve is {reserve}")
                elif self.ingest.refusal is not None:
                    self.ingest.set_refusal(None)
                await self._release_journal()
                if self._indexes_aside and self.ready:  # the build at replay's end failed
                    await self._build_indexes()
            except Exception as exc:
                log.error("maintenance_failed", error=str(exc))

    async def _release_journal(self) -> None:
        if len(self.journal.segments()) < 2:
            return
        committed = self.stats.last_committed_seq
        if await self.store.checkpoint_wal():
            removed = self.journal.release_through(committed)
            if removed:
                log.info("journal_released", segments=removed, through_seq=committed)

    async def _shutdown(self) -> None:
        log.info("daemon_stopping", pending=self.ring.pending)
        self.notifier.stopping("stopping: draining the buffer")
        self.ingest.stop_accepting()
        if self.journal.fsync:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.journal.wait_synced(self.journal.written), 10)
        self.writer.stop()
        writer_task = next((t for t in self._tasks if t.get_name() == "writer"), None)
        if writer_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(writer_task), _WRITER_DRAIN_S)
            except TimeoutError:
                log.error("writer_drain_timeout", pending=self.ring.pending,
                          note="pending events stay in the journal and replay at start")
        await self.ingest.aclose()
        await self.status.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._release_journal()
        await self.dead_letters.close()
        await self.store.close()
        self.journal.close()
        log.info("daemon_stopped", last_seq=self.sequencer.last_seq,
                 committed_seq=self.stats.last_committed_seq)

    # -- plumbing ------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.critical("task_failed", task=task.get_name(), error=repr(task.exception()))
            self.failed = True  # exit non-zero, so systemd's Restart=on-failure steps in
            self.stop_requested.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_reload_signal(self) -> None:
        if not self.ready:
            log.warning("reload_ignored", reason="still starting")
            return

        async def reload() -> None:
            with contextlib.suppress(AuditdError):  # refused: logged, old config stays
                await self.control.reload()

        self._spawn(reload(), "reload")

    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop_requested.set()
