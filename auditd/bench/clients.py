"""The bench's clients: separate processes, each pipelining pre-encoded frames on one
raw socket, paced or flooding, timing each reply."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import queue
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from auditd.errors import AuditdError
from auditd.ingest.framing import FrameDecoder, encode_frame
from auditd.schema import encoder, uuid7


def make_event(i: int) -> dict[str, Any]:
    """Event number i: ~300 bytes encoded, with the repetition real audit logs have."""
    return {
        "type": ("user.login", "file.read", "file.write", "user.logout")[i % 4],
        "actor": f"user{i % 1000}", "target": f"/srv/file/{i % 5000}", "id": uuid7(),
        "stream": f"orders/{i % 100}",
        "tags": {"workspace": f"ws{i % 10}", "session": f"sess-{i % 777:05d}",
                 "severity": "info", "outcome": "success"},
        "data": {"ip": f"10.0.{i % 256}.{i % 200}", "bytes": i * 7, "ok": True,
                 "agent": "Mozilla/5.0 (X11; Linux x86_64) auditd-bench/1.0",
                 "path": f"/srv/file/{i % 5000}"},
    }


@dataclass(frozen=True)
class ClientSpec:
    socket: str
    first: int  # number of this client's first event, so that clients' events differ
    events: int
    batch: int
    window: int
    interval_s: float  # between two frames of this client; 0 floods
    duration_s: float | None


def client_process(spec: ClientSpec, go: Any, results: Any) -> None:
    """One client process: build its frames, connect, say ready, wait for go, drive."""
    try:
        events = [make_event(i) for i in range(spec.first, spec.first + spec.events)]
        if spec.batch == 1:  # one event a frame is a bare map, as a simple client sends
            frames = [encode_frame(encoder.encode(e)) for e in events]
        else:
            frames = [encode_frame(encoder.encode(events[at:at + spec.batch]))
                      for at in range(0, len(events), spec.batch)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(spec.socket)
            results.put(("ready", None))
            go.wait()
            sock.setblocking(False)
            results.put(("done", drive(sock, frames, spec)))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"bench client: {exc!r}"))


def drive(sock: socket.socket, frames: Sequence[bytes], spec: ClientSpec) -> dict[str, Any]:
    """Keep up to `window` frames in flight, paced when interval_s > 0; tally replies.

    One thread and select() rather than a reader thread: no GIL hand-offs between
    sending and reading to distort latencies. A frame's latency runs from when it was
    due (paced) or queued (flood) to when its reply was read, so a daemon that stops
    reading is charged for the wait.
    """
    decoder = FrameDecoder(64 * 1024 * 1024)
    out = bytearray()
    sent_at: deque[float] = deque()
    latencies: list[float] = []
    tally: Counter[str] = Counter()
    total, queued, answered = len(frames), 0, 0
    start = due = last_send = time.monotonic()
    deadline = start + spec.duration_s if spec.duration_s else math.inf
    while True:
        now = time.monotonic()
        # Stop offering at the deadline; collect what is in flight. Paced, the frames
        # due before it still go (the loop can wake late: the last one was lost then).
        if now >= deadline and (not spec.interval_s or due >= deadline):
            total = queued
        if answered >= total:
            break
        while queued < total and queued - answered < spec.window and due <= now:
            out += frames[queued]
            sent_at.append(due if spec.interval_s else now)
            queued += 1
            due += spec.interval_s
        if out:
            with contextlib.suppress(BlockingIOError):  # the daemon is not reading
                del out[:sock.send(out)]
            if not out:
                last_send = time.monotonic()
        timeout = None  # window full or all sent: wait for a reply or a drained socket
        if queued < total and queued - answered < spec.window:
            timeout = max(0.0, min(due, deadline) - time.monotonic())
        readable, _, _ = select.select([sock], [sock] if out else [], [], timeout)
        if not readable:
            continue
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError(f"the daemon closed the connection after {answered} replies")
        now = time.monotonic()
        for body in decoder.feed(data):
            latencies.append((now - sent_at.popleft()) * 1000)
            reply = msgspec.msgpack.decode(body)
            tally["ok"] += reply.get("ok", 0)
            tally["rejected"] += len(reply.get("rejected", ()))
            tally["duplicates"] += len(reply.get("duplicates", ()))
            if "error" in reply:
                tally[f"error:{reply['error']}"] += 1
            answered += 1
    return {"sent": min(spec.events, queued * spec.batch), "tally": tally,
            "first_send": start, "last_send": last_send, "last_reply": time.monotonic(),
            "latencies": latencies}


ClientTarget = Callable[[ClientSpec, Any, Any], None]  # (spec, go, results), as client_process


def run_clients(specs: list[ClientSpec], target: ClientTarget = client_process,
                on_start: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Start every client, release them together once all are ready, collect results.

    `target` is the clients' body; `on_start` is called as they are released."""
    context = mp.get_context("spawn")  # not fork: the parent holds a sqlite thread
    go, results = context.Event(), context.Queue()
    procs = [context.Process(target=target, args=(spec, go, results), daemon=True)
             for spec in specs]
    for proc in procs:
        proc.start()
    try:
        ready, done = 0, list[dict[str, Any]]()
        while len(done) < len(specs):
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:  # see that no client died without a word
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise AuditdError("a bench client process died") from None
                continue
            if kind == "failed":
                raise AuditdError(payload)
            ready += kind == "ready"
            if kind == "ready" and ready == len(specs):
                go.set()
                if on_start is not None:
                    on_start()
            elif kind == "done":
                done.append(payload)
        return done
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
