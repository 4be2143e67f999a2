"""The depth scanner (auditd/ingest/depth.py) against msgspec and a recursive
reference: the same verdict on well-formedness, the exact depth, on any bytes."""

from __future__ import annotations

import json
from typing import Any

import fuzz_settings  # the hypothesis profile
import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from auditd.ingest import depth

raw_decoder = msgspec.msgpack.Decoder(msgspec.Raw)


def reference_depth(value: Any) -> int:
    if isinstance(value, list | tuple):
        return 1 + max((reference_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((max(reference_depth(k), reference_depth(v))
                        for k, v in value.items()), default=0)
    return 0


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=300), st.binary(max_size=300),
              st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=300))),
    lambda inner: st.lists(inner, max_size=18) | st.dictionaries(
        st.text(max_size=5) | st.integers(-(2**63), 2**63), inner, max_size=18),
    max_leaves=60)


@given(values)
def test_depth_of_any_value(value: Any) -> None:
    body = msgspec.msgpack.encode(value)
    assert depth.value_depth(body) == reference_depth(value)
    assert depth.within(body, 3) == (reference_depth(value) <= 3)
    assert depth.container_bound(body) >= reference_depth(value)
    assert depth.flatten(body, 64) == body or reference_depth(value) >= 64
    flat = depth.flatten(body, 2)
    assert depth.value_depth(flat) <= 2
    raw_decoder.decode(flat)


@given(st.binary(max_size=400))
@example(b"\x92\xc0" * 3000 + b"\x01")
@example(b"\x92\xc0" * 3000)
@example(b"\xdf\xff\xff\xff\xff\x01")
def test_well_formed_exactly_when_msgspec_says_so(body: bytes) -> None:
    try:
        raw_decoder.decode(body)
        msgspec_ok = True
    except msgspec.DecodeError:
        msgspec_ok = False
    except RecursionError:  # only the examples deeper than msgspec can go
        msgspec_ok = None
    try:
        depth.value_depth(body)
        ok = True
    except depth.MalformedError as exc:
        assert str(exc)
        ok = False
    assert msgspec_ok is None or ok == msgspec_ok


@given(st.recursive(st.none() | st.integers() | st.text(alphabet='[]{}"\\ax', max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), inner,
                                      max_size=4)), st.integers(0, 8))
def test_json_depth(value: Any, levels: int) -> None:
    text = json.dumps(value)
    assert depth.json_within(text, levels) == (reference_depth(value) <= levels)
    assert depth.json_within(text.encode(), levels) == (reference_depth(value) <= levels)


@given(st.text(alphabet='[]{}"\\ ,:a1', max_size=300))
def test_json_depth_never_raises_on_any_text(text: str) -> None:
    depth.json_within(text, 5)


# Each example is up to 12 values of up to 60 leaves: drawing one costs ~0.2 s, so this
# test takes fewer of them than the profile's default.
@settings(max_examples=fuzz_settings.examples(30))
@given(st.lists(values, max_size=12), st.integers(1, 600),
       st.sampled_from([b"", b"\xc1", b"\x91" * 700 + b"\x01", b"\x00"]), st.booleans())
def test_array_items_splits_as_the_walker_does(items: list[Any], levels: int, tail: bytes,
                                               cut: bool) -> None:
    encoded = [msgspec.msgpack.encode(item) for item in items]
    body = b"\xdd" + (len(items) + bool(tail)).to_bytes(4, "big") + b"".join(encoded) + tail
    if cut:
        body = body[:-1]
    try:
        walked = [(body[e.start:e.end], e.depth) for e in depth.items(body)]
    except depth.MalformedError as exc:
        try:
            depth.array_items(body, levels)
        except depth.MalformedError as again:
            assert str(again) == str(exc)
            return
        raise AssertionError("array_items accepted what the walker refused") from None
    split = depth.array_items(body, levels)
    assert [item for item, _ in split] == [item for item, _ in walked]
    for (_, bound), (_, exact) in zip(split, walked, strict=True):
        assert bound == exact or exact <= bound == levels
