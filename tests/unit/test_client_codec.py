"""The client's pure parts: id assignment, frame encoding, reply decoding, classification."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from auditd.client import (
    AsyncClient,
    Client,
    ClientClosedError,
    DisconnectedError,
    FrameError,
    Reply,
)
from auditd.client import common as client
from auditd.client.common import Outage
from auditd.errors import ClientError, RejectedError
from auditd.ingest.framing import FrameDecoder
from auditd.schema import WireEvent, wire_decoder

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def body_of(frame: bytes) -> bytes:
    (body,) = FrameDecoder(1 << 20).feed(frame)
    return body


def reply_body(reply: object) -> bytes:
    return msgspec.msgpack.encode(reply)


# -- ids ---------------------------------------------------------------------------


def test_prepare_sets_a_uuid7_id_on_events_without_one() -> None:
    events: list[dict[str, Any]] = [{"type": "a"}, {"type": "b", "id": None}]
    client.prepare(events)
    assert all(UUID7.match(event["id"]) for event in events)
    assert events[0]["id"] != events[1]["id"]


def test_prepare_keeps_ids_the_caller_chose() -> None:
    event = {"type": "a", "id": "mine-1"}
    client.prepare([event])
    assert event["id"] == "mine-1"


def test_encoding_twice_keeps_the_first_id_so_resends_are_idempotent() -> None:
    event: dict[str, Any] = {"type": "a"}
    first = client.encode(event)
    assigned = event["id"]
    assert client.encode(event) == first
    assert event["id"] == assigned


def test_prepare_refuses_what_is_not_a_dict() -> None:
    with pytest.raises(TypeError, match="an event is a dict, not str"):
        client.prepare(["user.login"])  # type: ignore[list-item]  # the wrong type on purpose


# -- frames ------------------------------------------------------------------------


def test_a_bare_event_is_one_frame_holding_a_map_the_daemon_accepts() -> None:
    event: dict[str, Any] = {"type": "user.login", "actor": "alice"}
    frame = client.encode(event)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    decoded = wire_decoder.decode(body_of(frame))
    assert isinstance(decoded, WireEvent)
    assert (decoded.type, decoded.actor, decoded.id) == ("user.login", "alice", event["id"])


def test_protocol_test_vector_once_the_id_is_there() -> None:
    # protocol.md's vector is the frame of this event without an id; with the id the
    # client adds, the map simply gains a third key.
    vector = bytes.fromhex(
        "00 00 00 1d 82 a4 74 79 70 65 aa 75 73 65 72 2e 6c 6f 67 69 6e a5 61"
        " 63 74 6f 72 a5 61 6c 69 63 65")
    with_id = b"\x83" + vector[5:] + bytes.fromhex("a2 6964 a1 78")  # + "id": "x"
    event = {"type": "user.login", "actor": "alice", "id": "x"}
    assert client.encode(event) == len(with_id).to_bytes(4, "big") + with_id


def test_a_batch_is_one_frame_holding_an_array() -> None:
    events: list[dict[str, Any]] = [{"type": "a"}, {"type": "b"}]
    decoded = msgspec.msgpack.decode(body_of(client.encode(events)))
    assert decoded == events
    assert all("id" in event for event in events)


def test_batches_split_in_order() -> None:
    events = [{"type": str(i)} for i in range(5)]
    assert client.batches(events, 2) == [events[0:2], events[2:4], events[4:5]]
    assert client.batches([], 3) == []
    with pytest.raises(ValueError):
        client.batches(events, 0)


# -- replies -----------------------------------------------------------------------


def test_protocol_test_vector_reply_decodes() -> None:
    reply = client.decode_reply(reply_body({"ok": 1, "first": 1, "last": 1}))
    assert reply == Reply(ok=1, first=1, last=1)
    assert reply.rejected == [] and reply.duplicates == [] and reply.error is None


def test_reply_with_rejections_and_duplicates_decodes_to_tuples() -> None:
    reply = client.decode_reply(reply_body({
        "ok": 1, "first": 7, "last": 7,
        "rejected": [[1, "invalid", "type: required"]],
        "duplicates": [[2, 3]],
    }))
    assert reply.rejected == [(1, "invalid", "type: required")]
    assert reply.duplicates == [(2, 3)]


def test_reply_keys_from_a_newer_daemon_are_ignored() -> None:
    assert client.decode_reply(reply_body({"ok": 0, "shiny": True})) == Reply(ok=0)


@pytest.mark.parametrize("body", [b"\xc1", reply_body({"first": 1}), reply_body([1, 2])])
def test_an_undecodable_reply_becomes_a_bad_reply_refusal(body: bytes) -> None:
    reply = client.decode_reply(body)
    assert reply.error == "bad_reply"
    with pytest.raises(FrameError) as info:
        client.classify(reply)
    assert info.value.code == "bad_reply"


# -- classification ----------------------------------------------------------------


def test_an_answered_frame_is_done_even_with_rejections() -> None:
    assert client.classify(Reply(ok=1, rejected=[(0, "invalid", "x: bad")])) == "done"


def test_overloaded_is_retried_after_retry_after_ms() -> None:
    reply = Reply(ok=0, error="overloaded", message="full", retry_after_ms=250)
    assert client.classify(reply) == "retry"
    assert client.retry_delay(reply) == 0.25
    assert client.retry_delay(Reply(ok=0, error="overloaded")) == 0.1


@pytest.mark.parametrize("reply", [
    Reply(ok=0, error="shutting_down", message="the daemon is stopping"),
    Reply(ok=0, error="overloaded", message="too many connections", fatal=True,
          retry_after_ms=1000),
])
def test_a_closing_link_means_reconnect_and_resend(reply: Reply) -> None:
    assert client.classify(reply) == "reconnect"
    assert client.reconnects(reply)


@pytest.mark.parametrize(("code", "fatal"), [
    ("batch_too_large", False), ("bad_frame", True), ("frame_too_large", True),
    ("some_future_code", False),
])
def test_frame_refusals_raise_a_client_error(code: str, fatal: bool) -> None:
    reply = Reply(ok=0, error=code, message="no", fatal=fatal)
    with pytest.raises(FrameError) as info:
        client.classify(reply)
    error = info.value
    assert isinstance(error, ClientError)
    assert (error.code, error.message, error.fatal, error.reply) == (code, "no", fatal, reply)
    assert str(error) == f"{code}: no"


def test_rejections_raise_rejected_error_naming_the_field() -> None:
    reply = Reply(ok=1, first=5, last=5, rejected=[(1, "invalid", "actor: expected str")])
    with pytest.raises(RejectedError) as info:
        client.check_rejected(reply)
    assert "actor: expected str" in str(info.value)
    assert info.value.rejected == [(1, "invalid", "actor: expected str")]
    assert info.value.reply == {"ok": 1, "first": 5, "last": 5,
                                "rejected": [(1, "invalid", "actor: expected str")]}


def test_rejections_are_returned_when_raising_is_off() -> None:
    reply = Reply(ok=0, rejected=[(0, "too_large", "event: too large")])
    assert client.check_rejected(reply, raise_on_reject=False) is reply
    assert client.check_rejected(Reply(ok=1, first=1, last=1)).ok == 1


def test_many_frames_rejections_index_into_the_whole_event_list() -> None:
    replies = [
        Reply(ok=2, first=1, last=2),
        Reply(ok=1, first=3, last=3, rejected=[(1, "invalid", "type: required")],
              duplicates=[(0, 9)]),
        Reply(ok=0, rejected=[(0, "conflict", "stream at 4")]),
    ]
    with pytest.raises(RejectedError) as info:
        client.check_rejected_many(replies, [2, 3, 1])
    assert info.value.rejected == [(3, "invalid", "type: required"), (5, "conflict", "stream at 4")]
    assert info.value.reply == {"ok": 3, "rejected": info.value.rejected, "duplicates": [(2, 9)]}
    assert str(info.value).startswith("2 event(s) rejected; first: #3 invalid: type: required")
    assert client.check_rejected_many(replies, [2, 3, 1], raise_on_reject=False) == replies


# -- reconnect timing and options ----------------------------------------------------


def test_outage_tries_at_once_then_backs_off_until_its_deadline() -> None:
    outage = Outage(30.0)
    delays = [outage.next_delay() for _ in range(8)]
    assert delays == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    outage.wait_at_least(Reply(ok=0, error="shutting_down", retry_after_ms=3000))
    assert outage.next_delay() == 3.0
    assert Outage(0.0).next_delay() is None  # a deadline already passed: no attempt


def test_max_in_flight_must_allow_one_frame() -> None:
    with pytest.raises(ValueError):
        Client("/nonexistent", max_in_flight=0)
    with pytest.raises(ValueError):
        AsyncClient("/nonexistent", max_in_flight=0)


@pytest.fixture
def missing_socket() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="cc"))
    yield str(root / "no.sock")
    shutil.rmtree(root, ignore_errors=True)


def test_first_connect_fails_at_once_naming_the_path(missing_socket: str) -> None:
    # Not retried until a deadline: with an hour's reconnect_deadline it still fails
    # (were the first connect retried, this would hang until pytest's timeout).
    with pytest.raises(DisconnectedError, match=re.escape(missing_socket)):
        Client(missing_socket, reconnect_deadline=3600).send({"type": "a"})


def test_a_closed_client_refuses_to_send(missing_socket: str) -> None:
    blocking = Client(missing_socket)
    blocking.close()
    with pytest.raises(ClientClosedError):
        blocking.send({"type": "a"})


async def _closed_async(path: str) -> None:
    async_client = AsyncClient(path)
    await async_client.close()
    with pytest.raises(ClientClosedError):
        await async_client.send({"type": "a"})
    with pytest.raises(DisconnectedError, match=re.escape(path)):
        await AsyncClient(path).send({"type": "a"})


def test_async_client_closed_and_missing_socket(missing_socket: str) -> None:
    asyncio.run(_closed_async(missing_socket))
