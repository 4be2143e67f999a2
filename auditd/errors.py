"""The exception tree: every error auditd raises on purpose is an AuditdError."""

from __future__ import annotations


class AuditdError(Exception):
    """Root of auditd's own errors."""


class ConfigError(AuditdError):
    """A config file or value is wrong; the message names the key, value and expectation."""


class ProtocolError(AuditdError):
    """A frame breaks the wire protocol; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


class StoreError(AuditdError):
    """A database operation failed."""


class TransientStoreError(StoreError):
    """Busy, locked, I/O error or disk full: the same work may succeed later."""


class PermanentStoreError(StoreError):
    """Constraint or data error: the same work will fail again; dead-letter it."""


class StoreFaultError(StoreError):
    """The database cannot be used as it is: corrupt, not a database, read-only, cannot be
    opened, no permission, or an error SQLite gave no code for. Retrying the same work
    does not help until an operator acts; health says `failing`.

    `code` is SQLite's name for the error (`SQLITE_CORRUPT`...). `damaged` when the
    file itself is damaged (CORRUPT, NOTADB): the start-up check moves it aside.
    """

    def __init__(self, message: str, *, code: str, damaged: bool) -> None:
        super().__init__(message)
        self.code = code
        self.damaged = damaged


class BatchSkippedError(StoreError):
    """A batch queued behind one that failed: not attempted, so that nothing commits
    ahead of an earlier seq."""


class JournalError(AuditdError):
    """The journal could not be written (disk full, I/O error)."""


class DaemonRunningError(AuditdError):
    """Another live daemon already listens on the socket."""


class ClientError(AuditdError):
    """Base of the client library's errors."""


class RejectedError(ClientError):
    """The daemon refused one or more events; `rejected` lists [index, code, message]."""

    def __init__(self, message: str, rejected: list[tuple[int, str, str]],
                 reply: dict[str, object]) -> None:
        super().__init__(message)
        self.rejected = rejected
        self.reply = reply
