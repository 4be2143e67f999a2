"""`auditd bench`: load generator, storage baseline, ring and replay micro-benchmarks.

The load comes from N client *processes* (spawned, so the daemon competes with real,
separate writers for the CPU as it would in production), each pipelining pre-encoded
frames on one raw socket. Frames are built before the start signal so that the
clients' own encoding does not eat into the daemon's share of a small machine.

Committed events/s counts rows in the database, not replies: a reply only promises
that the event is durable in the journal, and the writer may still be behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from auditd.bench import fair, query_bench, retention_soak, soak, stalls
from auditd.bench import follow as follow_bench
from auditd.bench import forward as forward_bench
from auditd.bench.clients import ClientSpec, run_clients
from auditd.bench.daemon import (
    CommitWatcher,
    ThrowawayDaemon,
    cpu_seconds,
    listener_pid,
    peak_rss_mb,
)
from auditd.bench.micro import percentile, run_baseline, run_replay, run_ring
from auditd.config import Config
from auditd.errors import ConfigError
from auditd.store.store import DB_NAME

_WINDOW_EVENTS = 8192  # events in flight per client when --window is not given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--socket", help="bench the daemon on this ingest socket (its database is found "
        "through --config's storage.path); default: a throw-away daemon in a temp dir")
    add("--clients", type=int, default=4, help="client processes (default 4)")
    add("--events", type=int, default=200_000, help="events in all (default 200000)")
    add("--batch", type=int, help="events a frame (default 100; 1000 with --soak)")
    add("--window", type=int, help="frames in flight per client (default: 8192 events)")
    add("--rate", type=float, help="total offered events/s, paced (default: flood)")
    add("--duration", type=float, metavar="SECONDS",
        help="stop sending after this many seconds (default: once --events are sent)")
    add("--durability", choices=["write", "fsync"], default="write",
        help="the throw-away daemon's ingest.durability (default write)")
    add("--capacity", type=int, metavar="EVENTS",
        help="the throw-away daemon's buffer.capacity (default: the config's)")
    add("--baseline", action="store_true",
        help="also insert the same events straight with sqlite3 and print the ratio")
    add("--ring", action="store_true",
        help="only the RingBuffer micro-benchmark: recent(100) and by_correlation()")
    add("--replay", type=int, metavar="N",
        help="only the replay benchmark: N journaled events, time to ready and committed")
    add("--fuzz", type=int, metavar="N",
        help="only the fuzz run: N random or mutated frames from --clients connections "
        "while a well-behaved client sends --rate (default 5000) events/s")
    add("--seed", type=int, help="the fuzz run's random seed (default: a random one); "
        "the soak's events' seed (default 0)")
    add("--projections", type=int, metavar="N",
        help="only the projections' figures: the writer's events/s with the projector "
        "off and on (200,000 events, 5 runs, medians), and GET /counts by type per hour "
        "over a store of N events spread over 30 days")
    add("--json", action="store_true", help="print one JSON document")
    fair.add_arguments(parser)
    soak.add_arguments(parser)
    retention_soak.add_arguments(parser)
    stalls.add_arguments(parser)
    query_bench.add_arguments(parser)
    follow_bench.add_arguments(parser)
    forward_bench.add_arguments(parser)




def _per_s(count: int | None, seconds: float) -> float | None:
    return None if count is None or seconds <= 0 else round(count / seconds, 1)


def run_load(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    for flag in ("clients", "events", "batch", "window", "rate", "duration", "capacity"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:  # a usage error
            raise ConfigError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    # Before and after the daemon's run, while nothing else runs, so neither measurement
    # disturbs the other; the mean of the two is less at the mercy of one noisy moment
    # on a shared machine (single baseline runs ranged 37k-65k rows/s in one hour).
    baselines = [run_baseline(args.events, config.writer.batch_max)] if args.baseline else []
    with contextlib.ExitStack() as stack:
        if args.socket:
            path, db_path, pid = (args.socket, Path(config.storage.path) / DB_NAME,
                                  listener_pid(args.socket))
        else:
            daemon = stack.enter_context(
                ThrowawayDaemon(config, args.durability, args.capacity))
            path, db_path = daemon.socket, daemon.db_path
            pid = daemon.proc.pid if daemon.proc else None
        doc = {"target": args.socket or "throw-away daemon",
               "durability": None if args.socket else args.durability,
               "capacity": None if args.socket else args.capacity or config.buffer.capacity,
               **measure(args, path, db_path, pid)}
    if baselines:
        baselines.append(run_baseline(args.events, config.writer.batch_max))
        rate = sum(rows_per_s for rows_per_s, _ in baselines) / len(baselines)
        doc["baseline_rows_per_s"] = round(rate, 1)
        doc["baseline_runs_rows_per_s"] = [round(rows_per_s, 1) for rows_per_s, _ in baselines]
        doc["baseline_cpu_s"] = round(sum(cpu for _, cpu in baselines) / len(baselines), 2)
        doc["baseline_batch"] = config.writer.batch_max
        # Without the database only acknowledgements are known: compare those then.
        daemon_rate = doc["events_per_s"] or doc["acknowledged_per_s"]
        doc["ratio"] = round(daemon_rate / rate, 3) if daemon_rate else None
    return doc


def measure(args: argparse.Namespace, path: str, db_path: Path,
            pid: int | None) -> dict[str, Any]:
    """Drive the daemon on `path` with the clients; the figures of the run."""
    window = args.window or max(1, _WINDOW_EVENTS // args.batch)
    shares = [args.events // args.clients + (i < args.events % args.clients)
              for i in range(args.clients)]
    interval = args.batch * args.clients / args.rate if args.rate else 0.0
    specs = [ClientSpec(path, sum(shares[:i]), n, args.batch, window, interval,
                        args.duration) for i, n in enumerate(shares) if n]
    watcher = CommitWatcher(db_path) if db_path.exists() else None
    if watcher is not None:
        watcher.start()
    cpu_before = cpu_seconds(pid)
    results = run_clients(specs)
    tally: Counter[str] = sum((Counter(r["tally"]) for r in results), Counter())
    committed, committed_at = watcher.wait_for(tally["ok"]) if watcher else (None, 0.0)
    cpu_after = cpu_seconds(pid)
    start = min(r["first_send"] for r in results)
    last_reply = max(r["last_reply"] for r in results)
    elapsed = max(committed_at, last_reply) - start
    sent = sum(r["sent"] for r in results)
    latencies = [ms for r in results for ms in r["latencies"]]
    return {
        "clients": len(specs), "batch": args.batch, "window": window, "rate": args.rate,
        "events_sent": sent, "events_acknowledged": tally["ok"],
        "events_rejected": tally["rejected"], "duplicates": tally["duplicates"],
        "frame_errors": {k[6:]: n for k, n in tally.items() if k.startswith("error:")},
        "events_committed": committed, "elapsed_s": round(elapsed, 3),
        "events_per_s": _per_s(committed, elapsed),
        "sent_per_s": _per_s(sent, max(r["last_send"] for r in results) - start),
        "acknowledged_per_s": _per_s(tally["ok"], last_reply - start),
        "latency_ms": {name: round(percentile(latencies, q), 3) if latencies else None
                       for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "peak_rss_mb": peak_rss_mb(pid),  # before the stop: shutdown is not under test
        "daemon_cpu_s": None if cpu_after is None or cpu_before is None
        else round(cpu_after - cpu_before, 2),
    }


def print_human(doc: dict[str, Any], prefix: str = "") -> None:
    """One `name  value` line per figure: readable, and still easy to grep."""
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            print_human(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            print(f"{prefix + key:<32} {value:,}")  # already rounded in the document
        else:
            print(f"{prefix + key:<32} {value}")


def main(args: argparse.Namespace, config: Config) -> int:
    # Killed by a timeout, the bench still stops its daemon and removes the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if args.batch is None and not args.retention_soak:
        args.batch = 1000 if args.soak is not None else 100
    if args.soak is not None:
        doc: dict[str, Any] = {"soak": soak.run_soak(args, config)}
        if not args.json:
            soak.print_report(doc["soak"])
            return 0
    elif args.forward:
        doc = {"forward": forward_bench.run_forward_bench(args, config)}
    elif args.retention_soak:
        doc = {"retention_soak": retention_soak.run_retention_soak(args, config)}
    elif args.query is not None:
        doc = {"query": query_bench.run_query_bench(args, config)}
    elif args.projections:
        from auditd.bench.projections import run_projections

        doc = {"projections": run_projections(args.projections, config)}
    elif args.ring:
        doc = {"ring": run_ring()}
    elif args.replay:
        doc = {"replay": run_replay(args.replay, config)}
    elif args.fair:
        doc = {"fair": fair.run_fair(args, config)}
    elif args.fuzz is not None:
        from auditd.bench.fuzz import run_fuzz

        doc = {"fuzz": run_fuzz(args, config)}
    elif args.stall:
        doc = {"stall": stalls.run_stall(args, config)}
    elif args.follow:
        doc = {"follow": follow_bench.run_follow(args, config)}
    else:
        doc = run_load(args, config)
    if args.json:
        print(json.dumps(doc))
    else:
        print_human(doc)
    if doc.get("forward", {}).get("exactly_once") is False:
        # A correctness check, not a figure: a script running the bench must see it.
        print("auditd bench: --forward-faults: the stream does not hold every seq exactly "
              "once (see `failed` and the replay's report above)", file=sys.stderr)
        return 1
    return 0
