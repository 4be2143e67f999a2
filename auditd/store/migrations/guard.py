"""What `auditd migrate` checks and keeps before it touches a store.

- `database_holder`: whether another process has the database open. In WAL mode every
  SQLite connection holds a read lock on the "DMS" byte of the `-shm` file for as long
  as it is open (sqlite.org/walformat.html, "the DMS lock" at offset 128), and a
  POSIX F_GETLK asks the kernel who holds it without taking anything: the daemon's
  connections, or any other program that has the file open, are seen even when no
  socket of theirs answers.
- `backup_beside`: a copy of the whole database through SQLite's backup API (one read
  transaction: consistent even with a WAL), written beside it and fsynced with its
  directory before the migration may start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import struct
import time
from pathlib import Path

from auditd.errors import StoreError
from auditd.store.durable import fsync_directory, fsync_path

_DMS_OFFSET = 128
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (native alignment, as fcntl(2) takes it).
_FLOCK = struct.Struct("hhqqi")


def database_holder(db: Path) -> int | None:
    """The pid of a process that has `db` open (0 when it is in another pid namespace),
    None when none has. Must be called before this process opens the database: a
    process never conflicts with its own locks."""
    try:
        fd = os.open(f"{db}-shm", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # no -shm: no connection in WAL mode has it open
        return None
    try:
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _DMS_OFFSET, 1, 0)
        kind, _whence, _start, _length, pid = _FLOCK.unpack(
            fcntl.fcntl(fd, fcntl.F_GETLK, request))
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else pid


def process_name(pid: int) -> str:
    """`pid 1234 (auditd)`, or just the pid when /proc does not tell."""
    if pid <= 0:
        return "a process in another pid namespace"
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return f"pid {pid} ({handle.read().strip()})"
    except OSError:
        return f"pid {pid}"


def backup_beside(db: Path, from_version: int, to_version: int) -> Path:
    """Copy `db` to `<db>.pre-migrate-<from>-<to>-<time>` (never over an existing file),
    fsync it and its directory, and return where it is."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{db.name}.pre-migrate-{from_version}-{to_version}-{stamp}"
    target, number = db.with_name(base), 1
    while True:
        try:  # claim the name: O_EXCL, so two runs in one second never share a file
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            number += 1
            target = db.with_name(f"{base}-{number}")
    source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
    except sqlite3.Error as exc:
        with contextlib.suppress(OSError):
            target.unlink()
        raise StoreError(f"backup of {db} to {target} failed: {exc}; nothing migrated") \
            from exc
    finally:
        source.close()
    fsync_path(target)
    fsync_directory(target.parent)
    return target
