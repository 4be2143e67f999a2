"""JetStream publish acknowledgements, a step at a time.

nats-py's `publish_async` makes a future, a NUID token and a semaphore round per message
and parses each ack as JSON: measured here at 12.9k messages/s against 93k/s for plain
publishes on the same connection. The forwarder needs less: every message of a step
acknowledged, or the step failed. So each message is published with the reply subject
`<inbox>.<step>.<index>`, one subscription takes every ack, and an ack is read from its
bytes: an `"error"` member fails the step (a no-responders status too: no stream takes
the subject), a `"duplicate":true` one counts as a resend JetStream deduped. The step's
deadline is its own (nats-py's futures never time out: nats.py issue 985).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from auditd.forward.messages import Message

_NO_RESPONDERS = "503"


class AckError(Exception):
    """A message of the step was refused by the server."""


@dataclass(slots=True)
class StepAcks:
    number: int
    expected: int
    acked: int = 0
    duplicates: int = 0
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    seen: set[int] = field(default_factory=set)

    def take(self, index: int, msg: Msg) -> None:
        if index in self.seen or self.done.is_set():
            return  # a repeated ack (a reconnect may replay): counted once
        data = msg.data
        status = (msg.headers or {}).get("Status")
        if status == _NO_RESPONDERS:
            self._fail("no stream takes the subject (no responders)")
            return
        if b'"error"' in data:
            try:
                error = json.loads(data)["error"]
                self._fail(f"{error.get('description', error)} (code "
                           f"{error.get('err_code', error.get('code'))})")
            except (ValueError, KeyError, AttributeError):
                self._fail(data.decode(errors="replace"))
            return
        self.seen.add(index)
        self.acked += 1
        if b'"duplicate":true' in data:
            self.duplicates += 1
        if self.acked == self.expected:
            self.done.set()

    def _fail(self, why: str) -> None:
        self.error = why
        self.done.set()


class AckTracker:
    """One inbox subscription for the acks of every step in flight."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.steps: dict[int, StepAcks] = {}
        self._number = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.prefix}.*.*", cb=self._on_ack)

    async def stop(self) -> None:
        self.steps.clear()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):  # the connection gone: so is the sub
                await sub.unsubscribe()

    async def _on_ack(self, msg: Msg) -> None:
        _, step, index = msg.subject.rsplit(".", 2)
        found = self.steps.get(int(step))
        if found is not None:
            found.take(int(index), msg)

    async def publish(self, messages: list[Message]) -> StepAcks:
        """Publish a step's messages, each asking for its ack; the step's tracker."""
        self._number += 1
        acks = self.steps[self._number] = StepAcks(self._number, len(messages))
        reply = f"{self.prefix}.{self._number}."
        publish = self.nc.publish
        for index, message in enumerate(messages):
            await publish(message.subject, message.body, reply=f"{reply}{index}",
                          headers=message.headers)
        if not messages:
            acks.done.set()
        return acks

    async def settle(self, acks: StepAcks, within_s: float) -> StepAcks:
        """Until every message of the step is acknowledged; TimeoutError past `within_s`,
        AckError for a refused message."""
        try:
            await asyncio.wait_for(acks.done.wait(), max(0.0, within_s))
        finally:
            self.steps.pop(acks.number, None)
        if acks.error is not None:
            raise AckError(acks.error)
        return acks
