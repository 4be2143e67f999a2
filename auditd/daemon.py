"""Wiring: open the store, replay the journal, serve, and shut down in a fixed order.

Start: store (checked, migrated) -> state, stored ids -> journal replay into the ring
(the writer commits it) -> new journal segment -> ingest socket -> ready. While it runs,
systemd hears what it is doing and is asked for more time as long as it makes progress.
Stop: stop accepting -> answer shutting_down -> let pending fsyncs finish -> writer
drains the ring -> close, in reverse order of setup, each step on its own (a failed one is
logged and makes the exit code 1; the rest still run). A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from auditd.config import Config, parse_rate_limit
from auditd.errors import AuditdError
from auditd.forward.process import ForwardProcess
from auditd.ingest.sequencer import Sequencer
from auditd.ingest.server import IngestLimits, IngestServer, bind_unix
from auditd.journal.journal import Journal
from auditd.lifecycle.retention import Retention, RetentionError
from auditd.logs import RecurringFault
from auditd.projections import Projections
from auditd.proofs.checkpointer import Checkpointer
from auditd.proofs.keys import key_path, load_or_create
from auditd.proofs.ledger import Ledger
from auditd.proofs.notes import sign_checkpoint
from auditd.query.engine import QueryEngine
from auditd.query.feed import CommitFeed
from auditd.query.hot_index import HotIndex
from auditd.query.rebuild import rebuild_hot_index
from auditd.replay import JournalReplay
from auditd.ring import RingBuffer
from auditd.stats import Stats
from auditd.status.control import DaemonControl
from auditd.status.server import StatusServer
from auditd.store.deadletters import DeadLetterStore
from auditd.store.recovery import read_remnant, set_aside_if_damaged
from auditd.store.sealing.sealer import Sealer
from auditd.store.store import DB_NAME, Store
from auditd.store.writer import Pending, Writer
from auditd.systemd import (
    Notifier,
    StartProgress,
    extend_start_while_progressing,
    watchdog_interval,
)

log = structlog.get_logger("auditd.daemon")
_GC_YOUNG_THRESHOLD = 100_000

_MAINTENANCE_S = 0.5
_STATUS_EVERY_S = 2.0
_WRITER_DRAIN_S = 30.0
# How often start-up tells systemd what it does, asking each time (while it progresses)
# for systemd.EXTEND_FACTOR times this much more: a start that stalls is killed within
# 10 s past the unit's TimeoutStartSec=. Often, so that even a unit timeout of a couple
# of seconds gets its first extension in time; a look costs one datagram.
_EXTEND_EVERY_S = 1.0
_EXTENDER = "start_timeout_extender"


class Daemon:
    def __init__(self, config: Config, *, sockets: dict[str, socket.socket] | None = None):
        self.config = config
        self.inherited = sockets or {}
        self.storage = Path(config.storage.path)
        self.stats = Stats()
        self.store = Store(self.storage / DB_NAME)
        self.projections = Projections(self.store)
        self.ledger = Ledger(self.store.partitions_dir)
        self.store.ledger = self.ledger
        self.checkpointer: Checkpointer | None = None
        self.stop_requested = asyncio.Event()
        self.ready = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signals = 0
        self.failed = False
        self.dead_letters = DeadLetterStore(self.store.path)
        self.hot_index = HotIndex()
        self.query_engine = QueryEngine(self.store.path, self.hot_index, self.store.sealed,
                                        lambda seqs: self.ring.committed_by_seq(seqs),
                                        config.size("storage", "term_filter_bytes"))
        self.feed = CommitFeed()  # committed events for /tail?follow=1
        self.control = DaemonControl(self)
        self.status = StatusServer(self.control)
        self.notifier = Notifier()
        self.start_progress = StartProgress()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        config = self.config
        self._install_signals()
        if self.notifier.enabled:
            self._spawn(extend_start_while_progressing(
                self.notifier, self._start_progress, self._start_status, _EXTEND_EVERY_S),
                _EXTENDER)
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
            self._spawn(self.sealer.run(), "sealer")
            self._spawn(self._maintain(), "maintenance")
            self._spawn(self.store.checkpoint_forever(), "wal_checkpoint")
            if self.checkpointer is not None:
                self._spawn(self.checkpointer.run(), "checkpointer")
            await self.replay.run(committed_seq)
            self.journal.open_segment(self.sequencer.last_seq + 1)
            if self.journal.fsync:
                self._spawn(self.journal.sync_forever(), "journal_sync")
            self.start_progress.begin("opening the ingest socket")
            await self.ingest.start(ingest_sock)
        except BaseException:
            await self._abandon_start()
            raise
        self.ready = True
        self._spawn(self.query_engine.warm(), "query_warm")
        self._spawn(self.retention.run(), "retention")
        if self.forwarder is not None:  # never before ready: start-up never waits on NATS
            self._spawn(self.forwarder.run(), "forwarder")
        self._cancel_task(_EXTENDER)  # READY=1 below ends the start timeout
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
        if await self._shutdown():
            self.failed = True
        return 1 if self.failed else 0

    async def _open(self) -> int:
        """Database (checked, migrated), state, components; returns the checkpoint."""
        config, progress = self.config, self.start_progress
        self.storage.mkdir(parents=True, exist_ok=True)
        progress.begin("checking the database (quick_check)")
        self.damaged = await asyncio.to_thread(set_aside_if_damaged, self.store.path,
                                               progress.tick)
        progress.begin("opening the database (migrations)")
        await self.store.open(progress.tick)
        state = await self.store.load_state()
        progress.begin("indexing the hot events")
        await rebuild_hot_index(self.hot_index, self.store.path, await self.store.sealed_through())
        self.store.after_commit = self.hot_index.append
        self.store.after_seal = self.hot_index.trim
        progress.begin("opening the projections")
        await self.projections.open()
        await self._open_checkpointer()
        if self.damaged is not None:
            remnant = await asyncio.to_thread(read_remnant, self.damaged[0])
            state.max_seq = max(state.max_seq, remnant.max_seq)
            # Leaves are forever: the tree waits for the moved file's rows (recover).
            await self.store.on_writer(self.ledger.wait_for, str(self.damaged[0]),
                                       remnant.max_seq)
            for stream, version in (remnant.streams or {}).items():
                state.streams[stream] = max(state.streams.get(stream, 0), version)
        capacity = config.buffer.capacity
        self.ring: RingBuffer[Pending] = RingBuffer(
            capacity, config.size("buffer", "max_bytes"))
        self.sequencer = Sequencer(state.max_seq, state.streams, recent_limit=2 * capacity)
        progress.begin("loading the stored ids")
        stored = await self.store.id_hashes(self.sequencer.id_filter.add, progress.tick)
        self.journal = Journal(self.storage / "journal",
                               config.size("storage", "journal_segment_bytes"),
                               fsync=config.ingest.durability == "fsync")
        self.writer = Writer(
            self.store, self.ring, self.stats, batch_max=config.writer.batch_max,
            batch_delay_ms=config.writer.batch_delay_ms,
            retry_max_delay_ms=config.duration_ms("writer", "retry_max_delay"),
            fallback_path=self.storage / "dead-letters.fallback",
            on_committed=self._committed, on_batch=self.feed.publish)
        self.sealer = Sealer(self.store, config.storage.partition_events, self.writer.hold)
        self.retention = Retention(self.store, config, self._sign_prune_point)
        self.retention.after_drop = self.query_engine.forget_dropped
        self.forwarder = ForwardProcess(self.store, config) if config.forward.servers \
            else None
        if self.forwarder is not None:
            self.forwarder.figures.committed = state.committed_seq
            self.retention.forwarded = self.forwarder.forwarded_through
        self.sealer.committed_seq = state.committed_seq
        self.replay = JournalReplay(self.journal, self.ring, self.writer, self.store,
                                    self.sequencer, self.stats, progress)
        await self.dead_letters.open()
        self.stats.last_committed_seq = self.feed.last_seq = state.committed_seq
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

    async def _open_checkpointer(self) -> None:
        proofs = self.config.proofs
        path, may_create = key_path(proofs.key_file, self.storage)
        key, created = await asyncio.to_thread(load_or_create, path, may_create)
        if created:
            log.info("checkpoint_key_created", path=str(path), mode="0600")
        self.checkpointer = Checkpointer(
            self.store, self.ledger.tree, key,
            every_s=self.config.duration_ms("proofs", "checkpoint_every") / 1000,
            idle_s=self.config.duration_ms("proofs", "idle_every") / 1000,
            publish_file=proofs.publish_file, publish_command=proofs.publish_command)
        await self.checkpointer.open()
        log.info("checkpoints_opened", origin=self.checkpointer.origin, key=str(path),
                 tree_size=self.ledger.tree.size, vkey=self.checkpointer.vkey_text)

    def _sign_prune_point(self, size: int, root: bytes) -> str:
        """The checkpoint of a prune point (retention, proofs.md "After retention")."""
        if self.checkpointer is None or self.checkpointer.refused:
            raise RetentionError("no checkpoint can be signed now, so nothing is pruned")
        return sign_checkpoint(self.checkpointer.key, self.checkpointer.origin, size, root,
                               int(time.time())).text

    async def _final_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        unusable = self.writer.database_fault
        if unusable is not None:
            # Nothing new was committed to sign, and the file refuses reads and writes:
            # the journal keeps the events for the next start, which signs them.
            log.warning("checkpoint_skipped_at_shutdown", reason=unusable)
            return
        await self.checkpointer.final()

    async def _abandon_start(self) -> None:
        """A start that failed part-way: stop tasks and close what was opened, so the
        process can exit (aiosqlite's threads would otherwise keep it alive)."""
        await self._close_steps([
            ("tasks", self._cancel_tasks),
            ("status_server", self.status.aclose),
            ("projections", self.projections.aclose),
            ("dead_letter_store", self.dead_letters.close),
            ("query_engine", self.query_engine.aclose),
            ("store", self.store.close),
        ])

    def _committed(self, seq: int) -> None:
        self.sealer.committed(seq)
        self.sequencer.trim(seq)
        self.ingest.capacity_freed()
        self.replay.room_made()
        if self.forwarder is not None:
            self.forwarder.committed(seq)

    def status_line(self) -> str:
        stats = self.stats
        state = "degraded" if (self.writer.fault or self.ingest.refusal) else "ok"
        return (f"{state}: last seq {self.sequencer.last_seq}, {stats.accepted} accepted, "
                f"{stats.committed} committed, {self.ring.pending} pending, "
                f"{stats.connections} connections")

    def _start_progress(self) -> int:
        """Moves while start-up does: SQL steps in the threads, replay, commits."""
        stats = self.stats
        return self.start_progress.ticks + stats.replay_done + stats.last_committed_seq

    def _start_status(self) -> str:
        return f"starting: {self.start_progress.describe()}"

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
        fault = RecurringFault(log, "maintenance_failed", "maintenance_recovered")
        while True:
            await asyncio.sleep(_MAINTENANCE_S)
            now = time.monotonic()
            if (watchdog_every and now - last_ping >= watchdog_every
                    and self._writer_progressing(watchdog_every)):
                self.notifier.watchdog()
                last_ping = now
            if self.ready and now - last_status >= _STATUS_EVERY_S:  # before: the extender's
                self.notifier.status(self.status_line())
                last_status = now
            try:
                await self.control.refresh()
                vfs = os.statvfs(self.storage)
                free = vfs.f_bavail * vfs.f_frsize
                refusal = self.retention.figures.unforwarded
                if free < reserve:
                    refusal = (f"disk space low: {free} bytes free on {self.storage}, "
                               f"reserve is {reserve}")
                if refusal is not None or self.ingest.refusal is not None:
                    self.ingest.set_refusal(refusal)
                await self._release_journal()
            except Exception as exc:
                fault.failed(exc)
                continue
            fault.succeeded()

    async def _release_journal(self) -> None:
        if len(self.journal.segments()) < 2:
            return
        committed = self.stats.last_committed_seq
        if await self.store.checkpoint_wal():
            removed = self.journal.release_through(committed)
            if removed:
                log.info("journal_released", segments=removed, through_seq=committed)

    async def _shutdown(self) -> list[str]:
        """Drain, then close everything; the names of the closing steps that failed."""
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
        # Reverse order of setup. The journal is released while the store can still
        # checkpoint, and closed (its last fdatasync) before the store it was opened after.
        failed = await self._close_steps([
            ("ingest_server", self.ingest.aclose),
            ("tasks", self._cancel_tasks),
            ("followers", self.feed.aclose),  # a final line each, before the server goes
            ("status_server", self.status.aclose),
            ("projections", self.projections.aclose),
            ("checkpoint", self._final_checkpoint),
            ("journal_release", self._release_journal),
            ("journal", self.journal.close),
            ("dead_letter_store", self.dead_letters.close),
            ("query_engine", self.query_engine.aclose),
            ("store", self.store.close),
        ])
        log.info("daemon_stopped", last_seq=self.sequencer.last_seq,
                 committed_seq=self.stats.last_committed_seq, failed_steps=failed)
        return failed

    async def _close_steps(self, steps: list[tuple[str, Callable[[], Any]]]) -> list[str]:
        """Run every step in order, whatever became of the ones before (as aiohttp's
        runner cleans up); log each failure once and return the names of those that
        failed. CancelledError is not caught: it propagates, as it must."""
        failed = []
        for step, close in steps:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.error("shutdown_step_failed", step=step, error=str(exc) or repr(exc))
                failed.append(step)
        return failed

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _cancel_task(self, name: str) -> None:
        for task in self._tasks:
            if task.get_name() == name:
                task.cancel()

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
            try:
                await self.control.reload()
            except AuditdError:
                pass  # refused: reload() logged why; the old config stays
            except Exception as exc:  # a failed reload must never stop the daemon
                log.error("config_reload_failed", error=f"{type(exc).__name__}: {exc}")

        self._spawn(reload(), "reload")

    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop_requested.set()
