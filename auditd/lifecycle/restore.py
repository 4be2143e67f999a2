"""`auditd restore SRC`: put a backup in place of the store, daemon stopped.

Nothing is replaced until the backup has verified (`auditd verify` on it, with the
store's key or `--vkey`): a damaged or edited backup is refused with verify's reason.
Given `--checkpoint` (one seen earlier, e.g. published off the host), a backup whose
newest checkpoint is smaller is refused as older than what the world has seen, unless
`--force`; one at least as new must hold that checkpoint's root at its size.

Then the backup and the partitions its catalog names are copied into a staging
directory beside the store and fsynced; only then does the live database (with its
WAL), its partitions and the journal move aside into `restore-replaced-<time>/` under
`storage.path` (a rename: nothing is lost, and `auditd recover <that>/auditd.db` brings
back events newer than the backup), and the staged files are renamed in. A failure
while copying leaves the live store untouched; one during the renames puts it back.
The journal goes aside too: it belongs to the replaced store's seqs, and replaying it
onto the backup would mix two histories.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditd.errors import AuditdError
from auditd.proofs.notes import NoteError, VerifierKey, verify_checkpoint
from auditd.proofs.verify import Report, read_snapshot, verify_store
from auditd.store.durable import fsync_directory
from auditd.store.sealing.catalog import PARTITIONS_DIR

DB_NAME = "auditd.db"
_ASIDE = ("auditd.db", "auditd.db-wal", "auditd.db-shm", PARTITIONS_DIR, "journal")


class RestoreRefused(AuditdError):
    """The backup is not put in place; the message says why."""


@dataclass(frozen=True)
class Restored:
    report: Report  # the backup's verification
    replaced: Path | None  # where the store it replaced went
    files: int  # database and partition files copied in

    def document(self) -> dict[str, Any]:
        checkpoint = self.report.checkpoint
        return {"restored": True, "replaced": None if self.replaced is None
                else str(self.replaced), "files": self.files,
                "checkpoint": None if checkpoint is None else {
                    "size": checkpoint.size, "root": checkpoint.root.hex(),
                    "text": checkpoint.text},
                "verify": self.report.document()}


def check_backup(source: Path, vkey: VerifierKey, given: str | None,
                 force: bool) -> Report:
    """Verify the backup at `source` (a database file, `partitions/` beside it);
    RestoreRefused when it does not verify or is older than `given`."""
    if not source.is_file():
        raise RestoreRefused(f"{source}: no such file")
    outside = None
    if given is not None:
        try:
            outside = verify_checkpoint(given, vkey)
        except NoteError as exc:
            raise RestoreRefused(f"--checkpoint: {exc}") from None
    try:
        newest = read_snapshot(source).stored
    except sqlite3.Error as exc:
        raise RestoreRefused(f"{source}: not a readable auditd database: {exc}") from None
    newest_size = newest[-1][0] if newest else 0
    older = outside is not None and outside.size > newest_size
    if older and not force:
        raise RestoreRefused(
            f"{source} is older than the given checkpoint: its newest checkpoint covers "
            f"{newest_size} events, the given one {outside.size if outside else 0}; "
            "restoring it would take back history the world has seen (--force to do it)")
    report = verify_store(source.parent, vkey, given=None if older else given,
                          db_name=source.name)
    if report.status != "verified":
        finding = report.finding
        why = finding.detail if finding is not None else report.status
        raise RestoreRefused(f"{source} does not verify ({report.status}: {why}); "
                             "nothing was replaced")
    return report


def restore(storage: Path, source: Path, report: Report) -> Restored:
    """Copy the verified backup into a staging directory beside the store (fsynced),
    then swap: the live store renamed aside, the staged files renamed in. A failure
    while copying leaves the live store as it was; one during the swap puts it back."""
    storage.mkdir(parents=True, exist_ok=True)
    catalog = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        files = [str(name) for (name,) in catalog.execute("SELECT file FROM partitions")]
    finally:
        catalog.close()
    staging = storage / f".restore-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / PARTITIONS_DIR).mkdir(parents=True)
        for name in files:
            _copy(source.parent / PARTITIONS_DIR / name, staging / PARTITIONS_DIR / name)
        _copy(source, staging / DB_NAME)
        fsync_directory(staging / PARTITIONS_DIR)
        fsync_directory(staging)
        aside, moved = _set_aside(storage)
        try:
            os.replace(staging / DB_NAME, storage / DB_NAME)
            os.replace(staging / PARTITIONS_DIR, storage / PARTITIONS_DIR)
            fsync_directory(storage)
        except OSError:
            if aside is not None:
                for name in moved:  # the live store back where it was
                    with contextlib.suppress(OSError):
                        os.replace(aside / name, storage / name)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Restored(report, aside, len(files) + 1)


def _set_aside(storage: Path) -> tuple[Path | None, list[str]]:
    present = [name for name in _ASIDE if (storage / name).exists()]
    if not present:
        return None, []
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = storage / f"restore-replaced-{stamp}"
    aside.mkdir()
    moved = []
    for name in present:
        os.replace(storage / name, aside / name)
        moved.append(name)
    fsync_directory(aside)
    fsync_directory(storage)
    return aside, moved


def _copy(source: Path, target: Path) -> None:
    temp = target.with_name(f".{target.name}.restoring")
    shutil.copyfile(source, temp)
    with temp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, target)
