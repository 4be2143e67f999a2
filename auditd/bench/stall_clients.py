"""The stall benchmarks' clients (`auditd bench --stall`): a connection that never
reads its replies, one that sends on through a shutdown until the daemon is gone, and
the team that starts them, with the bench's paced client, and releases them together.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import select
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from auditd.bench.clients import make_event
from auditd.errors import AuditdError
from auditd.ingest.framing import FrameDecoder, encode_frame
from auditd.schema import encoder

_FLOOD_DUPLICATES = 20  # a non-reader's frame: this many copies of one stored event
_LOAD_WINDOW = 4  # frames in flight on each connection of the shutdown load


class ClientTeam:
    """Client processes, each connected and ready before all are released together."""

    def __init__(self) -> None:
        self.context = mp.get_context("spawn")  # not fork: the parent holds sqlite threads
        self.go, self.stop = self.context.Event(), self.context.Event()
        self.results = self.context.Queue()
        self.procs: list[Any] = []
        self.released_at = 0.0

    def add(self, target: Callable[..., None], *args: Any) -> None:
        self.procs.append(self.context.Process(target=target, daemon=True,
                                               args=(*args, self.go, self.results)))

    def results_as_they_come(self, tick: Callable[[], None] | None = None,
                             ) -> Iterator[tuple[str, Any]]:
        """Start every process, release them once all are ready, and yield each one's
        result; `tick` runs while none comes. A failed or dead process fails the run."""
        for proc in self.procs:
            proc.start()
        ready = finished = 0
        while finished < len(self.procs):
            try:
                kind, payload = self.results.get(timeout=0.1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in self.procs):
                    raise AuditdError("a bench client process died") from None
                if tick is not None and self.go.is_set():
                    tick()
                continue
            if kind == "failed":
                raise AuditdError(payload)
            if kind == "ready":
                ready += 1
                if ready == len(self.procs):
                    self.released_at = time.monotonic()
                    self.go.set()
                continue
            finished += 1
            yield kind, payload

    def __enter__(self) -> ClientTeam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for proc in self.procs:
            if proc.pid is not None:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()


def non_reader_process(path: str, event_id: str, stop: Any, go: Any, results: Any) -> None:
    """Write frames as fast as the daemon reads them and never read a reply, until
    `stop`; then report the bytes the daemon took. Each frame is copies of an event
    already stored: cheap to answer, nothing to store, a reply a fair share of its size."""
    try:
        frame = encode_frame(encoder.encode([{"type": "bench.flood", "id": event_id}]
                                            * _FLOOD_DUPLICATES))
        chunk = memoryview(frame * max(1, 65536 // len(frame)))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            results.put(("ready", None))
            go.wait()
            sock.setblocking(False)
            offset = sent = 0
            while not stop.is_set():
                if not select.select([], [sock], [], 0.1)[1]:
                    continue
                with contextlib.suppress(BlockingIOError):
                    written = sock.send(chunk[offset:])
                    sent += written
                    offset = (offset + written) % len(chunk)  # chunk holds whole frames
        results.put(("non-reader", {"bytes_sent": sent}))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"bench non-reader: {exc!r}"))


def stopping_load_process(path: str, first: int, batch: int, go: Any, results: Any) -> None:
    """Pipeline `batch`-event frames (_LOAD_WINDOW in flight) until the daemon closes the
    connection, through its shutdown; tally events acknowledged and frames refused.
    Frames refused are sent again (they stored nothing), as a client retries: no time
    lost building new ones while the daemon answers `shutting_down` as fast as it can."""
    try:
        window, number, resend = _LOAD_WINDOW, first, False
        tally: Counter[str] = Counter()
        decoder = FrameDecoder(1 << 24)
        out = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            results.put(("ready", None))
            go.wait()
            try:
                while True:
                    if not resend:
                        out = b"".join(encode_frame(encoder.encode(
                            [make_event(number + at + i) for i in range(batch)]))
                            for at in range(0, window * batch, batch))
                        number += window * batch
                    sock.sendall(out)
                    answered, resend = 0, False
                    while answered < window:
                        data = sock.recv(1 << 16)
                        if not data:
                            raise ConnectionResetError
                        for body in decoder.feed(data):
                            reply = msgspec.msgpack.decode(body)
                            tally["ok"] += reply.get("ok", 0)
                            if "error" in reply:
                                tally[f"error:{reply['error']}"] += 1
                                resend = True
                            answered += 1
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon exited: what this run is for
        results.put(("load", dict(tally)))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"bench load client: {exc!r}"))
