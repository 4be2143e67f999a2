"""AuditProcessor: a structlog processor that sends each event dict to auditd.

    structlog.configure(processors=[structlog.processors.add_log_level,
                                    AuditProcessor(event_as="type"),
                                    structlog.processors.JSONRenderer()])
    log.info("user.login", actor="alice", method="sso")

With `event_as="message"` (the default) the event name goes to `data.message` and the
type is the fixed `event_type`, else `type_prefix` + the level; with `event_as="type"`
the event name is the type. `actor` and `target` become the event's own fields (else
the processor's defaults); `exc_info` becomes `data.exception`, the formatted
traceback; every other key goes to `data`, made plain (plain.py), except structlog's
private `_`-keys. Inside an audit() block the event links to it. The event dict is
returned unchanged, or dropped (structlog.DropEvent) with `drop=True`: the processor
only buffers, see sender.py.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, WrappedLogger

from auditd.client.audit import MAX_TYPE, default_sender, finish_event
from auditd.client.common import Event
from auditd.client.plain import checked_tags, plain, plain_str
from auditd.client.sender import BufferedSender

_EVENT_KEYS = ("actor", "target")


class AuditProcessor:
    """Buffers an event per event dict for a BufferedSender; never waits for the daemon.

    Sender ownership as AuditHandler: its own with `socket_path` (close() closes it),
    else `sender`, else the process's default_sender().
    """

    def __init__(self, *, socket_path: str | None = None, sender: BufferedSender | None = None,
                 event_as: Literal["message", "type"] = "message",
                 event_type: str | None = None, type_prefix: str = "log.",
                 actor: str | None = None, target: str | None = None,
                 tags: dict[str, str] | None = None, drop: bool = False,
                 **sender_options: Any) -> None:
        if event_as not in ("message", "type"):
            raise ValueError(f"AuditProcessor event_as: expected 'message' or 'type', "
                             f"got {event_as!r}")
        if socket_path is not None and sender is not None:
            raise ValueError("AuditProcessor: give socket_path or sender, not both")
        if sender_options and socket_path is None:
            raise ValueError(f"AuditProcessor: {', '.join(sorted(sender_options))} only "
                             "with socket_path (a sender of its own)")
        self._owns_sender = socket_path is not None
        self.sender = (BufferedSender(socket_path, **sender_options)
                       if socket_path is not None else sender or default_sender())
        self.event_as = event_as
        self.event_type = event_type
        self.type_prefix = type_prefix
        self.actor = actor
        self.target = target
        self.tags = checked_tags(tags, "AuditProcessor")
        self.drop = drop

    @property
    def dropped(self) -> int:
        return self.sender.dropped

    def __call__(self, logger: WrappedLogger, method_name: str,
                 event_dict: EventDict) -> EventDict:
        self.sender.submit(self.event(method_name, event_dict))
        if self.drop:
            raise structlog.DropEvent
        return event_dict

    def event(self, method_name: str, event_dict: EventDict) -> Event:
        """The auditd event an event dict becomes (no I/O; the dict is not changed)."""
        level = plain_str(event_dict.get("level", method_name)).lower()
        name = event_dict.get("event")
        data: dict[str, Any] = {}
        event: Event = {}
        if self.event_as == "type" and name:
            event["type"] = plain_str(name)[:MAX_TYPE]
        else:
            event["type"] = self.event_type or (self.type_prefix + level)[:MAX_TYPE]
            if name is not None:
                data["message"] = plain_str(name)
        data["level"] = level
        for key, value in event_dict.items():
            if key == "event" or key.startswith("_"):
                continue
            if key in _EVENT_KEYS:
                if value is not None:
                    event[key] = plain_str(value)
            elif key == "exc_info":
                if text := _exception_text(value):
                    data["exception"] = text
            else:
                data[key] = plain(value)
        return finish_event(event, data, self.actor, self.target, self.tags)

    def close(self, timeout: float | None = None) -> None:
        """Deliver what can be within `timeout` s; closes the sender it owns."""
        if self._owns_sender:
            self.sender.close(timeout)
        else:
            self.sender.flush(timeout)


def _exception_text(exc_info: Any) -> str | None:
    """exc_info as structlog accepts it (True, an exception, a sys.exc_info() tuple)."""
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and exc_info[0] is not None:
        return "".join(traceback.format_exception(*exc_info)).rstrip("\n")
    return None
