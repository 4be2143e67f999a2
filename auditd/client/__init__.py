"""Client library: AsyncClient for asyncio (and uvloop), Client for plain blocking scripts.

Both pipeline frames and match replies in FIFO order, which protocol.md guarantees. Every
event gets an `id` before it is first sent, so a frame whose reply was lost (daemon restart,
`shutting_down`) is simply sent again after reconnecting: the daemon answers the events it
already stored under `duplicates`, and each event is stored exactly once.
"""

from auditd.client.asyncio_client import AsyncClient
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
from auditd.errors import ClientError, RejectedError

__all__ = ["AsyncClient", "Client", "ClientClosedError", "ClientError", "DisconnectedError",
           "Event", "FrameError", "OverloadedError", "RejectedError", "Reply", "decode_reply",
           "encode", "prepare"]
