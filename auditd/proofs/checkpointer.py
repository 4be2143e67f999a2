"""Issuing signed checkpoints: at most every `checkpoint_every` while events arrive, at
least every `idle_every` when idle, and once more at a clean shutdown.

A checkpoint covers only events durable in the database: its size is the newest
commit at or below the store's `durable_seq` (commits that a completed WAL checkpoint
wrote into the database file), and its root is that commit's, as the tree computed it
on the store's thread. Each is stored (table `checkpoints`) before it is published (a
file, a command's stdin). The daemon never signs a size smaller than, or a root other
than, what it signed before: a tree that disagrees with the newest stored checkpoint
at start is logged and left unsigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auditd.errors import StoreError
from auditd.logs import RecurringFault
from auditd.proofs.notes import Checkpoint, origin, sign_checkpoint, verifier_of
from auditd.proofs.tree import Tree
from auditd.store.store import Store

log = structlog.get_logger("auditd.proofs.checkpointer")
_PUBLISH_TIMEOUT_S = 10.0
# FULL WAL checkpoints tried at shutdown, each waiting up to the busy timeout (200 ms)
# for readers of an older snapshot: a passive one left the last second of commits
# unsigned when a reader was still on its snapshot (seen stopping a 10M-event store).
_FINAL_ATTEMPTS = 10


def newest_checkpoint(db: sqlite3.Connection) -> tuple[int, bytes, str] | None:
    row = db.execute("SELECT size, root, text FROM checkpoints ORDER BY id DESC LIMIT 1"
                     ).fetchone()
    return None if row is None else (int(row[0]), bytes(row[1]), str(row[2]))


def _store_checkpoint(db: sqlite3.Connection, checkpoint: Checkpoint) -> None:
    db.execute("INSERT INTO checkpoints (size, root, time, text) VALUES (?, ?, ?, ?)",
               (checkpoint.size, checkpoint.root, checkpoint.time, checkpoint.text))


def host_id_of(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = 'host_id'").fetchone()
    return "localhost" if row is None else str(row[0])


class Checkpointer:
    def __init__(self, store: Store, tree: Tree, key: Ed25519PrivateKey, *,
                 every_s: float, idle_s: float, publish_file: str = "",
                 publish_command: str = "") -> None:
        self.store, self.tree, self.key = store, tree, key
        self.every_s, self.idle_s = every_s, idle_s
        self.publish_file, self.publish_command = publish_file, publish_command
        self.origin = ""
        self.newest: Checkpoint | None = None
        self.newest_text: str | None = None
        self._signed_size = 0
        self._signed_root = b""
        self._issued_at = 0.0
        self.refused: str | None = None  # why nothing is signed, for health and logs
        self.issued = 0
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        host, newest = await self.store.on_writer(
            lambda db: (host_id_of(db), newest_checkpoint(db)))
        self.origin = origin(host)
        if newest is not None:
            self._signed_size, self._signed_root, self.newest_text = newest
            if self.tree.size < self._signed_size:
                self.refused = (f"the tree holds {self.tree.size} leaves, fewer than the "
                                f"newest checkpoint's {self._signed_size}")
            elif self.tree.size == self._signed_size and \
                    self.tree.edge.root() != self._signed_root:
                self.refused = f"the tree's root at size {self._signed_size} is not the signed one"
            if self.refused:
                log.critical("checkpoints_refused", reason=self.refused,
                             note="run `auditd verify`; nothing is signed until resolved")

    @property
    def vkey_text(self) -> str:
        return verifier_of(self.origin, self.key).text()

    async def issue(self, *, idle: bool = False) -> Checkpoint | None:
        """Sign, store and publish a checkpoint of the newest durable commit, when it
        grew (or, `idle`, re-sign the same size with a new time)."""
        async with self._lock:
            if self.refused:
                return None
            found = self.tree.roots_through(self.store.durable_seq)
            if found is None or found[0] == 0:
                return None
            size, root = found
            if size < self._signed_size or (size == self._signed_size and not idle):
                return None
            if size == self._signed_size and root != self._signed_root:
                self.refused = f"two roots at size {size}"
                log.critical("checkpoints_refused", reason=self.refused)
                return None
            checkpoint = sign_checkpoint(self.key, self.origin, size, root, int(time.time()))
            await self.store.on_writer(_store_checkpoint, checkpoint)
            self._signed_size, self._signed_root = size, root
            self.newest, self.newest_text = checkpoint, checkpoint.text
            self._issued_at = time.monotonic()
            self.issued += 1
        log.debug("checkpoint_issued", size=size)
        await self._publish(checkpoint)
        return checkpoint

    async def run(self) -> None:
        fault = RecurringFault(log, "checkpoint_failed", "checkpoint_recovered",
                               level="warning")
        while True:
            await asyncio.sleep(self.every_s)
            idle = time.monotonic() - self._issued_at >= self.idle_s
            try:
                await self.issue(idle=idle)
            except StoreError as exc:
                fault.failed(exc)
                continue
            fault.succeeded()

    async def final(self) -> None:
        """At a clean shutdown, after the writer drained: make the last commit durable
        and sign it."""
        complete = False
        for _ in range(_FINAL_ATTEMPTS):  # a reader's snapshot ends soon: try again
            with contextlib.suppress(StoreError):
                complete = await self.store.checkpoint_wal("FULL")
            if complete:
                break
        checkpoint = await self.issue()
        if checkpoint is not None:
            log.info("checkpoint_at_shutdown", size=checkpoint.size)
        elif not complete and self.tree.size > self._signed_size:
            log.warning("checkpoint_at_shutdown_skipped", signed_size=self._signed_size,
                        reason="the WAL could not be copied completely (a reader holds "
                               "an older snapshot); the next checkpoint signs them")

    async def _publish(self, checkpoint: Checkpoint) -> None:
        if self.publish_file:
            try:
                await asyncio.to_thread(_append, Path(self.publish_file), checkpoint.text)
            except OSError as exc:
                log.warning("checkpoint_publish_failed", file=self.publish_file, error=str(exc))
        if self.publish_command:
            await self._run_command(checkpoint.text)

    async def _run_command(self, text: str) -> None:
        try:
            proc = await asyncio.create_subprocess_shell(
                self.publish_command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                _, err = await asyncio.wait_for(proc.communicate(text.encode()),
                                                _PUBLISH_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("checkpoint_publish_failed", command=self.publish_command,
                            error=f"no exit within {_PUBLISH_TIMEOUT_S:g} s")
                return
        except OSError as exc:
            log.warning("checkpoint_publish_failed", command=self.publish_command,
                        error=str(exc))
            return
        if proc.returncode:
            log.warning("checkpoint_publish_failed", command=self.publish_command,
                        exit_code=proc.returncode, stderr=err.decode(errors="replace")[-500:])


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
