"""The frame decoder fed arbitrary byte streams split at arbitrary points.

Properties: only the project's own error comes out (as `decoder.error`, never raised),
with a message; however the stream is split, the same bodies come out in the same
order; and after a refused frame the decoder is in its documented state: `error` set,
nothing buffered, every later feed returns nothing.
"""

from __future__ import annotations

import fuzz_settings  # noqa: F401  (the hypothesis profile)
from hypothesis import given
from hypothesis import strategies as st

from auditd.errors import ProtocolError
from auditd.ingest.framing import HEADER_BYTES, FrameDecoder, encode_frame


def reference(stream: bytes, max_frame_bytes: int) -> tuple[list[bytes], int | None]:
    """The bodies of `stream` and the bad length that stops it, read the slow way."""
    bodies, at = [], 0
    while len(stream) - at >= HEADER_BYTES:
        length = int.from_bytes(stream[at : at + HEADER_BYTES], "big")
        if not 1 <= length <= max_frame_bytes:
            return bodies, length
        if len(stream) - at - HEADER_BYTES < length:
            break
        bodies.append(stream[at + HEADER_BYTES : at + HEADER_BYTES + length])
        at += HEADER_BYTES + length
    return bodies, None


def feed_in_pieces(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = max(start, cut)
    return out


frames = st.lists(st.binary(min_size=1, max_size=64).map(encode_frame), max_size=8)
noise = st.binary(max_size=40)
streams = st.lists(st.one_of(frames.map(b"".join), noise), max_size=6).map(b"".join)


@given(stream=streams, cuts=st.lists(st.integers(0, 600), max_size=12),
       max_frame_bytes=st.integers(1, 80), after=st.binary(max_size=64))
def test_any_stream_any_split(stream: bytes, cuts: list[int], max_frame_bytes: int,
                              after: bytes) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    bodies = feed_in_pieces(decoder, stream, cuts)
    expected, bad_length = reference(stream, max_frame_bytes)
    assert bodies == expected
    assert all(1 <= len(body) <= max_frame_bytes for body in bodies)
    if bad_length is None:
        assert decoder.error is None
        consumed = sum(HEADER_BYTES + len(body) for body in bodies)
        assert decoder.buffered == len(stream) - consumed
        return
    error = decoder.error
    assert isinstance(error, ProtocolError)
    assert (error.code, error.fatal) == ("frame_too_large", True)
    assert error.message == (f"frame length {bad_length} is outside 1..{max_frame_bytes} "
                             "bytes")
    # The documented state after a refused frame: nothing buffered, nothing more out.
    assert decoder.buffered == 0
    assert decoder.feed(after) == [] and decoder.feed(encode_frame(b"x")) == []
    assert decoder.buffered == 0 and decoder.error is error


@given(stream=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=30))
def test_random_bytes_split_anywhere_equal_one_feed(stream: bytes, cuts: list[int]) -> None:
    whole = FrameDecoder(1 << 20)
    pieces = FrameDecoder(1 << 20)
    assert feed_in_pieces(pieces, stream, cuts) == whole.feed(stream)
    assert (pieces.error is None) == (whole.error is None)
    if whole.error is not None:
        assert pieces.error is not None and pieces.error.message == whole.error.message
    assert pieces.buffered == whole.buffered
