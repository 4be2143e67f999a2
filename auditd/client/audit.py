"""audit(): an operation recorded as `<type>.started`, then `.succeeded` or `.failed`.

    with audit("deploy.app", target="/srv/app", version="1.4"):
        ...

    @audit("backup.run", actor="cron")
    async def backup() -> None: ...

Both events of one block share a correlation id; the outcome's `causation_id` is the
start event's id. A block inside another (in the same thread or task: the enclosing
block is a ContextVar) takes the enclosing block's correlation id, and its start
event's `causation_id` is the enclosing start event's id, so the whole operation reads
as one causal tree. Log records and structlog events made inside a block carry the same
links (see logging_handler, structlog_processor). Events go through a BufferedSender,
so recording never waits for the daemon and never raises because it is away.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from auditd.client.common import Event
from auditd.client.plain import checked_tags, plain, plain_str
from auditd.client.sender import BufferedSender
from auditd.schema import uuid7

P = ParamSpec("P")
R = TypeVar("R")

MAX_TYPE = 200 - len(".succeeded")  # the daemon's limit on `type`, less the suffix

_current: contextvars.ContextVar[AuditScope | None] = contextvars.ContextVar(
    "auditd_audit_scope", default=None)
_default: BufferedSender | None = None
_default_lock = threading.Lock()


def default_sender() -> BufferedSender:
    """The process's shared sender, made on first use for $AUDITD_INGEST_SOCKET (else
    /run/auditd/ingest.sock) with the default bounds."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BufferedSender()
        return _default


def set_default_sender(sender: BufferedSender | None) -> BufferedSender | None:
    """Replace the shared sender (None: make a new one on next use); returns the old one,
    which the caller closes if it is done with it."""
    global _default
    with _default_lock:
        previous, _default = _default, sender
        return previous


@dataclass
class AuditScope:
    """One entered audit block: what events made inside it link to."""

    type: str
    id: str  # the start event's id
    correlation_id: str
    data: dict[str, Any] = field(default_factory=dict)  # added to the outcome event


def current_scope() -> AuditScope | None:
    """The innermost audit block entered in this thread or task, if any."""
    return _current.get()


def finish_event(event: dict[str, Any], data: dict[str, Any], actor: str | None,
                 target: str | None, tags: dict[str, str] | None) -> dict[str, Any]:
    """What the logging handler and the structlog processor add last to an event: their
    configured actor and target where the record named none, their tags, the links to
    the enclosing audit block, and `data`."""
    for key, default in (("actor", actor), ("target", target)):
        if default is not None:
            event.setdefault(key, default)
    if tags:
        event["tags"] = tags
    scope = current_scope()
    if scope is not None:
        event["correlation_id"] = scope.correlation_id
        event["causation_id"] = scope.id
    event["data"] = data
    return event


def audit(event_type: str, *, actor: str | None = None, target: str | None = None,
          correlation_id: str | None = None, tags: dict[str, str] | None = None,
          sender: BufferedSender | None = None, **data: Any) -> AuditBlock:
    """A context manager (sync or async) and a decorator recording an operation.

    `data` goes into both events; what the block adds to `scope.data` goes into the
    outcome. `correlation_id` overrides the inherited or new one. `sender` defaults to
    `default_sender()`, looked up when the block is entered.
    """
    return AuditBlock(event_type, actor=actor, target=target, correlation_id=correlation_id,
                      tags=tags, sender=sender, data=data)


class AuditBlock:
    """What audit() returns. Re-entrant, and safe to share between threads and tasks:
    each entry keeps its own scope, found again on exit through the context; each call
    of a decorated function enters a fresh copy."""

    def __init__(self, event_type: str, *, actor: str | None, target: str | None,
                 correlation_id: str | None, tags: dict[str, str] | None,
                 sender: BufferedSender | None, data: dict[str, Any]) -> None:
        if not isinstance(event_type, str) or not 0 < len(event_type) <= MAX_TYPE:
            raise ValueError(f"audit type: expected a str of 1..{MAX_TYPE} characters, "
                             f"got {event_type!r}")
        for name, value in (("actor", actor), ("target", target),
                            ("correlation_id", correlation_id)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"audit {name}: expected str or None, "
                                f"got {type(value).__name__}")
        self.type = plain_str(event_type)
        self.actor = None if actor is None else plain_str(actor)
        self.target = None if target is None else plain_str(target)
        self.correlation_id = None if correlation_id is None else plain_str(correlation_id)
        self.tags = checked_tags(tags, "audit")
        self.sender = sender
        self.data = data
        self._entered: list[tuple[AuditScope, contextvars.Token[AuditScope | None], int]] = []

    def __enter__(self) -> AuditScope:
        parent = _current.get()
        start_id = uuid7()
        correlation = self.correlation_id or (parent.correlation_id if parent else start_id)
        scope = AuditScope(self.type, start_id, correlation)
        self._send(f"{self.type}.started", start_id, correlation,
                   parent.id if parent else None, plain(self.data))
        self._entered.append((scope, _current.set(scope), time.monotonic_ns()))
        return scope

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # The scope this thread or task entered (a block object may be shared by several,
        # e.g. one made at module level); the last entered when the context was switched.
        current = _current.get()
        at = next((i for i, entry in enumerate(self._entered) if entry[0] is current), -1)
        scope, token, started = self._entered.pop(at)
        try:
            _current.reset(token)
        except ValueError:  # exited in another context than entered (a moved generator)
            _current.set(None)
        outcome: dict[str, Any] = {**plain(self.data), **plain(scope.data),
                                   "duration_ms": (time.monotonic_ns() - started) / 1e6}
        if exc is not None:
            outcome["error_type"] = _type_name(type(exc))
            outcome["error"] = _message(exc)
        suffix = "failed" if exc is not None else "succeeded"
        self._send(f"{self.type}.{suffix}", uuid7(), scope.correlation_id, scope.id, outcome)

    async def __aenter__(self) -> AuditScope:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate a function (plain or async): every call is recorded as one block."""
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with self._copy():
                    return await func(*args, **kwargs)
            return cast(Callable[P, R], run_async)

        @functools.wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._copy():
                return func(*args, **kwargs)
        return run

    def _copy(self) -> AuditBlock:
        return AuditBlock(self.type, actor=self.actor, target=self.target,
                          correlation_id=self.correlation_id, tags=self.tags,
                          sender=self.sender, data=self.data)

    def _send(self, event_type: str, event_id: str, correlation_id: str,
              causation_id: str | None, data: dict[str, Any]) -> None:
        event: Event = {"type": event_type, "id": event_id, "ts": time.time_ns(),
                        "correlation_id": correlation_id}
        if causation_id is not None:
            event["causation_id"] = causation_id
        if self.actor is not None:
            event["actor"] = self.actor
        if self.target is not None:
            event["target"] = self.target
        if self.tags:
            event["tags"] = self.tags
        if data:
            event["data"] = data
        (self.sender or default_sender()).submit(event)


def _type_name(kind: type[BaseException]) -> str:
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not replace the caller's exception
        return f"<unprintable {type(exc).__qualname__}>"
