"""Frame bodies -> validated events: the rules of protocol.md and their messages."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest

from auditd.errors import ProtocolError
from auditd.ingest.validation import decode_body
from auditd.schema import RESERVED_KEYS, timestamp_ns

encode = msgspec.msgpack.encode
MAX_BATCH = 10_000
MAX_EVENT = 262_144


def rejected_of(event: Any) -> list[tuple[int, str, str]]:
    frame = decode_body(encode(event), MAX_BATCH, MAX_EVENT)
    return frame.rejected


def only_message(event: Any) -> str:
    rejected = rejected_of(event)
    assert len(rejected) == 1, rejected
    index, code, message = rejected[0]
    assert (index, code) == (0, "invalid")
    return message


@pytest.mark.parametrize(("event", "message"), [
    ({"type": "t", "actor": 5}, "actor: expected str, got int"),
    ({"actor": "alice"}, "type: required"),
    ({"type": ""}, "type: expected str of length >= 1"),
    ({"type": "x" * 201}, "type: expected str of length <= 200"),
    ({"type": 5}, "type: expected str, got int"),
    ({"type": "t", "actor": "a" * 257}, "actor: expected str of length <= 256"),
    ({"type": "t", "target": "x" * 513}, "target: expected str of length <= 512"),
    ({"type": "t", "id": ""}, "id: expected str of length >= 1"),
    ({"type": "t", "id": "i" * 129}, "id: expected str of length <= 128"),
    ({"type": "t", "stream": ""}, "stream: expected str of length >= 1"),
    ({"type": "t", "stream": "s" * 257}, "stream: expected str of length <= 256"),
    ({"type": "t", "stream": "s", "expect": -1}, "expect: expected int >= 0"),
    ({"type": "t", "stream": "s", "expect": 1.0}, "expect: expected int, got float"),
    ({"type": "t", "stream": "s", "expect": True}, "expect: expected int, got bool"),
    ({"type": "t", "expect": 0}, "expect: only allowed together with stream"),
    ({"type": "t", "correlation_id": "c" * 129}, "correlation_id: expected str of length <= 128"),
    ({"type": "t", "causation_id": "c" * 129}, "causation_id: expected str of length <= 128"),
    ({"type": "t", "ts": "yesterday"}, "ts: expected a timestamp, int (ns) or float (s)"),
    ({"type": "t", "ts": [1, 2]}, "ts: expected a timestamp, int (ns) or float (s)"),
    ({"type": "t", "ts": float("nan")}, "ts: float seconds out of range"),
    ({"type": "t", "ts": 1e300}, "ts: float seconds out of range"),
    ({"type": "t", "ts": 2**64 - 1}, "ts: int nanoseconds out of range"),
    ({"type": "t", "tags": {f"k{i}": "v" for i in range(33)}},
     "tags: expected object of length <= 32"),
    ({"type": "t", "tags": {"k": "v" * 257}}, "tags: expected str of length <= 256"),
    ({"type": "t", "tags": {"k": 5}}, "tags: expected str, got int"),
    ({"type": "t", "tags": []}, "tags: expected object, got array"),
    ({"type": "t", "colour": "red"}, "colour: unknown key"),
])
def test_invalid_event_message_names_the_field(event: dict[str, Any], message: str) -> None:
    assert only_message(event) == message


@pytest.mark.parametrize("key", sorted(RESERVED_KEYS))
def test_reserved_keys_are_refused_by_name(key: str) -> None:
    expected = {"seq", "stream_seq", "received_at", "pid", "uid", "gid", "comm", "hash"}
    assert expected == RESERVED_KEYS
    assert only_message({"type": "t", key: 1}) == (
        f"{key}: set by the daemon, a client may not send it")


@pytest.mark.parametrize("key", ["k" * 65, "k" * 1000], ids=["65", "1000"])
def test_tag_key_too_long_names_the_tags_field(key: str) -> None:
    message = only_message({"type": "t", "tags": {key: "v"}})
    # Like every other rejection, the message leads with the field it is about.
    assert message.startswith("tags"), message
    assert "64" in message


def test_tag_key_of_wrong_type_names_the_tags_field() -> None:
    message = only_message({"type": "t", "tags": {5: "v"}})
    assert message.startswith("tags"), message
    assert "str" in message


def test_limits_are_inclusive() -> None:
    event = {
        "type": "x" * 200, "actor": "a" * 256, "target": "t" * 512, "id": "i" * 128,
        "stream": "s" * 256, "expect": 0, "correlation_id": "c" * 128,
        "causation_id": "c" * 128,
        "tags": {f"{i:064d}": "v" * 256 for i in range(32)}, "data": {"any": [1, None]},
    }
    frame = decode_body(encode(event), MAX_BATCH, MAX_EVENT)
    assert frame.rejected == []
    (valid,) = frame.valid
    assert valid.index == 0
    assert valid.event.type == "x" * 200
    assert valid.event.tags is not None and len(valid.event.tags) == 32
    assert msgspec.msgpack.decode(valid.event.data) == {"any": [1, None]}  # type: ignore[arg-type]
    assert valid.raw == encode(event)
    assert valid.size == len(encode(event))


def test_null_optional_fields_are_accepted_as_absent() -> None:
    frame = decode_body(encode({"type": "t", "actor": None, "ts": None}), MAX_BATCH, MAX_EVENT)
    assert frame.rejected == []
    assert frame.valid[0].event.actor is None
    assert frame.valid[0].ts is None


def test_timestamp_forms() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    ns = int(when.timestamp()) * 1_000_000_000 + 123_456_000
    midnight = dt.datetime(2024, 5, 6, tzinfo=dt.UTC)
    cases = [(when, ns), (ns, ns), (1.5, 1_500_000_000), (-1, -1),
             (midnight, 1_714_953_600_000_000_000)]
    for ts, expected in cases:
        assert timestamp_ns(msgspec.Raw(encode(ts))) == expected
    frame = decode_body(encode({"type": "t", "ts": when}), MAX_BATCH, MAX_EVENT)
    assert frame.valid[0].ts == ns


def test_timestamp_64_and_96_bit_forms() -> None:
    with_nanos = dt.datetime(2024, 5, 6, 7, 8, 9, 5, tzinfo=dt.UTC)
    raw = encode(with_nanos)
    assert raw[:2] == b"\xd7\xff"
    assert timestamp_ns(msgspec.Raw(raw)) == int(with_nanos.timestamp()) * 10**9 + 5_000
    for far in (dt.datetime(3000, 1, 1, tzinfo=dt.UTC), dt.datetime(1960, 1, 1, tzinfo=dt.UTC)):
        raw = encode(far)
        assert raw[:3] == b"\xc7\x0c\xff"
        assert timestamp_ns(msgspec.Raw(raw)) == int(far.timestamp()) * 10**9


def test_timestamp_32_bit_form() -> None:
    raw = b"\xd6\xff" + (1_700_000_000).to_bytes(4, "big")
    assert timestamp_ns(msgspec.Raw(raw)) == 1_700_000_000 * 1_000_000_000


def test_batch_events_are_validated_one_by_one() -> None:
    batch = [{"type": "ok.0"}, {"type": "t", "actor": 5}, 7, {"type": "ok.3"},
             {"type": "t", "seq": 9}, "nope", {"type": "ok.6", "data": b"\x00\x01"}]
    frame = decode_body(encode(batch), MAX_BATCH, MAX_EVENT)
    assert [v.index for v in frame.valid] == [0, 3, 6]
    assert [v.event.type for v in frame.valid] == ["ok.0", "ok.3", "ok.6"]
    assert frame.rejected == [
        (1, "invalid", "actor: expected str, got int"),
        (2, "invalid", "event: expected object, got int"),
        (4, "invalid", "seq: set by the daemon, a client may not send it"),
        (5, "invalid", "event: expected object, got str"),
    ]
    assert frame.rejected_raw == [encode(batch[1]), encode(7), encode(batch[4]), encode("nope")]


def test_empty_batch_is_valid_and_holds_nothing() -> None:
    frame = decode_body(b"\x90", MAX_BATCH, MAX_EVENT)
    assert frame.valid == [] and frame.rejected == []


def test_too_large_event_is_rejected_and_its_neighbours_kept() -> None:
    big = {"type": "t", "data": "x" * 2000}
    frame = decode_body(encode([{"type": "a"}, big, {"type": "b"}]), MAX_BATCH, 1024)
    size = len(encode(big))
    assert frame.rejected == [
        (1, "too_large", f"event is {size} bytes, over the 1024-byte limit")]
    assert [v.index for v in frame.valid] == [0, 2]
    bare = decode_body(encode(big), MAX_BATCH, 1024)
    assert bare.rejected == [(0, "too_large", f"event is {size} bytes, over the 1024-byte limit")]


def test_event_of_exactly_max_event_bytes_is_accepted() -> None:
    # 13 bytes of map, keys and type, a 3-byte str16 header, then the payload.
    event = {"type": "t", "data": "x" * (1024 - 13 - 3)}
    assert len(encode(event)) == 1024
    assert decode_body(encode(event), MAX_BATCH, 1024).rejected == []
    event["data"] += "x"
    assert decode_body(encode(event), MAX_BATCH, 1024).rejected[0][1] == "too_large"


def test_batch_too_large_is_a_frame_error() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_body(encode([{"type": "t"}] * 11), 10, MAX_EVENT)
    assert info.value.code == "batch_too_large"
    assert info.value.message == "batch of 11 events exceeds 10"
    assert info.value.fatal is False
    assert len(decode_body(encode([{"type": "t"}] * 10), 10, MAX_EVENT).valid) == 10


@pytest.mark.parametrize(("body", "fragment"), [
    (b"\xc1", "not valid MessagePack"),
    (encode({"type": "t"}) + b"\x00", "trailing"),
    (encode([{"type": "t"}]) + b"\x00", "trailing"),
    (b"\x82\xa4type", "not valid MessagePack"),
    (b"\x91", "not valid MessagePack"),
    (b"\x91\xc1", "not valid MessagePack"),
    (encode(5), "got int"),
    (encode("text"), "got str"),
    (encode(1.5), "got float"),
    (encode(True), "got bool"),
])
def test_bad_frame_bodies_are_fatal(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_body(body, MAX_BATCH, MAX_EVENT)
    assert info.value.code == "bad_frame"
    assert info.value.fatal is True
    assert fragment in info.value.message


def test_malformed_bare_map_after_a_schema_error_is_bad_frame() -> None:
    # The first key fails the schema, but the bytes are truncated: not MessagePack.
    body = encode({"type": 5, "actor": "alice"})[:-3]
    with pytest.raises(ProtocolError) as info:
        decode_body(body, MAX_BATCH, MAX_EVENT)
    assert info.value.code == "bad_frame"


# -- depth (protocol.md "Depth") ----------------------------------------------------

TOO_DEEP = "data: nested deeper than 64 levels"


def nested(levels: int, leaf: bytes = b"\x01") -> bytes:
    """`levels` arrays one inside the other, as raw MessagePack: msgspec's encoder would
    recurse as deep as the value."""
    return b"\x91" * levels + leaf


def nested_maps(levels: int) -> bytes:
    return b"\x81\xa1k" * levels + b"\x01"


def event_with(key: str, value: bytes, type_: str = "t") -> bytes:
    return b"\x82" + encode("type") + encode(type_) + encode(key) + value


def batch_of(*events: bytes) -> bytes:
    assert len(events) < 16
    return bytes([0x90 + len(events)]) + b"".join(events)


@pytest.mark.parametrize("levels", [64, 63, 1, 0])
def test_data_may_nest_64_levels(levels: int) -> None:
    for data in (nested(levels), nested_maps(levels)):
        frame = decode_body(event_with("data", data), MAX_BATCH, MAX_EVENT)
        assert frame.rejected == [], levels
        assert len(frame.valid) == 1


@pytest.mark.parametrize("levels", [65, 66, 400, 499, 500, 501, 1000, 100_000])
def test_data_nested_deeper_is_invalid_naming_data(levels: int) -> None:
    for data in (nested(levels), nested_maps(levels), b"\x92\xc0" * levels + b"\x01"):
        body = event_with("data", data)
        frame = decode_body(body, MAX_BATCH, len(body))
        assert frame.rejected == [(0, "invalid", TOO_DEEP)], levels
        assert frame.rejected_raw == [body]


@pytest.mark.parametrize("levels", [70, 600, 5000])
def test_deep_events_cost_only_themselves(levels: int) -> None:
    body = batch_of(encode({"type": "a"}), event_with("data", nested(levels)),
                    nested(levels), encode({"type": "b", "data": [[1]]}),
                    event_with("data", b"\x92" + nested(levels) + b"\x01"))
    frame = decode_body(body, MAX_BATCH, MAX_EVENT)
    assert [v.event.type for v in frame.valid] == ["a", "b"]
    assert frame.rejected == [(1, "invalid", TOO_DEEP),
                              (2, "invalid", "event: expected object, got array"),
                              (4, "invalid", TOO_DEEP)]


@pytest.mark.parametrize("levels", [3, 70, 600, 5000])
def test_other_fields_nested_deeper_than_their_type_are_invalid_for_that_field(
        levels: int) -> None:
    cases = [
        ("tags", b"\x81\xa1k" + nested_maps(levels), "tags: expected str, got object"),
        ("tags", nested(levels), "tags: expected object, got array"),
        ("actor", nested(levels), "actor: expected str, got array"),
        ("ts", nested(levels), "ts: expected a timestamp, int (ns) or float (s)"),
        ("colour", nested(levels), "colour: unknown key"),
        ("seq", nested(levels), "seq: set by the daemon, a client may not send it"),
    ]
    for key, value, message in cases:
        for body in (event_with(key, value), batch_of(event_with(key, value))):
            assert decode_body(body, MAX_BATCH, MAX_EVENT).rejected == [
                (0, "invalid", message)], (key, levels)


def test_a_wide_but_shallow_frame_is_accepted() -> None:
    # Far more than 500 bytes that could open an array: the iterative scan clears it.
    batch = [{"type": "t", "data": [[i] for i in range(300)]} for _ in range(3)]
    frame = decode_body(encode(batch), MAX_BATCH, MAX_EVENT)
    assert frame.rejected == [] and len(frame.valid) == 3
    frame = decode_body(encode(batch[0]), MAX_BATCH, MAX_EVENT)
    assert frame.rejected == [] and len(frame.valid) == 1


@pytest.mark.parametrize(("body", "fragment"), [
    (event_with("data", nested(1000))[:-1], "truncated"),
    (event_with("data", nested(1000)) + b"\x00", "trailing characters"),
    (batch_of(event_with("data", nested(1000)))[:-1], "truncated"),
    (batch_of(event_with("data", nested(1000, b"\xc1"))), "invalid opcode"),
    (b"\xdd\xff\xff\xff\xff" + nested(1000), "truncated"),
])
def test_deep_and_malformed_is_still_bad_frame(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_body(body, MAX_BATCH, MAX_EVENT)
    assert info.value.code == "bad_frame"
    assert info.value.fatal is True
    assert fragment in info.value.message


def test_deep_batch_over_the_size_limit_is_batch_too_large() -> None:
    body = b"\x9b" + nested(1000) * 11
    with pytest.raises(ProtocolError) as info:
        decode_body(body, 10, MAX_EVENT)
    assert info.value.code == "batch_too_large"
    assert info.value.message == "batch of 11 events exceeds 10"


def test_deep_event_over_max_event_bytes_is_too_large() -> None:
    body = event_with("data", nested(5000))
    assert decode_body(body, MAX_BATCH, 1024).rejected == [
        (0, "too_large", f"event is {len(body)} bytes, over the 1024-byte limit")]


def test_an_unknown_key_that_would_not_read_as_a_name_is_quoted() -> None:
    # Found by tests/fuzz: the message read ": unknown key", naming nothing.
    assert only_message({"type": "t", "": 1}) == '"": unknown key'
    assert only_message({"type": "t", "a\nb": 1}) == '"a\\nb": unknown key'


@pytest.mark.parametrize(("data", "message"), [
    (b"\xa2\xff\xfe", "data: invalid UTF-8 encoded string"),
    (b"\x92\x01\xa1\xff", "data: invalid UTF-8 encoded string"),
    (b"\x81\x80\x02", "data: map keys must be hashable (byte 3)"),
    (b"\xc7\x0c\xff" + b"\xff" * 4 + b"\x00" * 8,
     "data: invalid MessagePack timestamp: nanoseconds out of range"),
])
def test_data_every_reader_cannot_decode_is_invalid_and_costs_only_its_event(
        data: bytes, message: str) -> None:
    body = batch_of(event_with("data", data), encode({"type": "fine"}))
    frame = decode_body(body, MAX_BATCH, MAX_EVENT)
    assert frame.rejected == [(0, "invalid", message)]
    assert [valid.index for valid in frame.valid] == [1]
