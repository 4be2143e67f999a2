"""Hostile frames for `auditd bench --fuzz`: random bytes and values, and valid frames
mutated (bit flips, truncations, bad lengths, deep nesting, huge strings, wrong types,
reserved and unknown keys). Deterministic for a given `random.Random`."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgspec

from auditd.bench.clients import make_event
from auditd.schema import RESERVED_KEYS

encode = msgspec.msgpack.encode
_FIELDS = ("type", "actor", "target", "id", "ts", "stream", "expect", "correlation_id",
           "causation_id", "tags", "data")


def _scalar(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"),
        float("inf"), "", "x" * rng.randint(1, 300), "é✓" * rng.randint(1, 40),
        b"\x00\xff" * rng.randint(0, 40), msgspec.msgpack.Ext(rng.randint(-128, 127), b"q"),
        rng.randint(-(2**40), 2**40)])


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random MessagePack value: scalars, arrays and maps a few levels deep."""
    roll = rng.random()
    if depth >= 4 or roll < 0.55:
        return _scalar(rng)
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(["type", "data", "k", 1, None, b"b", "seq"]): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def nested(levels: int, leaf: bytes = b"\x01", opener: bytes = b"\x91") -> bytes:
    """`levels` containers one inside the other, as bytes (no recursive encoder)."""
    return opener * levels + leaf


def _event_with(key: bytes, value: bytes) -> bytes:
    return b"\x82\xa4type\xa9fuzz.deep" + key + value


def _valid_event(rng: random.Random) -> dict[str, Any]:
    event = make_event(rng.randint(0, 1_000_000))
    if rng.random() < 0.5:
        event.pop("id")  # the daemon assigns one; ids from make_event are unique anyway
    return event


def valid_body(rng: random.Random) -> bytes:
    if rng.random() < 0.6:
        return encode(_valid_event(rng))
    return encode([_valid_event(rng) for _ in range(rng.randint(1, 20))])


def _deep(rng: random.Random) -> bytes:
    levels = rng.choice([63, 64, 65, 66, 499, 500, 501, 1000, rng.randint(2, 2000)])
    if rng.random() < 0.01:
        levels = rng.randint(2000, 50_000)
    opener = rng.choice([b"\x91", b"\x81\xa1k", b"\x92\xc0", b"\xdc\x00\x01"])
    value = nested(levels, opener=opener)
    shape = rng.randrange(4)
    if shape == 0:
        return value  # the whole body
    if shape == 1:
        return _event_with(b"\xa4data", value)
    if shape == 2:
        key = rng.choice([b"\xa4tags", b"\xa5actor", b"\xa2ts", b"\xa3seq", b"\xa1z"])
        return _event_with(key, value)
    return b"\x93" + encode({"type": "fuzz.ok"}) + _event_with(b"\xa4data", value) + value


def _wrong_type(rng: random.Random) -> bytes:
    event = _valid_event(rng)
    event[rng.choice(_FIELDS)] = random_value(rng)
    return encode(event)


def _reserved_or_unknown(rng: random.Random) -> bytes:
    event = _valid_event(rng)
    key = rng.choice([*sorted(RESERVED_KEYS), "colour", "Type", "", "data "])
    event[key] = random_value(rng)
    return encode(event)


def _huge_string(rng: random.Random) -> bytes:
    event = _valid_event(rng)
    size = rng.choice([255, 256, 257, 511, 512, 513, 2**16, rng.randint(1, 900_000)])
    event[rng.choice(["actor", "target", "type", "data", "stream", "id"])] = "s" * size
    return encode(event)


def _limits(rng: random.Random) -> bytes:
    """A field at one of protocol.md's limits, or one past it."""
    field, low, high = rng.choice([("type", 1, 200), ("actor", 0, 256), ("target", 0, 512),
                                   ("id", 1, 128), ("stream", 1, 256),
                                   ("correlation_id", 0, 128), ("causation_id", 0, 128)])
    event: dict[str, Any] = {"type": "fuzz.limit"}
    event[field] = "v" * rng.choice([low - 1, low, high, high + 1] if low else [high, high + 1])
    if rng.random() < 0.3:
        event["tags"] = {f"k{i}": "v" for i in range(rng.choice([32, 33]))}
    return encode(event)


def _bit_flips(body: bytes, rng: random.Random) -> bytes:
    flipped = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(flipped))
        flipped[at] ^= 1 << rng.randrange(8)
    return bytes(flipped)


# Weights: the mutations that end a connection (most bit flips and truncations, random
# bytes, a scalar body) are a tenth or so, so that connections carry several frames.
_BODIES: list[tuple[float, Callable[[random.Random], bytes]]] = [
    (0.24, valid_body),
    (0.05, lambda rng: _bit_flips(valid_body(rng), rng)),
    (0.03, lambda rng: (lambda b: b[: rng.randrange(1, len(b))] if len(b) > 1 else b)(
        valid_body(rng))),
    (0.12, _deep),
    (0.16, _wrong_type),
    (0.12, _reserved_or_unknown),
    (0.005, _huge_string),
    (0.16, _limits),
    (0.05, lambda rng: encode(random_value(rng))),
    (0.02, lambda rng: rng.randbytes(rng.randint(1, 200))),
]
_WEIGHTS = [weight for weight, _ in _BODIES]


def body(rng: random.Random) -> bytes:
    """One random or mutated frame body, never empty."""
    (make,) = rng.choices([make for _, make in _BODIES], _WEIGHTS)
    made = make(rng)
    return made or b"\xc0"


def frame(rng: random.Random, max_frame_bytes: int) -> bytes:
    """One frame: mostly a body with its true length; sometimes a bad length (0, over
    the limit, random) or a flipped header bit, which desynchronise what follows."""
    made = body(rng)
    roll = rng.random()
    if roll < 0.01:
        length = rng.choice([0, max_frame_bytes + 1, 2**32 - 1, rng.randrange(2**32)])
    elif roll < 0.02:
        length = len(made) ^ (1 << rng.randrange(32))
    else:
        length = len(made)
    return length.to_bytes(4, "big") + made
