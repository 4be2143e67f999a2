"""The forwarder frames its HPUB commands itself (forward.wire): byte for byte what
nats-py's own publish puts in its pending buffer, for any header value (CR, LF and
surrounding blanks included), and a step's framing names the reply of each message."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from auditd.forward.messages import Message, frame
from auditd.forward.wire import Client, header_block, hpub

_VALUES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


def nats_py_framing(subject: str, reply: str, payload: bytes, headers: dict[str, str]) -> bytes:
    """What nats-py's publish path appends to its pending buffer (not connected, so
    nothing is flushed)."""
    nc = Client()

    async def publish() -> None:
        await nc._send_publish(subject, reply, payload, len(payload), headers)

    asyncio.run(publish())
    assert len(nc._pending) == 1
    return nc._pending[0]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["Nats-Msg-Id", "Auditd-Id", "Auditd-Seq"]), _VALUES,
                       min_size=1), st.binary(max_size=64))
def test_framing_equals_nats_py_for_any_header_value(headers: dict[str, str],
                                                     payload: bytes) -> None:
    ours = hpub("audit.h.t", "_INBOX.x.1.0", header_block(headers), payload)
    assert ours == nats_py_framing("audit.h.t", "_INBOX.x.1.0", payload, headers)


def test_a_value_with_cr_or_lf_cannot_end_its_line() -> None:
    block = header_block({"Auditd-Id": " a\r\nPUB x 1\r\n ", "Auditd-Seq": "7"})
    assert block == b"NATS/1.0\r\nAuditd-Id: a  PUB x 1\r\nAuditd-Seq: 7\r\n\r\n"


def test_a_step_asks_for_each_ack_under_its_first_seq() -> None:
    messages = [Message(5, "audit.h.t", b"five", {"Auditd-Seq": "5"}),
                Message(7, "audit.h.t", b"seven", {"Auditd-Seq": "7"}),
                Message(0, "audit.h._checkpoint", b"cp", {}, checkpoint_size=7)]
    step = frame(messages, 5, 7, "_INBOX.abc", max_payload=1024)
    assert step.commands.startswith(b"HPUB audit.h.t _INBOX.abc.5.0 ")
    assert b" _INBOX.abc.5.1 " in step.commands and b" _INBOX.abc.5.2 " in step.commands
    assert (step.count, step.payload_bytes, step.checkpoint_sizes) == (3, 11, [7])
    assert step.missing == [6] and step.oversized is None


def test_a_body_past_max_payload_ends_the_step_before_it() -> None:
    messages = [Message(5, "audit.h.t", b"five", {}), Message(6, "audit.h.t", b"six", {}),
                Message(7, "audit.h.t", b"seven!", {}),
                Message(0, "audit.h._checkpoint", b"cp", {}, checkpoint_size=6),
                Message(0, "audit.h._checkpoint", b"cp", {}, checkpoint_size=7)]
    step = frame(messages, 5, 7, "_INBOX.abc", max_payload=5)
    assert (step.last, step.count, step.missing) == (6, 3, [])
    assert step.checkpoint_sizes == [6] and step.oversized == ("seq 7", 6)
    alone = frame(messages[2:3], 7, 7, "_INBOX.abc", max_payload=5)
    assert (alone.last, alone.count, alone.commands, alone.missing) == (6, 0, b"", [])
