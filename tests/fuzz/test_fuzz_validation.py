"""validation.decode_body fed arbitrary bytes, arbitrary MessagePack values, and events
at every protocol.md limit and one past it.

Properties: only ProtocolError comes out (bad_frame or batch_too_large, with a
message); otherwise every event of the frame is accounted for exactly once, accepted or
rejected with a code and a message naming a field; an event is accepted exactly when
the protocol's rules say so.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import fuzz_settings  # noqa: F401  (the hypothesis profile)
import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from auditd.errors import ProtocolError
from auditd.ingest.validation import DecodedFrame, decode_body
from auditd.schema import RESERVED_KEYS

encode = msgspec.msgpack.encode
MAX_BATCH, MAX_EVENT = 50, 4096
FIELDS = {"type", "actor", "target", "id", "ts", "stream", "expect", "correlation_id",
          "causation_id", "tags", "data"}
MESSAGE = re.compile(r"^[^\n]+: \S.*$", re.DOTALL)  # `field: problem`
TOO_LARGE = re.compile(r"^event is \d+ bytes, over the \d+-byte limit$")


def check_frame(body: bytes, max_batch: int = MAX_BATCH,
                max_event: int = MAX_EVENT) -> DecodedFrame | None:
    """decode_body's contract on any body; None when the frame was refused whole."""
    try:
        frame = decode_body(body, max_batch, max_event)
    except ProtocolError as exc:
        assert exc.code in ("bad_frame", "batch_too_large"), exc.code
        assert exc.message and exc.fatal == (exc.code == "bad_frame")
        return None
    indexes = sorted([v.index for v in frame.valid] + [r[0] for r in frame.rejected])
    count = len(indexes)
    assert indexes == list(range(count))
    assert len(frame.rejected_raw) == len(frame.rejected)
    for _, code, message in frame.rejected:
        assert code in ("invalid", "too_large"), code
        assert (MESSAGE if code == "invalid" else TOO_LARGE).match(message), message
    return frame


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.text(max_size=40), st.binary(max_size=40),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=8)))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(sorted(FIELDS))),
                    inner, max_size=5)), max_leaves=30)


@given(st.binary(min_size=1, max_size=300))
@example(b"\x91" * 2000 + b"\x01")
@example(b"\xdd\xff\xff\xff\xff")
@example(b"\x81\xa4data" + b"\x92\xc0" * 3000 + b"\x01")
def test_arbitrary_bytes(body: bytes) -> None:
    check_frame(body)


@given(values)
def test_arbitrary_values(value: Any) -> None:
    frame = check_frame(encode(value))
    if isinstance(value, dict | list) and (not isinstance(value, list)
                                           or len(value) <= MAX_BATCH):
        assert frame is not None  # well-formed: only a scalar body is bad_frame


# -- every limit of protocol.md, and one past it --------------------------------------

LIMITS = {"type": (1, 200), "actor": (0, 256), "target": (0, 512), "id": (1, 128),
          "stream": (1, 256), "correlation_id": (0, 128), "causation_id": (0, 128)}


def around(low: int, high: int) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted({max(0, low - 1), low, low + 1, high - 1, high, high + 1}))


@st.composite
def events_at_limits(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """An event and the set of fields that break a rule (empty: it must be accepted)."""
    event: dict[str, Any] = {}
    bad: set[str] = set()
    for name, (low, high) in LIMITS.items():
        if name != "type" and not draw(st.booleans()):
            continue
        size = draw(around(low, high))
        event[name] = draw(st.sampled_from("aé✓")) * size
        if not low <= size <= high:
            bad.add(name)
    if draw(st.booleans()):
        entries = draw(st.sampled_from([0, 1, 31, 32, 33]))
        key_size, value_size = draw(around(0, 64)), draw(around(0, 256))
        event["tags"] = {f"{i:0{max(key_size, 2)}d}"[-max(key_size, 2):]: "v" * value_size
                         for i in range(entries)}
        if key_size < 2 and entries:
            event["tags"] = {"k" * key_size: "v" * value_size}
        tags = event["tags"]
        if len(tags) > 32 or any(len(k) > 64 for k in tags) or any(
                len(v) > 256 for v in tags.values()):
            bad.add("tags")
    if draw(st.booleans()):
        event["expect"] = draw(st.sampled_from([-1, 0, 1, 2**63 - 1]))
        if event["expect"] < 0 or "stream" not in event:
            bad.add("expect")
    if draw(st.booleans()):
        event["data"] = draw(values)
    extra = draw(st.sampled_from([None, *sorted(RESERVED_KEYS), "colour", "Type", "data "]))
    if extra is not None:
        event[extra] = 1
        bad.add(extra)
    return event, bad


@given(events_at_limits())
def test_limits_plus_and_minus_one(case: tuple[dict[str, Any], set[str]]) -> None:
    event, bad = case
    frame = check_frame(encode(event), max_event=1 << 20)
    assert frame is not None
    if not bad:
        assert frame.rejected == [] and len(frame.valid) == 1, event
        return
    ((index, code, message),) = frame.rejected
    assert (index, code) == (0, "invalid")
    assert message.split(":")[0] in bad, (message, bad)


@st.composite
def nests(draw: st.DrawFn, levels: int) -> bytes:
    """A value nesting exactly `levels` arrays and maps of random shapes, as bytes: a
    random run of up to 16 shapes, repeated (a draw a level made 3,000-level examples
    so slow that on a loaded machine the test outran its 180 s)."""
    shapes = draw(st.lists(st.sampled_from([b"\x91", b"\x81\xa1k", b"\x92\xc0",
                                            b"\xdc\x00\x01", b"\x82\xa1a\x01\xa1b"]),
                           min_size=1, max_size=16))
    out = b"".join(shapes[i % len(shapes)] for i in range(levels))
    return out + draw(st.sampled_from([b"\x01", b"\xa3abc", b"\x90", b"\x80"]))


@given(st.data(), st.sampled_from([0, 1, 2, 63, 64, 65, 66, 200, 499, 500, 501, 1000, 3000]))
def test_depth_64_is_the_most_data_may_nest(data: st.DataObject, levels: int) -> None:
    value = data.draw(nests(levels))
    leaf_levels = levels + (value[-1:] in (b"\x90", b"\x80"))  # an empty one is a level
    event = b"\x82\xa4type\xa1t\xa4data" + value
    batch = b"\x93" + encode({"type": "before"}) + event + encode({"type": "after"})
    for body, index in ((event, 0), (batch, 1)):
        frame = check_frame(body, max_event=1 << 20)
        assert frame is not None
        deep = [r for r in frame.rejected if r[0] == index]
        if leaf_levels <= 64:
            assert deep == []
        else:
            assert deep == [(index, "invalid", "data: nested deeper than 64 levels")]
        assert {v.index for v in frame.valid} >= ({0, 2} if index else set())


@given(st.integers(1, 12), st.integers(1, 12))
def test_max_batch_events(events: int, limit: int) -> None:
    frame = check_frame(encode([{"type": "t"}] * events), max_batch=limit)
    assert (frame is None) == (events > limit)


@given(st.integers(0, 300), st.sampled_from([64, 128, 256]))
def test_max_event_bytes(padding: int, limit: int) -> None:
    event = encode({"type": "t", "data": "x" * padding})
    frame = check_frame(event, max_event=limit)
    assert frame is not None
    if len(event) > limit:
        assert frame.rejected == [(0, "too_large",
                                   f"event is {len(event)} bytes, over the {limit}-byte limit")]
    else:
        assert frame.rejected == []


@pytest.mark.parametrize("key", sorted(RESERVED_KEYS))
def test_reserved_keys_at_any_depth_name_the_key(key: str) -> None:
    for value in (b"\x01", b"\x91" * 1000 + b"\x01"):
        body = b"\x82\xa4type\xa1t" + encode(key) + value
        frame = check_frame(body)
        assert frame is not None
        assert frame.rejected == [(0, "invalid", f"{key}: set by the daemon, a client may "
                                   "not send it")]
