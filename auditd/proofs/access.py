"""Proofs for the status socket: each from its own read-only snapshot, on a thread;
a caller restricted to its own uid gets proofs of its own events only."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

from auditd.proofs.prove import ProofError, consistency, inclusion, record_uid


def _connect(storage: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{storage / 'auditd.db'}?mode=ro", uri=True,
                           isolation_level=None)


def inclusion_for(storage: Path, seq: int, size: int | None,
                  uid: int | None) -> dict[str, Any]:
    db = _connect(storage)
    try:
        doc = inclusion(db, storage / "partitions", seq, size)
    finally:
        db.close()
    if uid is not None and record_uid(base64.b64decode(doc["record"])) != uid:
        raise ProofError(403, "forbidden", f"seq {seq} was not written by uid {uid}: "
                         "only readers get proofs of other uids' events")
    return doc


def consistency_for(storage: Path, old: int, new: int) -> dict[str, Any]:
    db = _connect(storage)
    try:
        return consistency(db, storage / "partitions", old, new)
    finally:
        db.close()
