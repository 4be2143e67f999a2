"""The daemon's side of forwarding: it owns the cursor, the worker owns the network.

`ForwardProcess.run` loads the cursor (no lower than retention's prune point: seqs
deleted before forwarding began cannot be sent), starts `python -m
auditd.forward.worker`, tells it each commit, and persists each acknowledged cursor it
reports, in the store on the writer's thread, at most every 50 ms. A worker that dies
is logged and started again after a backoff, from the persisted cursor; the daemon
never waits on it. Retention reads `forwarded_through()`: the persisted cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from typing import Any

import msgspec
import structlog

from auditd.config import Config
from auditd.forward.cursor import Cursor, load_cursor, save_cursor
from auditd.forward.figures import ForwardFigures
from auditd.proofs.checkpointer import host_id_of
from auditd.proofs.prune_point import pruned_through
from auditd.store.store import Store

log = structlog.get_logger("auditd.forward")
_PERSIST_EVERY_S = 0.05
_RESTART_FIRST_S = 0.5
_RESTART_MAX_S = 30.0
_STOP_WAIT_S = 10.0
_STDOUT_LIMIT = 1 << 20


class ForwardView:
    """What status, health and metrics read: the worker's last figures."""

    def __init__(self, config: Config) -> None:
        settings = config.forward
        # Until the worker first reports: its figures as they start.
        self.doc: dict[str, Any] = ForwardFigures(settings.stream,
                                                  list(settings.servers)).document()
        self.worker_fault: str | None = None
        self.committed = 0

    def document(self, retention_blocked: str | None) -> dict[str, Any]:
        """The worker's figures, completed: `retention_blocked` is retention's."""
        doc = {**self.doc, "retention_blocked": retention_blocked}
        # The worker's lag is as of its last report; the daemon's commits are newer.
        doc["lag_events"] = max(0, self.committed - int(doc["cursor"]))
        if self.worker_fault is not None:
            doc["fault"], doc["connected"] = self.worker_fault, False
        return doc

    @staticmethod
    def problem(doc: dict[str, Any], lag_max_events: int, lag_max_s: float) -> str | None:
        """Why forwarding is degraded, from `document()`'s figures; None when it is not."""
        if doc["fault"]:
            return str(doc["fault"])
        if doc["lag_events"] > lag_max_events:
            return (f"forwarding lags {doc['lag_events']} events (bound "
                    f"forward.lag_max_events = {lag_max_events})")
        if doc["lag_seconds"] > lag_max_s:
            return (f"forwarding lags {doc['lag_seconds']:.1f} s (bound "
                    f"forward.lag_max_age = {lag_max_s:g}s)")
        return None


class ForwardProcess:
    def __init__(self, store: Store, config: Config) -> None:
        self.store, self.config = store, config
        self.figures = ForwardView(config)
        self._persisted = self._acked = Cursor(0, 0)
        self._proc: asyncio.subprocess.Process | None = None
        self._dirty = asyncio.Event()

    def committed(self, seq: int) -> None:
        self.figures.committed = seq
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(b'{"committed":%d}\n' % seq)

    def forwarded_through(self) -> int:
        """The persisted cursor: retention deletes nothing above it."""
        return self._persisted.seq

    async def run(self) -> None:
        cursor, host = await asyncio.to_thread(self._load)
        self._persisted = self._acked = cursor
        # Until the worker reports, status shows the persisted cursor, not 0 (seen as a
        # "cursor 0, lag 805028" for the second a restarted daemon's worker took).
        self.figures.doc.update(cursor=cursor.seq, checkpoint_cursor=cursor.checkpoint_size)
        persister = asyncio.get_running_loop().create_task(self._persist_forever(),
                                                           name="forward_cursor")
        delay = _RESTART_FIRST_S
        try:
            while True:
                started = time.monotonic()
                code = await self._worker(host)
                self.figures.worker_fault = (f"the forwarding process exited with code "
                                             f"{code}; restarting it")
                log.error("forward_worker_exited", code=code, restart_in_s=delay)
                await asyncio.sleep(delay)
                delay = _RESTART_FIRST_S if time.monotonic() - started > _RESTART_MAX_S \
                    else min(delay * 2, _RESTART_MAX_S)
        finally:
            await self._stop_worker()
            persister.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await persister
            await self._persist_now()

    def _load(self) -> tuple[Cursor, str]:
        db = sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True)
        try:
            stream = self.config.forward.stream
            found, floor = load_cursor(db, stream), pruned_through(db)
            host = host_id_of(db)
        finally:
            db.close()
        if found.seq < floor:
            log.warning("forward_starts_after_prune_point", stream=stream, cursor=found.seq,
                        pruned_through=floor)
            found = Cursor(floor, max(found.checkpoint_size, floor))
        return found, host

    async def _worker(self, host: str) -> int:
        """Run one worker until it exits; its exit code."""
        proc = self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "auditd.forward.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=_STDOUT_LIMIT)
        assert proc.stdin is not None and proc.stdout is not None
        start = {"config": msgspec.to_builtins(self.config), "db": str(self.store.path),
                 "partitions": str(self.store.partitions_dir), "host": host,
                 "cursor": [self._acked.seq, self._acked.checkpoint_size],
                 "committed": self.figures.committed}
        proc.stdin.write(json.dumps(start).encode() + b"\n")
        self.figures.worker_fault = None
        log.info("forward_worker_started", pid=proc.pid, cursor=self._acked.seq)
        try:
            while line := await proc.stdout.readline():
                self._take(json.loads(line))
        finally:
            self._proc = None
        return await proc.wait()

    def _take(self, message: dict[str, Any]) -> None:
        if "acked" in message:
            seq, size = message["acked"]
            if seq >= self._acked.seq:
                self._acked = Cursor(int(seq), int(size))
                self._dirty.set()
        elif "figures" in message:
            self.figures.doc = message["figures"]

    async def _stop_worker(self) -> None:
        """Close its stdin (it sends its last cursor and exits); kill it if it lingers."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return
        proc.stdin.close()
        try:
            async with asyncio.timeout(_STOP_WAIT_S):
                while line := await proc.stdout.readline():
                    self._take(json.loads(line))
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _persist_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._persist_now()
            except Exception as exc:
                log.error("forward_cursor_not_saved", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(_PERSIST_EVERY_S)

    async def _persist_now(self) -> None:
        acked = self._acked
        if acked == self._persisted:
            return
        await self.store.on_writer(save_cursor, self.config.forward.stream, acked)
        self._persisted = acked
