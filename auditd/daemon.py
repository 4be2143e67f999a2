"""Wiring: open the store, replay the journal, serve, and shut down in a fixed order.

Start: store (migrations) -> state -> journal replay into the ring (the writer commits
it) -> new journal segment -> ingest socket -> ready. Stop: stop accepting -> answer
shutting_down -> let pending fsyncs finish -> writer drains the ring -> close sockets
-> checkpoint -> close the database. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import structlog

from auditd.config import Config
from auditd.control import DaemonControl
from auditd.deadletters import DeadLetterStore
from auditd.errors import AuditdError
from auditd.ingest import IngestLimits, IngestServer, bind_unix
from auditd.journal import CorruptRange, Journal
from auditd.recovery import set_aside_if_damaged
from auditd.ring import RingBuffer
from auditd.schema import StoredEvent, stored_decoder
from auditd.sequencer import Sequencer
from auditd.stats import Stats
from auditd.status.server import StatusServer
from auditd.store import DB_NAME, DeadLetter, Store
from auditd.systemd import Notifier, watchdog_interval
from auditd.writer import Writer

log = structlog.get_logger("auditd.daemon")

_MAINTENANCE_S = 0.5
_STATUS_EVERY_S = 2.0
_WATCHDOG_STALL_S = 10.0
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
        self.notifier = Notifier()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        config = self.config
        self._install_signals()
        self.storage.mkdir(parents=True, exist_ok=True)
        self.damaged = await asyncio.to_thread(set_aside_if_damaged, self.store.path)
        await self.store.open()
        state = await self.store.load_state()
        capacity = config.buffer.capacity
        self.ring: RingBuffer[StoredEvent] = RingBuffer(
            capacity, config.size("buffer", "max_bytes"))
        self.sequencer = Sequencer(state.max_seq, state.streams, recent_limit=2 * capacity)
        stored = await self.store.id_hashes(self.sequencer.id_filter.add)
        self.journal = Journal(self.storage / "journal",
                               config.size("storage", "journal_segment_bytes"),
                               fsync=config.ingest.durability == "fsync")
        self.writer = Writer(
            self.store, self.ring, self.stats, batch_max=config.writer.batch_max,
            batch_delay_ms=config.writer.batch_delay_ms,
            retry_max_delay_ms=config.duration_ms("writer", "retry_max_delay"),
            fallback_path=self.storage / "dead-letters.fallback",
            on_committed=self._committed)
        self.dead_letters = DeadLetterStore(self.store.path)
        await self.dead_letters.open()
        self.control = DaemonControl(self)
        self.stats.last_committed_seq = state.committed_seq
        self.ingest = IngestServer(
            IngestLimits(config.size("ingest", "max_frame_bytes"),
                         config.ingest.max_batch_events,
                         config.size("ingest", "max_event_bytes"),
                         config.ingest.max_connections, config.buffer.overflow,
                         config.ingest.durability == "fsync"),
            self.sequencer, self.journal, self.ring, self.writer, self.store, self.stats)
        log.info("daemon_starting", config=config.source or "defaults", storage=str(self.storage),
                 last_seq=state.max_seq, committed_seq=state.committed_seq, stored_ids=stored)
        self._spawn(self.writer.run(), "writer")
        await self._replay(state.committed_seq)
        self.journal.open_segment(self.sequencer.last_seq + 1)
        if self.journal.fsync:
            self._spawn(self.journal.sync_forever(), "journal_sync")
        ingest_sock = self.inherited.get("ingest") or bind_unix(
            config.ingest.socket, config.mode("ingest"))
        await self.ingest.start(ingest_sock)
        self.status = StatusServer(self.control)
        await self.status.start(
            self.inherited.get("status") or bind_unix(config.status.socket,
                                                      config.mode("status")),
            config.status.metrics_listen or None)
        self._spawn(self._maintain(), "maintenance")
        self.ready = True
        log.info("daemon_ready", socket=config.ingest.socket, last_seq=self.sequencer.last_seq,
                 durability=config.ingest.durability)
        self.notifier.ready(self.status_line())
        await self.stop_requested.wait()
        await self._shutdown()
        return 0

    async def _replay(self, committed_seq: int) -> None:
        """Feed journaled events past the checkpoint to the writer, as first sequenced."""
        started, replayed, stats = time.monotonic(), 0, self.stats
        space = asyncio.Event()
        self._space = space
        for item in self.journal.replay(committed_seq):
            if isinstance(item, CorruptRange):
                self._dead_letter_range(item)
                continue
            event = stored_decoder.decode(item.payload)
            while not self.ring.has_room(1, len(item.payload)):
                space.clear()
                self.writer.wake()
                await space.wait()
            self.sequencer.restore(event)
            self.ring.push([event], [len(item.payload)])
            replayed += 1
            if replayed % 100_000 == 0:
                stats.replay_done = replayed
                log.info("replay_progress", events=replayed, seq=event.seq)
                self.writer.wake()
        self.writer.wake()
        self.sequencer.last_seq = max(self.sequencer.last_seq, self.journal.last_seq)
        stats.replay_done = replayed
        stats.replay_finished = True
        if replayed:
            log.info("replay_finished", events=replayed, last_seq=self.sequencer.last_seq,
                     seconds=round(time.monotonic() - started, 3))

    def _dead_letter_range(self, damaged: CorruptRange) -> None:
        reason = (f"journal segment {damaged.segment} offset {damaged.offset}: "
                  f"{len(damaged.raw)} damaged bytes stood for seq "
                  f"{damaged.first_seq}..{damaged.last_seq}")
        entries = [DeadLetter("journal", "journal_corrupt", reason,
                              damaged.raw if seq == damaged.first_seq else b"", seq)
                   for seq in range(damaged.first_seq, damaged.last_seq + 1)]
        self.sequencer.last_seq = max(self.sequencer.last_seq, damaged.last_seq)
        self.stats.dead_lettered("journal_corrupt", len(entries))
        self.writer.add_dead_letters(entries)

    def _committed(self, seq: int) -> None:
        self.sequencer.trim(seq)
        self.ingest.capacity_freed()
        space = getattr(self, "_space", None)
        if space is not None:
            space.set()

    def status_line(self) -> str:
        stats = self.stats
        state = "degraded" if (self.writer.fault or self.ingest.refusal) else "ok"
        return (f"{state}: {stats.accepted} accepted, {stats.committed} committed, "
                f"{self.ring.pending} pending, {stats.connections} connections")

    def _writer_progressing(self) -> bool:
        """The watchdog's question: is the writer keeping up, not merely alive?"""
        stalled_for = time.monotonic() - self.stats.last_commit_at
        return self.ring.pending == 0 or stalled_for < _WATCHDOG_STALL_S

    async def _maintain(self) -> None:
        """Disk reserve, journal release, dead-letter quota, systemd status and watchdog."""
        reserve = self.config.size("storage", "reserve_bytes")
        watchdog_every = watchdog_interval()
        last_ping = last_status = 0.0
        while True:
            await asyncio.sleep(_MAINTENANCE_S)
            now = time.monotonic()
            if (watchdog_every and now - last_ping >= watchdog_every
                    and self._writer_progressing()):
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
