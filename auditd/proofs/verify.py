"""`auditd verify`: the store's records against its tree and its signed checkpoints.

One snapshot of auditd.db fixes what is verified: its newest checkpoint (size N), every
checkpoint stored before it, and the catalog. Seqs 1..N (or further, up to a given or
remembered checkpoint's size) are read by worker processes in ranges, each leaf checked
against the fingerprint the tree stored when it was committed; the roots at every
checkpoint's size are then rebuilt from the ranges' tile hashes and compared with the
signed ones. Seqs past N are checked against their stored leaves too (their records
and leaves were committed together) and reported as not yet checkpointed: a live
store verifies without false alarms.

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

from auditd.proofs import prune_point
from auditd.proofs.merkle import fold, node_hash
from auditd.proofs.notes import Checkpoint, NoteError, VerifierKey, verify_checkpoint
from auditd.proofs.prune_point import PrunePoint
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
    # The compact range at the newest checkpoint's size, once verified: what `--state`
    # remembers, so that the next run reads only the seqs after it.
    compact: tuple[bytes, ...] = ()

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
    pruned: PrunePoint | None  # retention deleted seqs 1..pruned.size


def read_snapshot(db_path: Path) -> Snapshot:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")
        stored = [(int(s), bytes(r), str(t)) for s, r, t in db.execute(
            "SELECT size, root, text FROM checkpoints ORDER BY id")]
        edge = load_edge(db)
        row = db.execute("SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
        pruned = prune_point.load(db)
        db.execute("COMMIT")
    finally:
        db.close()
    return Snapshot(stored[-1][2] if stored else None, stored, edge.size,
                    int(row[0] or 0) if row else 0, bytes(edge.fingerprints), pruned)


def integrity(db_path: Path) -> str | None:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
    finally:
        db.close()
    return None if rows == ["ok"] else "; ".join(rows[:5])


def verify_store(storage: Path, vkey: VerifierKey, *, given: str | None = None,
                 workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 db_name: str = "auditd.db",
                 resume: tuple[str, list[bytes]] | None = None) -> Report:
    """Verify the store under `storage` against checkpoints signed by `vkey`; `given`
    is a checkpoint from outside (a remembered or published one) the store must be
    consistent with. `db_name`: the database's name there (a backup's may differ; its
    partitions are always in `partitions/` beside it). `resume`: a checkpoint verified
    before and the compact range at its size (`--state`): only the seqs after it are
    read, the roots above it rebuilt from that compact range."""
    started = time.monotonic()
    report = Report()
    try:
        _verify(storage, vkey, given, workers, progress, report, db_name, resume)
    except _Stop as stop:
        report.status, report.finding = stop.status, stop.finding
    report.seconds = time.monotonic() - started
    return report


def _verify(storage: Path, vkey: VerifierKey, given: str | None, workers: int | None,
            progress: Callable[[int, int], None] | None, report: Report,
            db_name: str, resume: tuple[str, list[bytes]] | None) -> None:
    db_path = storage / db_name
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
    floor = _check_prune_point(snap.pruned, vkey, report)
    start = snap.pruned
    resumed = _resume_point(resume, vkey)
    if resumed is not None and resumed.size > floor and resumed.size <= newest.size:
        start, floor = resumed, resumed.size
        report.notes.append(f"incremental: seqs 1..{floor} were verified by an earlier "
                            "run (--state); their checkpoint's root is the start here")
    # Below the prune point only signatures can be checked: the records are gone.
    checkpoints = {size: root for size, root in checkpoints.items() if size >= floor}
    target = newest.size
    if outside is not None:
        if outside.size > newest.size:
            report.notes.append(f"the given checkpoint ({outside.size}) is newer than the "
                                f"store's newest ({newest.size})")
        target = max(target, outside.size)
        if outside.size < floor:
            report.notes.append(f"the given checkpoint ({outside.size}) is older than the "
                                f"prune point ({floor}): retention deleted what it covers, "
                                "so only its signature is checked")
            outside = None
        elif start is not None and outside.size == floor and outside.root != start.root:
            # The start is the prune point, or the checkpoint an earlier run verified
            # (--state), which may lie above a prune point: compare with that one.
            what = "prune point" if start is snap.pruned else "remembered checkpoint"
            raise _tampered("inconsistent history", f"the {what} at size {floor} has "
                            "another root than the given checkpoint")
        elif checkpoints.get(outside.size, outside.root) != outside.root:
            raise _tampered("inconsistent history", f"the store's checkpoint of size "
                            f"{outside.size} has another root than the given one")
    sizes = {*checkpoints, target} | ({outside.size} if outside is not None else set())
    results = _scan_all(db_path, storage / "partitions", target, snap, sizes, workers,
                        progress, floor)
    problems = sorted((p for r in results for p in r.problems), key=lambda p: p.seq)
    held = sum(r.records for r in results)
    if problems:
        first = problems[0]
        if first.kind == "missing" and _runs_to_end(problems, first.seq, target):
            raise _tampered("truncated", f"seqs {first.seq}..{target} are gone: the store "
                            f"ends before what checkpoint {target} covers", first.seq)
        raise _tampered(first.kind, first.detail, first.seq)
    roots, report.compact = _roots_at(results, sorted(sizes - {floor} if floor else sizes),
                                      start)
    if start is not None:
        roots[floor] = start.root
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
    _check_tail(db_path, storage / "partitions", target, snap, workers, report)


def _check_tail(db_path: Path, partitions: Path, target: int, snap: Snapshot,
                workers: int | None, report: Report) -> None:
    """The records past what any checkpoint covers, against the leaves the tree stored
    with them (one transaction wrote both, so a live store gives no false alarm): an
    edit there is found now, not only once a checkpoint signs it. Nothing signs these
    leaves yet, so one rewritten with its record is found only by a later checkpoint's
    root (this is what `not_yet_checkpointed` counts)."""
    if snap.tree_size <= target:
        return
    results = _scan_all(db_path, partitions, snap.tree_size, snap, set(), workers, None,
                        target)
    problems = sorted((p for r in results for p in r.problems), key=lambda p: p.seq)
    if problems:
        first = problems[0]
        raise _tampered(first.kind, f"{first.detail} (past the newest checkpoint, size "
                        f"{target}: no signature covers it yet)", first.seq)
    tail = sum(r.records for r in results)
    report.notes.append(f"seqs {target + 1}..{snap.tree_size} are past the newest "
                        f"checkpoint: {tail} records checked against their leaves, "
                        "not yet against a signed root")


def _check_prune_point(point: PrunePoint | None, vkey: VerifierKey, report: Report) -> int:
    """The prune point's signed checkpoint must hold its compact range's root; the
    size below which records are retention's, not missing (0: nothing pruned)."""
    if point is None:
        return 0
    try:
        signed = verify_checkpoint(point.checkpoint, vkey)
    except NoteError as exc:
        raise _tampered("forged checkpoint", f"the prune point's checkpoint: {exc}") from None
    if signed.size != point.size or signed.root != point.root:
        raise _tampered("modified", f"the prune point at size {point.size} does not hold "
                        "the root its checkpoint signs")
    report.notes.append(f"seqs 1..{point.size} were deleted by retention (prune point)")
    return point.size


def _resume_point(resume: tuple[str, list[bytes]] | None,
                  vkey: VerifierKey) -> PrunePoint | None:
    """The remembered start, if it holds together (else a full run: never an error)."""
    if resume is None:
        return None
    text, compact = resume
    try:
        signed = verify_checkpoint(text, vkey)
        point = PrunePoint(signed.size, tuple(compact), text)
        ok = len(compact) == len(point.nodes()) and point.root == signed.root
    except (NoteError, ValueError):
        return None
    return point if ok else None


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
              progress: Callable[[int, int], None] | None, floor: int) -> list[RangeResult]:
    """Seqs floor+1..target in ranges of RANGE_SEQS (the first one cut by the prune
    point, the rest aligned)."""
    wanted = frozenset((s - 1) >> TILE_HEIGHT for s in sizes if s % TILE_WIDTH)
    aligned = range(floor // RANGE_SEQS * RANGE_SEQS + RANGE_SEQS + 1, target + 1, RANGE_SEQS)
    starts = [floor + 1, *aligned]
    tasks = [RangeTask(str(db_path), str(partitions), lo,
                       min(target, (lo - 1) // RANGE_SEQS * RANGE_SEQS + RANGE_SEQS),
                       wanted, snap.tree_size >> TILE_HEIGHT, snap.edge_fingerprints)
             for lo in starts if lo <= target]
    count = workers if workers is not None else min(len(tasks), os.cpu_count() or 1)
    done = 0
    if count <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(scan_range(task))
            done += task.last - task.first + 1
            if progress is not None:
                progress(done, target - floor)
        return results
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(count, mp_context=context) as pool:
        futures = [pool.submit(scan_range, task) for task in tasks]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            done += result.last - result.first + 1
            if progress is not None:
                progress(done, target - floor)
        return [f.result() for f in futures]


def _roots_at(results: list[RangeResult], sizes: list[int],
              start: PrunePoint | None) -> tuple[dict[int, bytes], tuple[bytes, ...]]:
    """The tree's root at each size (ascending, none below the start: a prune point or
    a remembered checkpoint), from the start's compact range, the ranges' tile hashes
    and their edge leaves; and the compact range at the last size."""
    roots: dict[int, bytes] = {}
    last = tuple(start.compact) if start is not None else ()
    compact = list(start.compact) if start is not None else []  # of the first `count`
    count = first_leaf = start.size if start is not None else 0
    edge_leaves = {t: leaves for r in results for t, leaves in r.edge_leaves.items()}
    tile_hashes = (h for r in results for h in r.tiles)

    def leaf(index: int) -> bytes:
        tile = index >> TILE_HEIGHT
        return edge_leaves[tile][index - max(tile << TILE_HEIGHT, first_leaf)]

    for size in sizes:
        whole = size >> TILE_HEIGHT << TILE_HEIGHT
        while count < whole:
            if count % TILE_WIDTH == 0:
                _append(compact, count, next(tile_hashes), TILE_HEIGHT)
                count += TILE_WIDTH
            else:  # the tile the prune point cuts: its remaining leaves one by one
                _append(compact, count, leaf(count), 0)
                count += 1
        partial = list(compact)
        for index in range(count, size):
            _append(partial, index, leaf(index), 0)
        roots[size] = fold(partial)
        last = tuple(partial)
    return roots, last


def _append(compact: list[bytes], count: int, h: bytes, height: int) -> None:
    """Append the subtree `h` of 2**height leaves to the compact range of the first
    `count` leaves (a multiple of 2**height)."""
    count >>= height
    while count & 1:
        h = node_hash(compact.pop(), h)
        count >>= 1
    compact.append(h)
