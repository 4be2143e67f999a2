"""What the store's writer calls, per batch, to keep the tree (store.BatchLedger).

`extend` runs inside the batch's transaction on the store's thread: each new seq's
record E (store.records) is built there, once, hashed into its leaf, and the tree's
new nodes and edge are written before the COMMIT. `load` at open builds the tree of a
store that holds seqs the tree does not (a store from before schema 5, or one written
with the tree off): from the stored records, a chunk per transaction, with progress.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from auditd.proofs.records import RecordSource
from auditd.proofs.tree import Tree, fill_gap
from auditd.store.records import dead_letter_record, event_leaf_hashes, record_bytes
from auditd.store.recovery import TREE_WAIT_KEY as _WAIT_KEY
from auditd.store.statements import transaction

log = structlog.get_logger("auditd.proofs.ledger")
_BUILD_CHUNK = 65_536
# For measuring ingest without the tree (`AUDITD_PROOFS=off auditd bench ...`): a store
# written so is rebuilt at its next start with the tree on.
OFF_ENV = "AUDITD_PROOFS"


def tree_enabled() -> bool:
    return os.environ.get(OFF_ENV, "").lower() not in ("off", "0", "no")


def _seq(pair: tuple[int, bytes]) -> int:
    return pair[0]


class Ledger:
    def __init__(self, partitions_dir: Path) -> None:
        self.tree = Tree()
        self.partitions_dir = partitions_dir
        self.enabled = tree_enabled()
        # Set while a damaged file moved aside holds seqs the tree has no leaf for yet:
        # a leaf is forever, so the tree waits for `auditd recover` to bring their rows
        # back rather than seal them as missing (a sentence for health, else None).
        self.waiting: str | None = None
        self.waiting_path: str | None = None

    def load(self, db: sqlite3.Connection, progress: Callable[[], None] | None = None) -> None:
        self.tree.load(db)
        if self._still_waiting(db):
            return
        self.catch_up(db, progress)

    def catch_up(self, db: sqlite3.Connection,
                 progress: Callable[[], None] | None = None) -> None:
        """Add the leaves of every committed seq the tree lacks (from the stored
        records; a seq with none gets a `missing` dead letter)."""
        through = _stored_through(db)
        if self.enabled and through > self.tree.size:
            self._build(db, through, progress)

    def wait_for(self, db: sqlite3.Connection, path: str, through_seq: int) -> None:
        """Hold the tree below `through_seq` while `path` (a damaged database moved
        aside) exists: its rows can still be recovered into their seqs."""
        if not self.enabled or through_seq <= self.tree.size:
            return
        with transaction(db):
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (_WAIT_KEY, json.dumps({"path": path, "through_seq": through_seq})))
        self._set_waiting(path, through_seq)

    def resume_step(self, db: sqlite3.Connection) -> bool:
        """One chunk of the catch-up that ends a wait (the rows are recovered): True
        once the tree covers every stored seq and the wait is over. A chunk a call, so
        the writer's batches go on between them; they add no leaves until the end."""
        through, size = _stored_through(db), self.tree.size
        if self.enabled and size < through:
            hi = min(through, size + _BUILD_CHUNK)
            with transaction(db):
                self.tree.extend(db, self._stored(db, size + 1, hi))
            self.tree.committed()
            log.info("tree_build_progress", through_seq=hi, of=through)
            if hi < through:
                return False
        with transaction(db):
            db.execute("DELETE FROM meta WHERE key = ?", (_WAIT_KEY,))
        if self.waiting is not None:
            log.info("tree_wait_ended", tree_size=self.tree.size)
        self.waiting = self.waiting_path = None
        return True

    def _still_waiting(self, db: sqlite3.Connection) -> bool:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_WAIT_KEY,)).fetchone()
        if row is None or not self.enabled:
            return False
        wait = json.loads(row[0])
        if wait["through_seq"] <= self.tree.size:
            return False
        if not Path(wait["path"]).exists():  # removed by an operator: its seqs are given up
            log.warning("tree_wait_abandoned", path=wait["path"],
                        note="the damaged file is gone: its seqs become missing dead letters")
            with transaction(db):
                db.execute("DELETE FROM meta WHERE key = ?", (_WAIT_KEY,))
            return False
        self._set_waiting(wait["path"], wait["through_seq"])
        return True

    def _set_waiting(self, path: str, through_seq: int) -> None:
        self.waiting_path = path
        self.waiting = (
            f"the tree waits at seq {self.tree.size + 1}: seqs through {through_seq} are in "
            f"the damaged database {path}; `auditd recover {path}` brings them back and the "
            "tree catches up (or delete the file and restart to give them up)")
        log.warning("tree_waiting", path=path, through_seq=through_seq,
                    tree_size=self.tree.size)

    def _build(self, db: sqlite3.Connection, through: int,
               progress: Callable[[], None] | None) -> None:
        started, first = time.monotonic(), self.tree.size + 1
        log.info("tree_build_started", from_seq=first, through_seq=through)
        while self.tree.size < through:
            lo = self.tree.size + 1
            hi = min(through, lo + _BUILD_CHUNK - 1)
            with transaction(db):
                self.tree.extend(db, self._stored(db, lo, hi))
            self.tree.committed()
            if progress is not None:
                progress()
            log.info("tree_build_progress", through_seq=hi, of=through)
        log.info("tree_built", from_seq=first, through_seq=through,
                 seconds=round(time.monotonic() - started, 1))

    def _stored(self, db: sqlite3.Connection, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """The stored records of seqs lo..hi; a seq with none gets a `missing` dead
        letter (inside the caller's transaction)."""
        source = RecordSource(db, self.partitions_dir)
        try:
            got = dict(source.records(lo, hi))
        finally:
            source.close()
        return [(seq, got.get(seq) or fill_gap(db, seq)) for seq in range(lo, hi + 1)]

    def extend(self, db: sqlite3.Connection, events: Sequence[Any],
               dead: Sequence[Any]) -> None:
        if not self.enabled or self.waiting is not None:
            return
        size = self.tree.size
        if not dead and events and events[0].seq == size + 1 \
                and events[-1].seq == size + len(events):
            self.tree.append_leaves(db, event_leaf_hashes(events))  # the writer's case
            return
        pairs = [(e.seq, record_bytes(e)) for e in events if e.seq > size]
        letters = [(d.seq, dead_letter_record(d.seq, d.code, d.reason, d.raw))
                   for d in dead if d.seq is not None and d.seq > size]
        if letters:  # Gaps travel in the batch between events: merge them in seq order
            pairs = sorted(pairs + letters, key=_seq)
        if pairs and pairs[0][0] > size + 1:
            # Seqs below the batch that the tree lacks were stored another way (rows a
            # recover copied in): their stored records are their leaves.
            pairs = self._stored(db, size + 1, pairs[0][0] - 1) + pairs
        self.tree.extend(db, pairs)

    def rolled_back(self) -> None:
        self.tree.rolled_back()

    def committed(self) -> None:
        self.tree.committed()


def _stored_through(db: sqlite3.Connection) -> int:
    """The highest seq the store holds: committed_seq, or above it the rows a recover
    copied in (it does not move committed_seq)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
    committed = int(row[0] or 0) if row else 0
    stored = db.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
    return max(committed, int(stored))
