"""AuditHandler: a logging.Handler that turns log records into auditd events.

    logging.getLogger("app").addHandler(AuditHandler(socket_path="/run/auditd/ingest.sock"))
    log.warning("quota exceeded", extra={"actor": "alice", "used": 93})

An event per record: `type` is the fixed `event_type`, else `type_prefix` + the level
(`log.warning`); `data` holds `level`, `logger`, `message`, `exception` (the formatted
traceback, with exc_info) and `stack` (with stack_info), then every `extra` field made
plain (plain.py). The `extra` fields `actor` and `target` become the event's own, else
the handler's; inside an audit() block the record links to it (correlation_id,
causation_id = the block's start event). emit() only buffers: see sender.py.
"""

from __future__ import annotations

import logging
from typing import Any

from auditd.client.audit import MAX_TYPE, default_sender, finish_event
from auditd.client.common import Event
from auditd.client.plain import checked_tags, plain, plain_str
from auditd.client.sender import BufferedSender

# The attributes every LogRecord has; any other attribute came from `extra`.
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
# Keys the handler sets in `data`: an `extra` field so named is kept as `extra.<name>`.
_OWN_KEYS = frozenset({"level", "logger", "message", "exception", "stack"})
# `extra` fields that are the event's own fields, not data.
_EVENT_KEYS = ("actor", "target")


class AuditHandler(logging.Handler):
    """Buffers an event per record for a BufferedSender; never waits for the daemon.

    With `socket_path`, the handler has a sender of its own (closed by close()); else it
    uses `sender`, else the process's default_sender() (close() only flushes those).
    `dropped` counts records lost to a full buffer, `rejected` those refused.
    """

    def __init__(self, level: int | str = logging.NOTSET, *, socket_path: str | None = None,
                 sender: BufferedSender | None = None, event_type: str | None = None,
                 type_prefix: str = "log.", actor: str | None = None,
                 target: str | None = None, tags: dict[str, str] | None = None,
                 close_timeout: float = 2.0, **sender_options: Any) -> None:
        super().__init__(level)
        if socket_path is not None and sender is not None:
            raise ValueError("AuditHandler: give socket_path or sender, not both")
        if sender_options and socket_path is None:
            raise ValueError(f"AuditHandler: {', '.join(sorted(sender_options))} only with "
                             "socket_path (a sender of its own)")
        self._owns_sender = socket_path is not None
        self.sender = (BufferedSender(socket_path, close_timeout=close_timeout,
                                      **sender_options)
                       if socket_path is not None else sender or default_sender())
        self.event_type = event_type
        self.type_prefix = type_prefix
        self.actor = actor
        self.target = target
        self.tags = checked_tags(tags, "AuditHandler")
        self.close_timeout = close_timeout
        self._formatter = logging.Formatter()  # formats exceptions when no formatter is set

    @property
    def dropped(self) -> int:
        """Records lost to a full buffer (or still undelivered when the sender closed);
        with a shared sender, everything it dropped."""
        return self.sender.dropped

    @property
    def rejected(self) -> int:
        """Records the daemon refused (or too large to send); see the sender's warning."""
        return self.sender.rejected

    @property
    def pending(self) -> int:
        """Records buffered or in flight, not yet acknowledged."""
        return self.sender.pending

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender.submit(self.event(record))
        except RecursionError:  # as logging.StreamHandler: never swallowed
            raise
        except Exception:
            self.handleError(record)

    def event(self, record: logging.LogRecord) -> Event:
        """The event a record becomes (no I/O; public so a subclass can adjust it)."""
        level = record.levelname
        data: dict[str, Any] = {"level": level, "logger": record.name,
                                "message": record.getMessage()}
        if record.exc_info:
            formatter = self.formatter or self._formatter
            # Cached on the record as logging.Formatter.format does, for other handlers.
            if not record.exc_text:
                record.exc_text = formatter.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        event: Event = {"type": self.event_type or (self.type_prefix + level.lower())[:MAX_TYPE],
                        "ts": int(record.created * 1e9)}
        for key, value in vars(record).items():
            if key in _RECORD_KEYS:
                continue
            if key in _EVENT_KEYS:
                if value is not None:
                    event[key] = plain_str(value)
                continue
            data[f"extra.{key}" if key in _OWN_KEYS else key] = plain(value)
        return finish_event(event, data, self.actor, self.target, self.tags)

    def flush(self, timeout: float | None = None) -> None:
        """Deliver what is buffered, waiting at most `timeout` s (default `close_timeout`);
        `pending` then says what is left."""
        self.sender.flush(self.close_timeout if timeout is None else timeout)

    def close(self) -> None:
        """Deliver what can be within `close_timeout` s; closes the sender it owns."""
        try:
            if self._owns_sender:
                self.sender.close(self.close_timeout)
            else:
                self.sender.flush(self.close_timeout)
        finally:
            super().close()
