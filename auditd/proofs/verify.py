"""`auditd verify`: the store's records against its tree and its signed checkpoints.

One snapshot of auditd.db fixes what is verified: its newest checkpoint (size N), every
checkpoint stored before it, and the catalog. Seqs 1..N (or further, up to a given or
remembered checkpoint's size) are read by worker processes in ranges, each leaf checked
against the fingerprint the tree stored when it was committed; the roots at every
checkpoint's size are then rebuilt from the ranges' tile hashes and compared with the
signed ones. Seqs past N are reported as not yet checkpointed, never as errors, so a
live store verifies without false alarms.

Outcome: `verified` (exit 0), `tampered` (exit 1: the first bad seq and its kind) or
`unverifiable` (exit 2: no key, no database, no checkpoint to verify against).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditd.proofs.merkle import fold, node_hash
from auditd.proofs.notes import Checkpoint, NoteError, VerifierKey, verify_checkpoint
from auditd.proofs.scan import Problem, RangeResult, RangeTask, scan_range
from auditd.proofs.tree import TILE_HEIGHT, TILE_WIDTH, load_edge

RANGE_SEQS = 65_536


@dataclass(slots=True)
class Finding:
    kind: str  # modified missing reordered inserted truncated "forged checkpoint" ...
    detail: str
    seq: int | None = None

    def document(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "detail": self.detail}


@dataclass(slots=True)
class Report:
    status: str = "verified"  # verified | tampered | unverifiable
    finding: Finding | None = None
    checkpoint: Checkpoint | None = None
    verified_events: int = 0
    not_yet_checkpointed: int = 0
    checkpoints_checked: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"verified": 0, "tampered": 1}.get(self.status, 2)

    def document(self) -> dict[str, Any]:
        rate = self.verified_events / self.seconds if self.seconds > 0 else None
        return {
            "status": self.status,
            "problem": None if self.finding is None else self.finding.document(),
            "checkpoint": None if self.checkpoint is None else {
                "size": self.checkpoint.size, "time": self.checkpoint.time,
                "text": self.checkpoint.text},
            "verified_events": self.verified_events,
            "not_yet_checkpointed": self.not_yet_checkpointed,
            "checkpoints_checked": self.checkpoints_checked,
            "seconds": round(self.seconds, 3),
            "events_per_s": None if rate is None else round(rate, 1),
            "notes": self.notes,
        }


class _Stop(Exception):
    def __init__(self, status: str, finding: Finding) -> None:
        super().__init__(finding.detail)
        self.status, self.finding = status, finding


def _tampered(kind: str, detail: str, seq: int | None = None) -> _Stop:
    return _Stop("tampered", Finding(kind, detail, seq))


@dataclass(slots=True)
class Snapshot:
    newest: str | None
    stored: list[tuple[int, bytes, str]]  # every checkpoint: size, root, text
    tree_size: int
    committed: int
    edge_fingerprints: bytes


def read_snapshot(db_path: Path) -> Snapshot:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")
        stored = [(int(s), bytes(r), str(t)) for s, r, t in db.execute(
            "SELECT size, root, text FROM checkpoints ORDER BY id")]
        edge = load_edge(db)
        row = db.execute("SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
        db.execute("COMMIT")
    finally:
        db.close()
    return Snapshot(stored[-1][2] if stored else None, stored, edge.size,
                    int(row[0] or 0) if row else 0, bytes(edge.fingerprints))


def integrity(db_path: Path) -> str | None:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
    finally:
        db.close()
    return None if rows == ["ok"] else "; ".join(rows[:5])


def verify_store(storage: Path, vkey: VerifierKey, *, given: str | None = None,
                 workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Report:
    """Verify the store under `storage` against checkpoints signed by `vkey`; `given`
    is a checkpoint from outside (a remembered or published one) the store must be
    consistent with."""
    started = time.monotonic()
    report = Report()
    try:
        _verify(storage, vkey, given, workers, progress, report)
    except _Stop as stop:
        report.status, report.finding = stop.status, stop.finding
    report.seconds = time.monotonic() - started
    return report


def _verify(storage: Path, vkey: VerifierKey, given: str | None, workers: int | None,
            progress: Callable[[int, int], None] | None, report: Report) -> None:
    db_path = storage / "auditd.db"
    if not db_path.is_file():
        raise _Stop("unverifiable", Finding("no database", f"no database at {db_path}"))
    damage = integrity(db_path)
    if damage is not None:
        raise _tampered("modified", f"database integrity check failed: {damage}")
    snap = read_snapshot(db_path)
    outside = _check_given(given, vkey)
    if snap.newest is None:
        if outside is not None:
            raise _tampered("truncated", f"the store holds no checkpoint, but the given one "
                            f"covers {outside.size} events", 1)
        if snap.committed:
            raise _Stop("unverifiable", Finding(
                "no checkpoint", f"{snap.committed} events and no checkpoint yet"))
        report.notes.append("the store is empty")
        return
    checkpoints: dict[int, bytes] = {}
    for size, root, text in snap.stored:
        try:
            checkpoint = verify_checkpoint(text, vkey)
        except NoteError as exc:
            raise _tampered("forged checkpoint", str(exc)) from None
        if checkpoint.size != size or checkpoint.root != root:
            raise _tampered("forged checkpoint", f"the checkpoint stored at size {size} "
                            "does not say what its row says")
        if checkpoints.setdefault(size, root) != root:
            raise _tampered("inconsistent history", f"two checkpoints of size {size} "
                            "with different roots")
    report.checkpoint = newest = verify_checkpoint(snap.newest, vkey)
    report.checkpoints_checked = len(checkpoints)
    target = newest.size
    if outside is not None:
        if outside.size > newest.size:
            report.notes.append(f"the given checkpoint ({outside.size}) is newer than the "
                                f"store's newest ({newest.size})")
        target = max(target, outside.size)
        if checkpoints.get(outside.size, outside.root) != outside.root:
            raise _tampered("inconsistent history", f"the store's checkpoint of size "
                            f"{outside.size} has another root than the given one")
    results = _scan_all(db_path, storage / "partitions", target, snap,
                        {*checkpoints, target}, workers, progress)
    problems = sorted((p for r in results for p in r.problems), key=lambda p: p.seq)
    held = sum(r.records for r in results)
    if problems:
        first = problems[0]
        if first.kind == "missing" and _runs_to_end(problems, first.seq, target):
            raise _tampered("truncated", f"seqs {first.seq}..{target} are gone: the store "
                            f"ends before what checkpoint {target} covers", first.seq)
        raise _tampered(first.kind, first.detail, first.seq)
    roots = _roots_at(results, sorted({*checkpoints, target}))
    for size in sorted(checkpoints):
        if roots[size] != checkpoints[size]:
            raise _tampered("modified", f"the records' root at size {size} is not the "
                            "signed one (the stored tree was rewritten to match them)")
    if outside is not None and roots[outside.size] != outside.root:
        raise _tampered("inconsistent history", f"the store's first {outside.size} "
                        "records do not have the given checkpoint's root")
    if outside is not None and outside.size > newest.size:
        raise _tampered("inconsistent history", f"the store's newest checkpoint (size "
                        f"{newest.size}) is older than the given one (size {outside.size}): "
                        "newer checkpoints were removed", newest.size + 1)
    report.verified_events = held
    report.not_yet_checkpointed = max(0, snap.committed - newest.size)


def _check_given(text: str | None, vkey: VerifierKey) -> Checkpoint | None:
    if text is None:
        return None
    try:
        return verify_checkpoint(text, vkey)
    except NoteError as exc:
        raise _tampered("forged checkpoint", f"the given checkpoint: {exc}") from None


def _runs_to_end(problems: list[Problem], first: int, target: int) -> bool:
    missing = {p.seq for p in problems if p.kind == "missing"}
    # Workers report at most a few problems per range: a run that fills every range's
    # report up to the target counts as the whole tail.
    return all(seq in missing for seq in range(first, min(target, first + 10) + 1)) \
        and max(missing) >= min(target, first + 10)


def _scan_all(db_path: Path, partitions: Path, target: int, snap: Snapshot,
              sizes: set[int], workers: int | None,
              progress: Callable[[int, int], None] | None) -> list[RangeResult]:
    wanted = frozenset((s - 1) >> TILE_HEIGHT for s in sizes if s % TILE_WIDTH)
    tasks = [RangeTask(str(db_path), str(partitions), lo, min(target, lo + RANGE_SEQS - 1),
                       wanted, snap.tree_size >> TILE_HEIGHT, snap.edge_fingerprints)
             for lo in range(1, target + 1, RANGE_SEQS)]
    count = workers if workers is not None else min(len(tasks), os.cpu_count() or 1)
    done = 0
    if count <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(scan_range(task))
            done += task.last - task.first + 1
            if progress is not None:
                progress(done, target)
        return results
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(count, mp_context=context) as pool:
        futures = [pool.submit(scan_range, task) for task in tasks]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            done += result.last - result.first + 1
            if progress is not None:
                progress(done, target)
        return [f.result() for f in futures]


def _roots_at(results: list[RangeResult], sizes: list[int]) -> dict[int, bytes]:
    """The tree's root at each size, from the ranges' tile hashes and edge leaves."""
    roots: dict[int, bytes] = {}
    compact: list[bytes] = []  # over whole tiles, heights >= TILE_HEIGHT
    tiles_seen = 0
    pending = iter(sizes)
    size = next(pending, None)
    edge_leaves = {t: leaves for r in results for t, leaves in r.edge_leaves.items()}
    tile_hashes = (h for r in results for h in r.tiles)
    while size is not None:
        whole = size >> TILE_HEIGHT
        while tiles_seen < whole:
            _append(compact, tiles_seen, next(tile_hashes))
            tiles_seen += 1
        rest = size % TILE_WIDTH
        partial: list[bytes] = []
        if rest:
            leaves = edge_leaves[whole][:rest]
            for index, leaf in enumerate(leaves):
                _append(partial, index, leaf)
        roots[size] = fold(compact + partial)
        size = next(pending, None)
    return roots


def _append(compact: list[bytes], count: int, h: bytes) -> None:
    while count & 1:
        h = node_hash(compact.pop(), h)
        count >>= 1
    compact.append(h)

