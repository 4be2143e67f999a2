"""The JetStream stream forwarded to: created with safe settings, or checked.

A stream that would lose audit data silently is refused, naming each bad setting:
deletes and purges must be denied, a full stream must push back (`discard = new`,
never drop the oldest), messages must stay until the stream's own limits (`limits`
retention: an interest or work-queue stream deletes what a consumer acknowledged),
the dedupe window must outlast a resend (at least 5 minutes) and the storage must be
files. Fewer than 3 replicas is allowed with a warning: one server's ack is not an
fsync (it syncs every 2 minutes by default), so only R3, or `sync_interval: always`
on a single node, makes the central copy durable.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.manager import JetStreamManager

from auditd.config import ForwardConfig
from auditd.errors import AuditdError
from auditd.forward.messages import checkpoint_subject, render_subject

MIN_DUPLICATE_WINDOW_S = 300.0
RECOMMENDED_REPLICAS = 3


class StreamRefused(AuditdError):
    """The stream is absent (and may not be created) or its settings would lose data."""


@dataclass(frozen=True, slots=True)
class StreamState:
    name: str
    replicas: int
    created: bool
    warning: str | None  # fewer replicas than recommended


def subjects_for(template: str) -> list[str]:
    """The subjects a created stream takes: the template with each token a wildcard,
    and the checkpoints' subject."""
    events = render_subject(template, "*", "*", "*")
    checkpoints = checkpoint_subject("*")
    return [events] if subject_matches(events, checkpoints.replace("*", "h")) \
        else [events, checkpoints]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more at the end."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


def problems(config: api.StreamConfig, samples: list[str]) -> list[str]:
    """Each setting of `config` that would lose audit data silently, named."""
    found = []
    if not config.deny_delete:
        found.append("deny_delete is false (messages can be deleted): expected true")
    if not config.deny_purge:
        found.append("deny_purge is false (the stream can be purged): expected true")
    if config.discard != api.DiscardPolicy.NEW:
        found.append(f"discard is {_value(config.discard)} (a full stream drops its "
                     "oldest messages): expected new")
    if config.retention not in (None, api.RetentionPolicy.LIMITS):
        found.append(f"retention is {_value(config.retention)} (acknowledged messages "
                     "are deleted): expected limits")
    if (config.duplicate_window or 0) < MIN_DUPLICATE_WINDOW_S:
        found.append(f"duplicate_window is {config.duplicate_window or 0:g}s (a resend "
                     "could be stored twice): expected at least 300s")
    if config.storage != api.StorageType.FILE:
        found.append(f"storage is {_value(config.storage)}: expected file")
    for subject in samples:
        if not any(subject_matches(p, subject) for p in config.subjects or []):
            found.append(f"subjects {config.subjects} do not take {subject}")
    return found


def _value(setting: object) -> str:
    return str(getattr(setting, "value", setting))


async def ensure_stream(jsm: JetStreamManager, settings: ForwardConfig,
                        duplicate_window_s: float, samples: list[str]) -> StreamState:
    created = False
    try:
        info = await jsm.stream_info(settings.stream)
    except NotFoundError:
        if not settings.create_stream:
            raise StreamRefused(f"stream {settings.stream} does not exist: create it (see "
                                "the README's Fleet section) or set forward.create_stream "
                                "= true") from None
        info = await jsm.add_stream(api.StreamConfig(
            name=settings.stream, subjects=subjects_for(settings.subject),
            retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.NEW,
            storage=api.StorageType.FILE, num_replicas=settings.replicas,
            duplicate_window=duplicate_window_s, deny_delete=True, deny_purge=True,
            description="auditd: audit events, exactly once per host and seq"))
        created = True
    bad = problems(info.config, samples)
    if bad:
        raise StreamRefused(f"stream {settings.stream} would lose audit data silently: "
                            + "; ".join(bad))
    replicas = info.config.num_replicas or 1
    warning = None
    if replicas < RECOMMENDED_REPLICAS:
        warning = (f"stream {settings.stream} has {replicas} replica(s): {RECOMMENDED_REPLICAS}"
                   " are recommended (one server's ack is not an fsync)")
    return StreamState(settings.stream, replicas, created, warning)
