"""Client library: AsyncClient for asyncio (and uvloop), Client for plain blocking scripts,
and the integrations built on BufferedSender: AuditHandler (logging), AuditProcessor
(structlog) and audit() (an operation's start and outcome, linked).

Both clients pipeline frames and match replies in FIFO order, which protocol.md
guarantees. Every event gets an `id` before it is first sent, so a frame whose reply was
lost (daemon restart, `shutting_down`) is simply sent again after reconnecting: the
daemon answers the events it already stored under `duplicates`, and each event is
stored exactly once. The integrations rely on the same: they never wait for the daemon,
buffer (bounded) while it is away, and resend on reconnecting.
"""

from auditd.client.asyncio_client import AsyncClient
from auditd.client.audit import (
    AuditBlock,
    AuditScope,
    audit,
    current_scope,
    default_sender,
    set_default_sender,
)
from auditd.client.blocking import Client
from auditd.client.common import (
    ClientClosedError,
    DisconnectedError,
    Event,
    FrameError,
    OverloadedError,
    Reply,
    decode_reply,
    encode,
    prepare,
)
from auditd.client.logging_handler import AuditHandler
from auditd.client.sender import BufferedSender
from auditd.client.structlog_processor import AuditProcessor
from auditd.errors import ClientError, RejectedError

__all__ = ["AsyncClient", "AuditBlock", "AuditHandler", "AuditProcessor", "AuditScope",
           "BufferedSender", "Client", "ClientClosedError", "ClientError",
           "DisconnectedError", "Event", "FrameError", "OverloadedError", "RejectedError",
           "Reply", "audit", "current_scope", "decode_reply", "default_sender", "encode",
           "prepare", "set_default_sender"]
