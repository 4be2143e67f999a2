"""Export files on disk: written whole or not at all, zstd by name; read back as a
stream of values (MessagePack or JSON lines), compressed or not.

A file is written under a temporary name beside FILE and renamed over it only once
complete and flushed, so a failed or interrupted export never leaves a file named
FILE that looks whole. A `.zst` name compresses the whole file as one zstd frame,
streaming (zstandard's stream writer): memory stays flat at any size. Reading detects
zstd by its magic number, not the name.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

import msgspec
import zstandard

from auditd.lifecycle.manifest import ManifestError
from auditd.store.durable import fsync_directory

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_LEVEL = 3  # zstd's default: ~4x on events at several hundred MB/s a core
_SPLITTER = msgspec.msgpack.Decoder(list[msgspec.Raw])
_TRAILING = re.compile(r"trailing characters \(byte (\d+)\)")
_FIRST_GUESS = 4096


class Output:
    """Where an export writes: FILE (atomically, zstd for .zst) or stdout (`-`/None)."""

    def __init__(self, path: str | None) -> None:
        self.path = None if path in (None, "-") else Path(path)
        self._temp: Path | None = None
        self._raw: BinaryIO
        self._zstd: zstandard.ZstdCompressionWriter | None = None
        self.bytes_in = 0
        if self.path is None:
            self._raw = sys.stdout.buffer
            return
        if self.path.is_dir():
            raise OSError(f"-o {path}: is a directory")
        self._temp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._raw = self._temp.open("wb")
        if self.path.name.endswith(".zst"):
            self._zstd = zstandard.ZstdCompressor(level=_LEVEL).stream_writer(
                self._raw, closefd=False)

    def write(self, data: bytes) -> None:
        self.bytes_in += len(data)
        (self._zstd or self._raw).write(data)

    def commit(self) -> int:
        """Finish the frame, flush to disk and rename into place; the bytes written."""
        if self._zstd is not None:
            self._zstd.close()  # type: ignore[no-untyped-call]  # (zstandard's stubs) writes the frame's end
        self._raw.flush()
        if self._temp is None or self.path is None:
            return self.bytes_in
        os.fsync(self._raw.fileno())
        size = self._raw.tell()
        self._raw.close()
        os.replace(self._temp, self.path)
        self._temp = None
        # The rename itself durable: retention deletes what it archived after this.
        fsync_directory(self.path.parent)
        return size

    def abandon(self) -> None:
        """Drop a partial file (an error or Ctrl-C during the export)."""
        if self._temp is None:
            return
        with contextlib.suppress(Exception):
            self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()
        self._temp = None


def open_input(path: str) -> tuple[IO[bytes], bool]:
    """FILE for reading, decompressed when it is zstd (by its magic); and whether it was."""
    raw = Path(path).open("rb")  # noqa: SIM115 - the caller closes what this returns
    head = raw.read(4)
    raw.seek(0)
    if head == ZSTD_MAGIC:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=True)
        return reader, True
    return raw, False


def _read(stream: IO[bytes]) -> bytes:
    try:
        return stream.read(_CHUNK)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"the zstd stream is damaged: {exc}") from None


def msgpack_values(stream: IO[bytes]) -> Iterator[bytes]:
    """The MessagePack values concatenated in `stream`, in order.

    msgspec finds the boundaries: a buffer is decoded as an array of `guess` raw
    values behind a made-up array header; "trailing characters (byte N)" says where
    the values that fit end, "truncated" that fewer fit (the guess is cut). A value
    cut by the end of the stream is a ManifestError: the file is truncated.
    """
    buffer = b""
    at_end = False
    guess = _FIRST_GUESS
    while True:
        if not at_end and len(buffer) < _CHUNK:
            more = _read(stream)
            at_end = not more
            buffer += more
        if not buffer:
            return
        header = b"\xdd" + guess.to_bytes(4, "big")
        try:
            values = _SPLITTER.decode(header + buffer)
            used = len(buffer)
        except msgspec.DecodeError as exc:
            message = str(exc)
            trailing = _TRAILING.search(message)
            if trailing is not None:
                used = int(trailing.group(1)) - len(header)
                values = _SPLITTER.decode(header + buffer[:used])
            elif "truncated" in message:
                if guess > 1:  # fewer values than guessed: try fewer first
                    guess = max(1, guess // 4)
                    continue
                if not at_end:
                    more = _read(stream)
                    at_end = not more
                    buffer += more
                    continue
                raise ManifestError(f"the stream ends inside a value ({len(buffer)} "
                                    "bytes left over): the file is truncated") from None
            else:
                raise ManifestError(f"not MessagePack after value boundary: {exc}") from None
        for value in values:
            yield bytes(value)
        buffer = buffer[used:]
        guess = min(_FIRST_GUESS * 4, max(guess * 2, 1))


def json_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of `stream`, without their newline; a last line without one too
    (the reader decides whether that is a cut value)."""
    rest = b""
    while True:
        more = _read(stream)
        if not more:
            break
        lines = (rest + more).split(b"\n")
        rest = lines.pop()
        yield from (line for line in lines if line)
    if rest:
        yield rest
