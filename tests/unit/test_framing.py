"""The length-prefix codec: split and partial frames, bad lengths, no I/O."""

from __future__ import annotations

import random

import msgspec
import pytest

from auditd.ingest.framing import HEADER_BYTES, FrameDecoder, encode_frame

# The protocol.md test vector: {"type": "user.login", "actor": "alice"} as a frame.
VECTOR = bytes.fromhex(
    "0000001d82a474797065aa757365722e6c6f67696ea5616374"
    "6f72a5616c696365"
)


def test_encode_frame_matches_the_protocol_test_vector() -> None:
    body = msgspec.msgpack.encode({"type": "user.login", "actor": "alice"})
    assert encode_frame(body) == VECTOR
    assert HEADER_BYTES == 4


def test_encode_frame_is_big_endian_length_then_body() -> None:
    assert encode_frame(b"\x90") == b"\x00\x00\x00\x01\x90"
    body = bytes(range(256)) * 3
    frame = encode_frame(body)
    assert frame[:4] == (768).to_bytes(4, "big") == b"\x00\x00\x03\x00"
    assert frame[4:] == body


def test_one_whole_frame_is_returned_once() -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(VECTOR) == [VECTOR[4:]]
    assert decoder.buffered == 0
    assert decoder.error is None
    assert decoder.feed(b"") == []


def test_frame_fed_one_byte_at_a_time() -> None:
    decoder = FrameDecoder(1 << 20)
    out: list[bytes] = []
    for i, byte in enumerate(VECTOR):
        got = decoder.feed(bytes([byte]))
        if i < len(VECTOR) - 1:
            assert got == []
            assert decoder.buffered == i + 1
        out += got
    assert out == [VECTOR[4:]]
    assert decoder.buffered == 0


def test_partial_header_waits_for_the_rest() -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.feed(b"\x00") == []
    assert decoder.error is None
    assert decoder.feed(b"\x02ab") == [b"ab"]


def test_many_frames_in_one_chunk_and_a_tail_split_across_chunks() -> None:
    bodies = [f"body-{i}".encode() * (i + 1) for i in range(50)]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(1 << 20)
    cut = len(stream) - 7
    first = decoder.feed(stream[:cut])
    assert first == bodies[:-1]
    assert decoder.buffered == len(encode_frame(bodies[-1])) - 7
    assert decoder.feed(stream[cut:]) == bodies[-1:]
    assert decoder.buffered == 0


def test_random_chunking_yields_the_same_bodies_in_order() -> None:
    rng = random.Random(1234)
    bodies = [rng.randbytes(rng.randint(1, 3000)) for _ in range(300)]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(4096)
    out: list[bytes] = []
    position = 0
    while position < len(stream):
        step = rng.randint(1, 5000)
        out += decoder.feed(stream[position : position + step])
        position += step
    assert out == bodies
    assert decoder.error is None


def test_length_zero_is_frame_too_large_and_fatal() -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(b"\x00\x00\x00\x00rest") == []
    error = decoder.error
    assert error is not None
    assert error.code == "frame_too_large"
    assert error.fatal is True
    assert error.message == "frame length 0 is outside 1..1048576 bytes"
    assert decoder.buffered == 0


def test_length_above_max_is_refused_before_any_body_is_buffered() -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(b"\xff\xff\xff\xff") == []
    error = decoder.error
    assert error is not None
    assert error.code == "frame_too_large"
    assert error.message == "frame length 4294967295 is outside 1..1048576 bytes"
    # Nothing is kept; whatever follows is ignored rather than buffered.
    assert decoder.buffered == 0
    assert decoder.feed(b"x" * 100_000) == []
    assert decoder.buffered == 0


def test_max_frame_bytes_is_inclusive() -> None:
    decoder = FrameDecoder(16)
    assert decoder.feed(encode_frame(b"a" * 16)) == [b"a" * 16]
    assert decoder.error is None
    assert decoder.feed((17).to_bytes(4, "big")) == []
    assert decoder.error is not None
    assert decoder.error.message == "frame length 17 is outside 1..16 bytes"


def test_frames_before_a_bad_length_are_still_returned_and_nothing_after() -> None:
    decoder = FrameDecoder(1 << 20)
    good = encode_frame(b"one") + encode_frame(b"two")
    assert decoder.feed(good + b"\x00\x00\x00\x00" + encode_frame(b"three")) == [b"one", b"two"]
    assert decoder.error is not None
    assert decoder.feed(encode_frame(b"four")) == []
    assert decoder.buffered == 0


@pytest.mark.parametrize("header", [b"\x00\x10\x00\x01", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
def test_bad_length_split_across_feeds(header: bytes) -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(header[:3]) == []
    assert decoder.error is None
    assert decoder.feed(header[3:]) == []
    assert decoder.error is not None
    assert decoder.error.code == "frame_too_large"
    assert str(int.from_bytes(header, "big")) in decoder.error.message
