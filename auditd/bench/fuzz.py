"""`auditd bench --fuzz N`: N random or mutated frames through a throw-away daemon from
several connections at once, while a well-behaved client sends one event a frame at a
steady rate.

Each fuzz process sends its frames in short connections: write a run of frames (split
at random points), half-close, read every reply until the daemon closes. What the
daemon owes is computed on the client's side with the daemon's own decoders over the
bytes sent (`daemon_view`): one reply per frame, in order, the last one fatal when a
frame is (a run ends there, so every frame sent is one the daemon must answer). A frame
not answered is counted, and so is a reply not owed, a fatal reply where none was due
or none where one was. The figures: frames sent, frames without a reply, the
daemon's exit (a crash), tracebacks in its log, its peak RSS growth, and the
well-behaved client's reply latency and stored events.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import random
import select
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from auditd.bench import mutate
from auditd.bench.daemon import ThrowawayDaemon, peak_rss_mb
from auditd.bench.micro import percentile
from auditd.bench.stored import count_stored
from auditd.config import Config
from auditd.errors import AuditdError, ConfigError, ProtocolError
from auditd.ingest.framing import HEADER_BYTES, FrameDecoder, encode_frame
from auditd.ingest.validation import decode_body
from auditd.schema import encoder, uuid7

STEADY_TYPE = "bench.steady"
_REPLY_TIMEOUT_S = 60.0  # a daemon silent this long on a connection owes its replies
_WARM_UP_MAX_S = 20.0  # the steady client alone first, at most this long at its rate
# Only fatal errors matter to daemon_view, and those do not depend on these limits.
_MAX_BATCH_EVENTS, _MAX_EVENT_BYTES = 10_000, 262_144


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise AuditdError(f"no VmRSS for pid {pid}")


def _recv_all(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything until the daemon closes; False if it did not close by `deadline`."""
    received = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            return bytes(received), False
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(received), True
        if not chunk:
            return bytes(received), True
        received += chunk


def daemon_view(stream: bytes, max_frame_bytes: int, most: int) -> tuple[int, int, bool]:
    """What the daemon makes of `stream`, read with its own decoders: (frames it will
    answer, the bytes that hold them, whether the last answer is fatal). Stops after a
    fatal frame (the daemon closes there) or after `most` frames."""
    decoder = FrameDecoder(max_frame_bytes)
    bodies = decoder.feed(stream)
    end = 0
    for count, body in enumerate(bodies[:most], start=1):
        end += HEADER_BYTES + len(body)
        try:
            decode_body(body, _MAX_BATCH_EVENTS, _MAX_EVENT_BYTES)
        except ProtocolError as exc:
            if exc.fatal:
                return count, end, True
    if len(bodies) < most and decoder.error is not None:
        return len(bodies) + 1, end + HEADER_BYTES, True  # the bad length's header
    return min(len(bodies), most), end, False


def decode_would_answer(stream: bytes, end: int) -> bool:
    """Whether the frame that ends at `end` in `stream` is a whole one (not a bad
    length, whose 4 header bytes are all the daemon read of it)."""
    decoder = FrameDecoder(1 << 32)
    return sum(HEADER_BYTES + len(body) for body in decoder.feed(stream[:end])) == end


def exchange(path: str, data: bytes, owed: int, fatal: bool,
             rng: random.Random) -> Counter[str]:
    """One connection: send `data` (split at random points), half-close, and check that
    exactly `owed` replies come back, the last one fatal if `fatal`, then a close."""
    tally: Counter[str] = Counter(frames=owed, connections=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            at = 0
            while at < len(data):  # as a socket may deliver it: in odd pieces
                step = rng.choice([1, 3, 7, 64, 4096, 1 << 16, len(data)])
                sock.sendall(data[at : at + step])
                at += step
            sock.shutdown(socket.SHUT_WR)
        received, closed = _recv_all(sock, time.monotonic() + _REPLY_TIMEOUT_S)
    replies = FrameDecoder(1 << 30)
    answered = 0
    for body in replies.feed(received):
        reply = msgspec.msgpack.decode(body)
        answered += 1
        if not isinstance(reply, dict) or "ok" not in reply:
            tally["malformed_replies"] += 1
            continue
        if reply.get("fatal"):
            tally[f"fatal:{reply.get('error')}"] += 1
            tally["unexpected_fatal"] += not (fatal and answered == owed)
    tally["answered"] = min(answered, owed)
    tally["unanswered"] = max(0, owed - answered)
    tally["replies_not_owed"] = max(0, answered - owed)
    tally["missing_fatal"] = fatal and not any(k.startswith("fatal:") for k in tally)
    tally["not_closed"] = not closed
    tally["reply_bytes_left"] = replies.buffered
    return tally


def send_stream(path: str, stream: bytes, rng: random.Random, max_frame_bytes: int,
                most: int = 64) -> tuple[Counter[str], bytes]:
    """Send as much of `stream` as makes whole frames, in connections of up to `most`
    frames, each checked by `exchange`; return the counts and what is left (the start
    of a frame not yet complete). A connection ends after a fatal frame; after a bad
    length the daemon read no further, so the rest of the stream is dropped rather than
    let a stray body become thousands of 4-byte "headers"."""
    total: Counter[str] = Counter()
    while True:
        owed, end, fatal = daemon_view(stream, max_frame_bytes, most)
        if not owed:
            return total, stream
        total.update(exchange(path, stream[:end], owed, fatal, rng))
        stream = b"" if fatal and not decode_would_answer(stream, end) else stream[end:]


def fuzz_process(path: str, frames: int, seed: int, max_frame_bytes: int,
                 results: Any) -> None:
    """One fuzzing client: connections of 1..64 frames until the daemon has answered
    `frames`; what follows a fatal frame in the generated stream opens the next one.

    Niced: the daemon and the well-behaved client come first for the CPU, so that the
    latter's latency says how the daemon copes, not how busy the load generator is.
    """
    try:
        os.nice(10)
        rng = random.Random(seed)
        total: Counter[str] = Counter()
        pending = b""
        while total["frames"] < frames:
            most = min(frames - total["frames"], rng.randint(1, 64))
            pending += b"".join(mutate.frame(rng, max_frame_bytes) for _ in range(most))
            sent, pending = send_stream(path, pending, rng, max_frame_bytes, most)
            total.update(sent)
        if pending:  # an incomplete frame, then the end: no reply owed, only a close
            total.update({k: v for k, v in exchange(path, pending, 0, False, rng).items()
                          if k != "connections"})
        results.put(("done", dict(total)))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"fuzz client: {exc!r}"))


def steady_process(path: str, rate: float, stop: Any, results: Any) -> None:
    """The well-behaved client: one valid event a frame at `rate`/s until `stop`,
    then every reply; each reply's latency from when its frame was due.

    Non-blocking sends and one select() for both directions, as the load clients do:
    a client blocked in send() while the daemon waits for it to read its replies would
    be a deadlock of the client's own making.
    """
    try:
        latencies: list[float] = []
        tally: Counter[str] = Counter()
        decoder = FrameDecoder(1 << 24)
        due: list[float] = []
        out = bytearray()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.setblocking(False)
            interval, sent = 1.0 / rate, 0
            start = time.monotonic()
            while not stop.is_set() or len(latencies) < sent:
                now = time.monotonic()
                while not stop.is_set() and start + sent * interval <= now:
                    event = {"type": STEADY_TYPE, "actor": "steady", "id": uuid7(),
                             "data": {"n": sent}}
                    out += encode_frame(encoder.encode(event))
                    due.append(start + sent * interval)
                    sent += 1
                if out:
                    with contextlib.suppress(BlockingIOError):
                        del out[: sock.send(out)]
                wait = max(0.0, start + sent * interval - time.monotonic())
                readable, _, _ = select.select([sock], [sock] if out else [], [],
                                               min(wait, 0.05))
                if not readable:
                    continue
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the daemon closed the steady connection")
                now = time.monotonic()
                for body in decoder.feed(data):
                    latencies.append((now - due[len(latencies)]) * 1000)
                    reply = msgspec.msgpack.decode(body)
                    tally["ok"] += reply.get("ok", 0)
                    tally["error"] += "error" in reply
        results.put(("steady", {"sent": sent, "latencies": latencies, **tally}))
    except Exception as exc:
        results.put(("failed", f"steady client: {exc!r}"))


def _stored(db_path: Path, type_: str) -> int:
    return count_stored(db_path, "type", type_)


def run_fuzz(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    if args.fuzz <= 0 or args.clients <= 0:
        raise ConfigError(f"--fuzz {args.fuzz} --clients {args.clients}: expected positive")
    rate = args.rate or 5000.0
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    max_frame = config.size("ingest", "max_frame_bytes")
    capacity = args.capacity or config.buffer.capacity
    context = mp.get_context("spawn")
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        results, stop = context.Queue(), context.Event()
        steady = context.Process(target=steady_process, args=(daemon.socket, rate, stop,
                                                              results), daemon=True)
        steady.start()
        rss_ready = _rss_mb(pid)
        # Warm-up: until the steady client's events fill the ring's window of recent
        # events (what the daemon holds at steady state), so that growth measured from
        # here is what the hostile frames cost, not the buffer filling.
        warm = min(capacity, int(rate * _WARM_UP_MAX_S))
        deadline = time.monotonic() + _WARM_UP_MAX_S * 3
        while _stored(daemon.db_path, STEADY_TYPE) < warm and time.monotonic() < deadline:
            time.sleep(0.2)
        rss_before = _rss_mb(pid)
        started = time.monotonic()
        shares = [args.fuzz // args.clients + (i < args.fuzz % args.clients)
                  for i in range(args.clients)]
        fuzzers = [context.Process(target=fuzz_process, daemon=True, args=(
            daemon.socket, n, seed + i, max_frame, results)) for i, n in enumerate(shares)]
        for proc in fuzzers:
            proc.start()
        total: Counter[str] = Counter()
        steady_doc: dict[str, Any] | None = None
        done = 0
        while steady_doc is None:
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:
                if daemon.proc.poll() is not None:
                    break
                if any(p.exitcode not in (None, 0) for p in [*fuzzers, steady]):
                    raise AuditdError("a fuzz client process died") from None
                continue
            if kind == "failed":
                raise AuditdError(payload)
            if kind == "done":
                total.update(payload)
                done += 1
                if done == len(fuzzers):
                    stop.set()
            elif kind == "steady":
                steady_doc = payload
        elapsed = time.monotonic() - started
        crashed = daemon.proc.poll() is not None
        peak = peak_rss_mb(pid)
        log = daemon.log_path.read_text(errors="replace")
        stored = None if crashed else _wait_stored(daemon.db_path, steady_doc)
    latencies = steady_doc["latencies"] if steady_doc else []
    return {
        "seed": seed, "clients": len(fuzzers), "elapsed_s": round(elapsed, 1),
        "frames_sent": total["frames"], "frames_answered": total["answered"],
        "frames_without_reply": total["unanswered"],
        "replies_not_owed": total["replies_not_owed"],
        "unexpected_fatal": total["unexpected_fatal"], "missing_fatal": total["missing_fatal"],
        "malformed_replies": total["malformed_replies"],
        "connections": total["connections"], "connections_not_closed": total["not_closed"],
        "fatal_replies": {k[6:]: n for k, n in sorted(total.items()) if k.startswith("fatal:")},
        "crashes": int(crashed), "tracebacks": log.count("Traceback"),
        "rss_ready_mb": rss_ready, "rss_before_mb": rss_before, "peak_rss_mb": peak,
        "peak_rss_growth_mb": None if peak is None else round(peak - rss_before, 1),
        "steady": {
            "rate": rate, "sent": steady_doc["sent"] if steady_doc else 0,
            "acknowledged": steady_doc.get("ok", 0) if steady_doc else 0,
            "stored": stored,
            "latency_ms": {name: round(percentile(latencies, q), 3) if latencies else None
                           for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        },
    }


def _wait_stored(db_path: Path, steady: dict[str, Any] | None, timeout: float = 60.0) -> int:
    """The steady client's events in the store, once the writer has caught up."""
    want = steady.get("ok", 0) if steady else 0
    deadline = time.monotonic() + timeout
    while True:
        count = _stored(db_path, STEADY_TYPE)
        if count >= want or time.monotonic() > deadline:
            return count
        time.sleep(0.05)

