"""What the store's writer calls, per batch, to keep the tree (store.BatchLedger).

`extend` runs inside the batch's transaction on the store's thread: each new seq's
record E (store.records) is built there, once, hashed into its leaf, and the tree's
new nodes and edge are written before the COMMIT. `load` at open builds the tree of a
store that holds seqs the tree does not (a store from before schema 5, or one written
with the tree off): from the stored records, a chunk per transaction, with progress.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from auditd.proofs.records import RecordSource
from auditd.proofs.tree import Tree, fill_gap
from auditd.store.records import dead_letter_record, record_bytes
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

    def load(self, db: sqlite3.Connection, progress: Callable[[], None] | None = None) -> None:
        self.tree.load(db)
        row = db.execute("SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
        committed = int(row[0] or 0) if row else 0
        if self.enabled and committed > self.tree.size:
            self._build(db, committed, progress)

    def _build(self, db: sqlite3.Connection, through: int,
               progress: Callable[[], None] | None) -> None:
        started, first = time.monotonic(), self.tree.size + 1
        log.info("tree_build_started", from_seq=first, through_seq=through)
        while self.tree.size < through:
            lo = self.tree.size + 1
            hi = min(through, lo + _BUILD_CHUNK - 1)
            with transaction(db):
                source = RecordSource(db, self.partitions_dir)
                try:
                    got = dict(source.records(lo, hi))
                finally:
                    source.close()
                pairs = [(seq, got.get(seq) or fill_gap(db, seq)) for seq in range(lo, hi + 1)]
                self.tree.extend(db, pairs)
            self.tree.committed()
            if progress is not None:
                progress()
            log.info("tree_build_progress", through_seq=hi, of=through)
        log.info("tree_built", from_seq=first, through_seq=through,
                 seconds=round(time.monotonic() - started, 1))

    def extend(self, db: sqlite3.Connection, events: Sequence[Any],
               dead: Sequence[Any]) -> None:
        if not self.enabled:
            return
        size = self.tree.size
        pairs = [(e.seq, record_bytes(e)) for e in events if e.seq > size]
        letters = [(d.seq, dead_letter_record(d.seq, d.code, d.reason, d.raw))
                   for d in dead if d.seq is not None and d.seq > size]
        if letters:  # Gaps travel in the batch between events: merge them in seq order
            pairs = sorted(pairs + letters, key=_seq)
        self.tree.extend(db, pairs)

    def rolled_back(self) -> None:
        self.tree.rolled_back()

    def committed(self) -> None:
        self.tree.committed()
