"""Length-prefix framing: a big-endian uint32 length, then that many bytes. No I/O here."""

from __future__ import annotations

from auditd.errors import ProtocolError

HEADER_BYTES = 4


def encode_frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_BYTES, "big") + body


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    Invariant: a length of 0 or above `max_frame_bytes` is refused as soon as its four
    header bytes arrive, before any of the body is buffered, so a hostile 4 GiB prefix
    costs nothing. However the stream is split across feeds, the same bodies come out
    in the same order. Nothing here raises.

    State after a refused frame: `error` holds the fatal `frame_too_large` ProtocolError
    (its message gives the length and the bounds), the buffer is empty (`buffered` is
    0), and every later `feed` returns [] and keeps nothing; the bodies complete before
    the bad length were returned by the feed that met it.
    """

    __slots__ = ("_buffer", "error", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete bodies, in order.

        When a bad length is met, the bodies before it are still returned and
        `self.error` is set.
        """
        if self.error is not None:
            return []
        buffer = self._buffer
        buffer += data
        bodies: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_BYTES:
            length = int.from_bytes(buffer[offset : offset + HEADER_BYTES], "big")
            if length == 0 or length > self.max_frame_bytes:
                self.error = ProtocolError(
                    "frame_too_large",
                    f"frame length {length} is outside 1..{self.max_frame_bytes} bytes",
                    fatal=True,
                )
                buffer.clear()
                return bodies
            stop = offset + HEADER_BYTES + length
            if stop > end:
                break
            bodies.append(bytes(buffer[offset + HEADER_BYTES : stop]))
            offset = stop
        if offset:
            del buffer[:offset]
        return bodies

    @property
    def buffered(self) -> int:
        return len(self._buffer)
