"""SQLite's errors judged in one place: what the same work would meet if it were tried again.

By the primary result code (`exc.sqlite_errorcode & 0xFF`): busy, locked, I/O, full and
protocol errors pass by themselves (TransientStoreError: retry with backoff); a
constraint, a value too big, a type mismatch or a parameter out of range will meet the
same data again (PermanentStoreError: dead-letter it); anything else, an error without
a code included, is a fault of the database itself that an operator must clear
(StoreFaultError: corrupt, not a database, read-only, cannot be opened, no
permission...).
"""

from __future__ import annotations

import sqlite3

from auditd.errors import (
    PermanentStoreError,
    StoreError,
    StoreFaultError,
    TransientStoreError,
)

# Primary result codes (exc.sqlite_errorcode & 0xFF). Transient: the same work may
# succeed later. Permanent: the same data will fail again (dead-letter it). Anything
# else, an error without a code included, is a fault of the database itself.
_TRANSIENT = {5, 6, 10, 13, 15}  # BUSY, LOCKED, IOERR, FULL, PROTOCOL
_PERMANENT = {18, 19, 20, 25}  # TOOBIG, CONSTRAINT, MISMATCH, RANGE
_DAMAGED = {11, 26}  # CORRUPT, NOTADB


def classify(exc: sqlite3.Error, what: str) -> StoreError:
    """The project's error for a sqlite3 one: the single place SQLite errors are judged."""
    extended = getattr(exc, "sqlite_errorcode", None)
    code = extended & 0xFF if isinstance(extended, int) else None
    error: StoreError
    if code in _TRANSIENT:
        error = TransientStoreError(f"{what}: {exc}")
    elif code in _PERMANENT:
        error = PermanentStoreError(f"{what}: {exc}")
    else:
        name = getattr(exc, "sqlite_errorname", None) or "no SQLite result code"
        error = StoreFaultError(f"{what}: {exc} ({name})", code=name,
                                damaged=code in _DAMAGED)
    error.__cause__ = exc
    return error
