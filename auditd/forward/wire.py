"""The forwarder's fast path through nats-py: a step's messages as HPUB commands framed
where the step is read and sent in one piece, and acks taken straight from the parser.

Why: nats-py's `publish` frames each message on the event loop, building its header block
key by key (a strip, a regex match, a translate and an encode per header): 40 % of the
forwarder's loop at five headers a message, measured with cProfile. The forwarder frames a
step's commands where it reads the step, in the reader's thread, exactly as nats-py frames
them (values trimmed, CR and LF made spaces; the keys are this module's constants, each
valid), and the loop hands the whole step to the connection as one command.

An ack, one per message, cost nats-py a Msg object, a trip through the subscription's
queue and task and a coroutine call: 30 % of the loop after the framing moved. `Client`
hands the messages of a "raw" subscription to a plain function as the parser reads them.

Both use nats-py's internals (the pending buffer behind `publish`: `_send_command`,
`_flush_pending`, the pending-size fields; the parser's `_process_msg` hook), so pyproject
pins nats-py below 3, and the forwarding tests, against real nats-server processes, hold
them to what `publish` and `subscribe` do: the same checks, then the same buffer and
flusher, which a reconnect resends from; the same subscription, which a reconnect renews.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_block(headers: Mapping[str, str]) -> bytes:
    """`NATS/1.0` and one `Key: value` line each, as nats-py writes them."""
    lines = "".join(f"{key}: {value.strip()}\r\n" for key, value in headers.items())
    # Only a value holding CR or LF adds one past each line's own: a translate for every
    # value was a third of the reader's time.
    if lines.count("\r") != len(headers) or lines.count("\n") != len(headers):
        lines = "".join(f"{key}: {value.strip().translate(_NEWLINES)}\r\n"
                        for key, value in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def hpub(subject: str, reply: str, headers: bytes, payload: bytes) -> bytes:
    """One HPUB command (nats.protocol.command.hpub_cmd's framing)."""
    head = f"HPUB {subject} {reply} {len(headers)} {len(headers) + len(payload)}\r\n"
    return b"".join((head.encode(), headers, payload, b"\r\n"))


async def send_commands(nc: NATS, commands: bytes, count: int, payload_bytes: int) -> None:
    """What `publish` does after framing, for `count` framed messages at once: refused on
    a closed or draining connection, or while reconnecting with the buffer full; else
    into the pending buffer, flushed as `publish` flushes it."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    limit = nc._max_pending_size
    if not nc.is_connected and (limit <= 0 or len(commands) + nc._pending_data_size > limit):
        raise nats.errors.OutboundBufferLimitError
    nc.stats["out_msgs"] += count
    nc.stats["out_bytes"] += payload_bytes
    await nc._send_command(commands)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


RawSink = Callable[[str, bytes, dict[str, str] | None], None]  # subject, data, headers


class Client(NATS):
    """nats-py's client with subscriptions whose messages go to a function, not a queue."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[int, RawSink] = {}

    async def subscribe_raw(self, subject: str, sink: RawSink) -> Subscription:
        sub = await self.subscribe(subject)  # its queue stays empty: _process_msg routes
        self._raw[sub._id] = sink
        return sub

    def drop_raw(self, sub: Subscription) -> None:
        self._raw.pop(sub._id, None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        sink = self._raw.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        # An ack has no headers; a status (503: no responders) is parsed as nats-py does.
        parsed = await self._process_headers(headers) if headers else None
        sink(subject.decode(), data, parsed)
