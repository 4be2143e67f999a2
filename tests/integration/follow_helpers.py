"""A /tail reader over the real status socket, for the follow tests.

http.client decodes the chunked body; `next()` returns one JSON line at a time, so a
test reads exactly as far as it needs, or stops reading to play a slow client.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from auditd.client import Client


class TailReader:
    def __init__(self, status_socket: str, query: str, *, rcvbuf: int | None = None,
                 timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small window: a client that stops reading fills fast
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(status_socket)
        self.conn = http.client.HTTPConnection("auditd", timeout=timeout)
        self.conn.sock = self.sock
        self.conn.request("GET", f"/tail?{query}")
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def next(self) -> dict[str, Any] | None:
        """The next line as JSON; None at the end of the body."""
        line = self.response.readline()
        if not line:
            return None
        document: dict[str, Any] = json.loads(line)
        return document

    def events(self, count: int) -> list[dict[str, Any]]:
        """The next `count` events (heartbeats skipped); fails on a final line or EOF."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            line = self.next()
            assert line is not None, f"stream ended after {len(found)} of {count} events"
            assert "error" not in line, line
            if "seq" in line:
                found.append(line)
        return found

    def rest(self) -> list[dict[str, Any]]:
        """Every line to the end of the body."""
        lines = []
        while (line := self.next()) is not None:
            lines.append(line)
        return lines

    def close(self) -> None:
        self.conn.close()
        self.sock.close()

    def __enter__(self) -> TailReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send(ingest_socket: str, count: int, type_: str = "test.follow", **fields: Any) -> list[int]:
    """`count` events; their seqs."""
    events = [{"type": type_, "data": {"i": i}, **fields} for i in range(count)]
    seqs: list[int] = []
    with Client(ingest_socket) as client:
        for reply in client.send_many(events, batch=500):
            assert reply.first is not None and reply.last is not None, reply
            seqs.extend(range(reply.first, reply.last + 1))
    return seqs


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
