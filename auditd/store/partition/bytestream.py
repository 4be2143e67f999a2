"""A byte stream kept in a table of fixed-size rows, so that variable-sized frames
(record blocks, postings chunks) pack pages with no gap: a frame is found by its byte
position, and may span two or three rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from auditd.store.partition.layout import STREAM_ROW


class StreamWriter:
    def __init__(self, conn: sqlite3.Connection, table: str) -> None:
        self.conn = conn
        self.insert = f"INSERT INTO {table} VALUES (?, ?)"
        self.position = 0
        self.pending = bytearray()
        self.rows: list[tuple[int, bytes]] = []

    def append(self, data: bytes) -> int:
        """Where `data` starts in the stream."""
        start = self.position
        self.position += len(data)
        pending = self.pending
        pending += data
        if len(pending) >= STREAM_ROW:
            row = (start + len(data) - len(pending)) // STREAM_ROW
            cut = len(pending) - len(pending) % STREAM_ROW
            for at in range(0, cut, STREAM_ROW):
                self.rows.append((row, bytes(pending[at:at + STREAM_ROW])))
                row += 1
            del pending[:cut]
            if len(self.rows) >= 256:
                self.conn.executemany(self.insert, self.rows)
                self.rows = []
        return start

    def close(self) -> None:
        if self.pending:
            self.rows.append((self.position // STREAM_ROW, bytes(self.pending)))
            self.pending = bytearray()
        self.conn.executemany(self.insert, self.rows)
        self.rows = []


def read_stream(run: Callable[[str, tuple[int, ...]], list[tuple[Any, ...]]],
                select_rows: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a stream; `select_rows` takes the first and last row."""
    first, last = start // STREAM_ROW, (end - 1) // STREAM_ROW
    rows = run(select_rows, (first, last))
    if len(rows) != last - first + 1:
        raise ValueError(f"stream rows {first}-{last} missing")
    data = rows[0][0] if len(rows) == 1 else b"".join(row[0] for row in rows)
    skip = start - first * STREAM_ROW
    return bytes(data[skip:skip + end - start])
