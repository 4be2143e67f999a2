"""`auditd export`: a store's records out, from one read snapshot (proofs.md, "Export
files"; docs/design/export.md).

The range ends at a stored checkpoint: the newest one (which a running daemon was asked
to issue just before, `POST /checkpoint`), or `--until-seq` below it, in which case the
smallest stored checkpoint covering the range is named (one of exactly that size makes
the file verifiable on its own). Events after the newest checkpoint are not exported:
no checkpoint vouches for them yet.

The snapshot is a read transaction on a read-only connection: the daemon's writer never
waits for it (WAL), though its WAL checkpoints cannot pass the snapshot until the export
ends. Records come from `RecordSource` (sealed partitions verbatim, hot rows encoded the
way the daemon encoded them), so a MessagePack export holds the records E byte for byte.
"""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from auditd.errors import AuditdError
from auditd.lifecycle import jsonl
from auditd.lifecycle.files import Output
from auditd.lifecycle.manifest import FORMAT, VERSION, Manifest, Prefix, encode
from auditd.lifecycle.progress import Progress
from auditd.proofs import prune_point
from auditd.proofs.checkpointer import host_id_of
from auditd.proofs.prune_point import pruned_through
from auditd.proofs.records import RecordSource
from auditd.query.spec import QuerySpec, matches
from auditd.store.records import event_from_record, is_dead_letter
from auditd.store.sealing.catalog import PARTITIONS_DIR

_CHUNK = 4096


class ExportError(AuditdError):
    """The store cannot be exported as asked (no checkpoint, a gap, no database)."""


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    bytes_written: int
    seconds: float
    newer_than_checkpoint: int  # committed seqs past the checkpoint, left out


def read_snapshot(storage: Path) -> sqlite3.Connection:
    """A read-only connection to the store's database inside one read transaction."""
    path = storage / "auditd.db"
    if not path.is_file():
        raise ExportError(f"no database at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=False)
    db.execute("BEGIN")
    db.execute("SELECT 1 FROM meta LIMIT 1").fetchone()  # the snapshot starts here
    return db


def _checkpoint_for(db: sqlite3.Connection, until_seq: int | None) -> tuple[int, str, int]:
    """(last_seq, checkpoint text, newest checkpoint size)."""
    newest = db.execute("SELECT max(size) FROM checkpoints").fetchone()[0]
    if newest is None:
        raise ExportError("the store has no signed checkpoint yet, so nothing can be "
                          "exported with one: start the daemon (it signs one within "
                          "proofs.checkpoint_every) and export again")
    last = int(newest) if until_seq is None else min(int(newest), until_seq)
    row = db.execute("SELECT text FROM checkpoints WHERE size >= ? ORDER BY size, id DESC"
                     " LIMIT 1", (max(last, 1),)).fetchone()
    return last, str(row[0]), int(newest)


def filters_of(spec: QuerySpec, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The manifest's `filters`: each given filter's values, times made absolute."""
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        if name in ("since", "until"):
            ns = spec.since_ns if name == "since" else spec.until_ns
            assert ns is not None
            value = jsonl.rfc3339(ns)
        found.setdefault(name, []).append(value)
    return found


def _records(source: RecordSource, first: int, last: int,
             complete: bool) -> Iterator[list[tuple[int, bytes]]]:
    """The range's records in chunks; a missing seq of a complete export is an error."""
    for lo in range(first, last + 1, _CHUNK):
        hi = min(last, lo + _CHUNK - 1)
        chunk = list(source.records(lo, hi))
        # Seqs come ascending and once each: the length and the ends say "no gap".
        if complete and (len(chunk) != hi - lo + 1 or chunk[0][0] != lo):
            held = {seq for seq, _ in chunk}
            missing = next(seq for seq in range(lo, hi + 1) if seq not in held)
            why = source.unreadable.get(missing, "no event or dead letter holds it")
            raise ExportError(f"seq {missing} has no readable record ({why}): a complete "
                              "export cannot skip it; run `auditd verify`")
        yield chunk


def export_store(storage: Path, output: Output, *, fmt: str, spec: QuerySpec | None,
                 filters: dict[str, list[str]], until_seq: int | None) -> ExportResult:
    """Write the manifest and the records of [first, last_seq] (matching `spec`, if any):
    first is 1, or the seq after retention's prune point."""
    db = read_snapshot(storage)
    source = RecordSource(db, storage / PARTITIONS_DIR)
    try:
        last, checkpoint, newest = _checkpoint_for(db, until_seq)
        committed = int(db.execute("SELECT value FROM meta WHERE key = 'committed_seq'")
                        .fetchone()[0])
        first = pruned_through(db) + 1  # retention deleted what lies below
        manifest, seconds = _write(db, source, output, fmt, spec, filters, first, last,
                                   checkpoint, Progress("export", max(0, last - first + 1)))
    finally:
        source.close()
        db.close()
    size = output.commit()
    return ExportResult(manifest, size, seconds, max(0, committed - newest))


def archive_range(storage: Path, output: Output, first: int, last: int,
                  checkpoint: str) -> ExportResult:
    """Retention's archive of seqs [first, last] before it deletes them: a complete
    MessagePack export of exactly that range (`output` a .zst file), durable when this
    returns. `checkpoint` is of size `last` (the prune point's), so that the file
    rebuilds its root on its own, with the previous prune point as its prefix."""
    db = read_snapshot(storage)
    source = RecordSource(db, storage / PARTITIONS_DIR)
    try:
        # The daemon does this: nothing to redraw, its log line says what was archived.
        quiet = Progress("archive", last - first + 1, io.StringIO())
        manifest, seconds = _write(db, source, output, "msgpack", None, {}, first, last,
                                   checkpoint, quiet)
    finally:
        source.close()
        db.close()
    return ExportResult(manifest, output.commit(), seconds, 0)


def _write(db: sqlite3.Connection, source: RecordSource, output: Output, fmt: str,
           spec: QuerySpec | None, filters: dict[str, list[str]], first: int, last: int,
           checkpoint: str, progress: Progress) -> tuple[Manifest, float]:
    count = max(0, last - first + 1) if spec is None else _count(source, first, last, spec)
    point = prune_point.load(db)
    prefix = None if point is None or point.size != first - 1 else Prefix(
        point.size, list(point.compact), point.checkpoint)
    manifest = Manifest(FORMAT, VERSION, host_id_of(db), first, last, count, filters,
                        checkpoint, prefix)
    output.write(encode(manifest, fmt))
    for chunk in _records(source, first, last, spec is None):
        output.write(_encode_chunk(chunk, fmt, spec))
        progress.step(len(chunk))
    return manifest, progress.finish()


def _count(source: RecordSource, first: int, last: int, spec: QuerySpec) -> int:
    """Matches in the range: a first pass (the snapshot does not move between them)."""
    return sum(1 for chunk in _records(source, first, last, False)
               for _, record in chunk if _selected(record, spec))


def _selected(record: bytes, spec: QuerySpec) -> bool:
    return not is_dead_letter(record) and matches(event_from_record(record), spec)


_json_encode = msgspec.json.Encoder().encode


def _encode_chunk(chunk: list[tuple[int, bytes]], fmt: str, spec: QuerySpec | None) -> bytes:
    if spec is not None:
        chunk = [(seq, record) for seq, record in chunk if _selected(record, spec)]
    if fmt == "msgpack":
        return b"".join(record for _, record in chunk)
    return b"".join(_json_encode(jsonl.record_json(record)) + b"\n" for _, record in chunk)
