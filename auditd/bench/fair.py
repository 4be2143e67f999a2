"""`auditd bench --fair`: one uid floods, another writes politely; how fast is it served?

The flood is `--clients` processes of the bench's own uid pipelining `--batch`-event
frames as fast as the daemon reads them, for `--duration` seconds. The polite writer
is one process that drops to another uid (`--fair-uid`, default 65534) before it
connects, since the daemon tells writers apart by SO_PEERCRED, and sends `--rate`
events a second (default 1,000), one a frame, paced. Reported: the polite writer's
reply latency (p50/p99/max: the issue's bar is p99 <= 25 ms with rate_limit off),
both uids' acknowledged and committed events, and the daemon's per-uid fairness
counters. Needs root, to run a writer as another uid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
from collections import Counter
from pathlib import Path
from typing import Any

from auditd.bench.clients import ClientSpec, client_process, drive, make_event
from auditd.bench.daemon import CommitWatcher, ThrowawayDaemon, peak_rss_mb
from auditd.bench.micro import percentile
from auditd.bench.stored import count_stored
from auditd.config import Config
from auditd.errors import AuditdError, ConfigError
from auditd.ingest.framing import encode_frame
from auditd.schema import encoder

_FLOOD_PER_S = 60_000  # frames built for the flood: more than the daemon commits a second
_POLITE_FIRST = 10**9  # the polite writer's event numbers, apart from the flood's
_POLITE_WINDOW = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--fair", action="store_true",
        help="only the fair-share benchmark: --clients flooding connections of this uid "
        "(--batch events a frame, --duration s, default 10) against one writer of "
        "--fair-uid at --rate events/s (default 1000), one a frame; needs root")
    add("--fair-uid", type=int, default=65534,
        help="the polite writer's uid in --fair (default 65534, nobody)")


def run_fair(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    if args.socket:
        raise ConfigError("--fair starts a throw-away daemon of its own: drop --socket")
    if os.geteuid() != 0:
        raise AuditdError("bench --fair runs its polite writer as another uid: run it as root")
    duration = args.duration or 10.0
    rate = args.rate or 1000.0
    for flag, value in (("clients", args.clients), ("batch", args.batch),
                        ("duration", duration), ("rate", rate)):
        if value <= 0:
            raise ConfigError(f"--{flag} {value}: expected a positive number")
    flood_events = max(args.events, int(_FLOOD_PER_S * duration))
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon:
        os.chmod(daemon.root, 0o755)  # let the other uid reach the socket
        os.chmod(daemon.socket, 0o666)
        pid = daemon.proc.pid if daemon.proc else None
        shares = [flood_events // args.clients] * args.clients
        flood = [ClientSpec(daemon.socket, i * shares[0], n, args.batch,
                            args.window or max(1, 8192 // args.batch), 0.0, duration)
                 for i, n in enumerate(shares)]
        polite = ClientSpec(daemon.socket, _POLITE_FIRST, int(rate * duration), 1,
                            _POLITE_WINDOW, 1 / rate, duration)
        watcher = CommitWatcher(daemon.db_path)
        watcher.start()
        flood_results, polite_result = _run(flood, polite, args.fair_uid)
        acknowledged = sum(r["tally"]["ok"] for r in flood_results)
        acknowledged += polite_result["tally"]["ok"]
        watcher.wait_for(acknowledged)
        by_uid = {uid: count_stored(daemon.db_path, "uid", str(uid))
                  for uid in (os.geteuid(), args.fair_uid)}
        fairness = _fairness(Path(daemon.status_socket))
        rss = peak_rss_mb(pid)
    latencies = polite_result["latencies"]
    flood_tally: Counter[str] = sum((Counter(r["tally"]) for r in flood_results), Counter())
    own_uid = os.geteuid()
    return {
        "duration_s": duration, "capacity": args.capacity or config.buffer.capacity,
        "rate_limit": getattr(config.ingest, "rate_limit", "") or None,  # absent before 2026-12
        "polite": {
            "uid": args.fair_uid, "rate": rate, "events_sent": polite_result["sent"],
            "events_acknowledged": polite_result["tally"]["ok"],
            "events_committed": by_uid.get(args.fair_uid, 0),
            "frame_errors": _errors(polite_result["tally"]),
            "latency_ms": {name: round(percentile(latencies, q), 3) if latencies else None
                           for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        },
        "flood": {
            "uid": own_uid, "clients": len(flood), "batch": args.batch,
            "events_sent": sum(r["sent"] for r in flood_results),
            "events_acknowledged": flood_tally["ok"],
            "events_committed": by_uid.get(own_uid, 0),
            "frame_errors": _errors(flood_tally),
            "acknowledged_per_s": round(flood_tally["ok"] / duration, 1),
        },
        "fairness": fairness, "peak_rss_mb": rss,
    }


def _errors(tally: Counter[str]) -> dict[str, int]:
    return {key[6:]: count for key, count in tally.items() if key.startswith("error:")}


def polite_process(spec: ClientSpec, uid: int, go: Any, results: Any) -> None:
    """The polite writer: build its frames, drop to `uid`, connect, drive."""
    try:
        frames = [encode_frame(encoder.encode(make_event(i)))
                  for i in range(spec.first, spec.first + spec.events)]
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(spec.socket)
            results.put(("ready", None))
            go.wait()
            sock.setblocking(False)
            results.put(("polite", drive(sock, frames, spec)))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"bench polite writer: {exc!r}"))


def _run(flood: list[ClientSpec], polite: ClientSpec,
         uid: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every client ready, then all released together; their results."""
    context = mp.get_context("spawn")  # not fork: the parent holds a sqlite thread
    go, results = context.Event(), context.Queue()
    procs = [context.Process(target=client_process, args=(spec, go, results), daemon=True)
             for spec in flood]
    procs.append(context.Process(target=polite_process, args=(polite, uid, go, results),
                                 daemon=True))
    for proc in procs:
        proc.start()
    try:
        ready, done, polite_result = 0, list[dict[str, Any]](), None
        while len(done) < len(flood) or polite_result is None:
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:  # see that no client died without a word
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise AuditdError("a bench client process died") from None
                continue
            if kind == "failed":
                raise AuditdError(payload)
            if kind == "ready":
                ready += 1
                if ready == len(procs):
                    go.set()
            elif kind == "polite":
                polite_result = payload
            else:
                done.append(payload)
        return done, polite_result
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def _fairness(status_socket: Path) -> dict[str, Any] | None:
    """The daemon's per-uid fairness counters from /stats (None from a daemon without)."""
    stats = status_json(status_socket, "/stats")
    found: dict[str, Any] | None = stats.get("fairness") if stats else None
    return found


def status_json(status_socket: Path, path: str) -> dict[str, Any] | None:
    """GET `path` from the daemon's status API: its JSON object, None if unanswered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(str(status_socket))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: auditd\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            return None
    _head, _, body = data.partition(b"\r\n\r\n")
    try:
        found = json.loads(body)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None
