"""`auditd bench --forward`: how fast committed events reach NATS JetStream, and what
forwarding costs ingest, against real nats-server processes started here (one node, or
`--forward-nodes 3`: a cluster with an R3 stream).

Each run floods `--events` through a throw-away daemon, with forwarding off and then on
(`--runs` pairs, interleaved, so the machine's noise falls on both alike). Reported per
run: committed events/s (the ingest figure), and with forwarding on the forwarded
events/s (the events over the time from the first send until the stream acknowledged
the last seq) and the largest lag seen. Forwarding alongside a flood cannot outrun the
flood, so a third daemon of each run measures the forwarder alone: it takes the flood
with its nats-server down, then the server starts and the drain is timed from the
cursor's first move to the last seq (the drain rate, the forwarder's capacity). Medians
over the runs, and the ingest ratio on to off measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from auditd.bench.daemon import ThrowawayDaemon, cpu_seconds
from auditd.bench.nats_servers import NatsCluster
from auditd.cli.operator import UnixHTTPConnection
from auditd.config import Config
from auditd.errors import AuditdError, ConfigError

_RUNS = 3
_DRAIN_TIMEOUT_S = 600.0
_POLL_S = 0.05
_OUTAGE_RATE = 5000.0
_OUTAGE_START_S = 5.0
_OUTAGE_AFTER_S = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forward", action="store_true",
                        help="only the forwarding bench: --events through a throw-away "
                             "daemon with forwarding off and on, against nats-server "
                             "started here; forwarded events/s, the drain rate of a "
                             "backlog and the ingest ratio")
    parser.add_argument("--forward-nodes", type=int, choices=(1, 3), default=1,
                        help="with --forward: one nats-server, or a 3-node cluster with "
                             "an R3 stream")
    parser.add_argument("--forward-outage", type=float, metavar="SECONDS",
                        help="with --forward: one run under a paced load (--rate, default "
                             "5000/s) during which nats-server is SIGKILLed for SECONDS: "
                             "reply latency over the run and how long the lag takes to "
                             "drain once it is back")
    parser.add_argument("--forward-faults", action="store_true",
                        help="with --forward: exactly once under faults: --events (the "
                             "bar: 1000000) forwarded to a 3-node cluster (R3) while the "
                             "stream leader, the connected node and the daemon (twice) are "
                             "SIGKILLed; the stream read back: each seq once, in order")
    parser.add_argument("--runs", type=int, default=_RUNS,
                        help="with --forward: off/on pairs, interleaved (default 3)")


class ForwardWatcher(threading.Thread):
    """Polls /stats until the forward cursor reaches `target`: when, and the peak lag."""

    def __init__(self, status_socket: str, target: int) -> None:
        super().__init__(daemon=True)
        self.status_socket, self.target = status_socket, target
        self.done_at: float | None = None
        self.moved: tuple[float, int] | None = None  # when the cursor first moved, to what
        self.peak_lag = 0
        self.figures: dict[str, Any] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while not self.stopped.wait(_POLL_S) and time.monotonic() < deadline:
            figures = forward_figures(self.status_socket)
            if figures is None:
                continue
            self.figures = figures
            self.peak_lag = max(self.peak_lag, figures["lag_events"])
            if self.moved is None and figures["cursor"] > 0:
                self.moved = time.monotonic(), figures["cursor"]
            if figures["cursor"] >= self.target:
                self.done_at = time.monotonic()
                return


def forward_figures(status_socket: str) -> dict[str, Any] | None:
    """The daemon's /stats forward block; None while it is down or restarting."""
    conn = UnixHTTPConnection(status_socket, timeout=10)
    try:
        conn.request("GET", "/stats")
        figures: dict[str, Any] = json.loads(conn.getresponse().read())["forward"]
        return figures
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None
    finally:
        conn.close()


def _one_run(args: argparse.Namespace, config: Config, root: Path | None) -> dict[str, Any]:
    """One daemon's run; with `root`, forwarding to nats-server started there (a fresh
    one each run: every run's stream starts empty)."""
    if root is None:
        return _measured(args, config, None)
    cluster = NatsCluster(root, args.forward_nodes).start()
    try:
        return _measured(args, config, cluster)
    finally:
        cluster.stop()


def _measured(args: argparse.Namespace, config: Config,
              cluster: NatsCluster | None) -> dict[str, Any]:
    from auditd.bench import measure

    extra: dict[str, dict[str, Any]] = {}
    if cluster is not None:
        extra["forward"] = {"servers": cluster.urls, "create_stream": True,
                            "replicas": args.forward_nodes}
    with ThrowawayDaemon(config, args.durability, args.capacity, extra=extra) as daemon:
        pid = daemon.proc.pid if daemon.proc else None
        watcher = None
        if cluster is not None:
            watcher = ForwardWatcher(daemon.status_socket, args.events)
            watcher.start()
        started = time.monotonic()
        figures = measure(args, daemon.socket, daemon.db_path, pid)
        doc: dict[str, Any] = {"ingest_events_per_s": figures["events_per_s"],
                               "reply_p99_ms": figures["latency_ms"]["p99"],
                               "peak_rss_mb": figures["peak_rss_mb"]}
        if cluster is not None and watcher is not None:
            watcher.join()
            if watcher.done_at is None:
                raise AuditdError(f"forwarding did not reach seq {args.events} within "
                                  f"{_DRAIN_TIMEOUT_S:.0f}s: {watcher.figures}")
            seconds = watcher.done_at - started
            # On one machine the servers share its cores with ingest (in a fleet they are
            # elsewhere): the cores they took, over the run.
            nats_cpu = sum(cpu_seconds(node.process.pid) or 0.0 for node in cluster.nodes
                           if node.process is not None)
            doc["nats_server_cores"] = round(nats_cpu / seconds, 2)
            doc.update({"forwarded_per_s": round(args.events / seconds, 1),
                        "forward_seconds": round(seconds, 3), "peak_lag_events":
                        watcher.peak_lag, "duplicates": watcher.figures.get("duplicates"),
                        "errors": watcher.figures.get("errors")})
    return doc


def _drain_run(args: argparse.Namespace, config: Config, root: Path) -> dict[str, Any]:
    """The flood with the servers down, then the servers up: the drain's events/s, timed
    from the cursor's first move (connecting and creating the stream left out)."""
    from auditd.bench import measure

    cluster = NatsCluster(root, args.forward_nodes)
    extra = {"forward": {"servers": cluster.urls, "create_stream": True,
                         "replicas": args.forward_nodes, "backoff_min": "20ms",
                         "backoff_max": "100ms"}}
    try:
        with ThrowawayDaemon(config, args.durability, args.capacity, extra=extra) as daemon:
            measure(args, daemon.socket, daemon.db_path, daemon.proc.pid if daemon.proc
                    else None)
            watcher = ForwardWatcher(daemon.status_socket, args.events)
            watcher.start()
            cluster.start()
            watcher.join()
    finally:
        cluster.stop()
    if watcher.done_at is None or watcher.moved is None:
        raise AuditdError(f"the drain did not reach seq {args.events} within "
                          f"{_DRAIN_TIMEOUT_S:.0f}s: {watcher.figures}")
    moved_at, moved_to = watcher.moved
    seconds = watcher.done_at - moved_at
    return {"drained_per_s": round((args.events - moved_to) / seconds, 1) if seconds > 0
            else None, "drain_seconds": round(seconds, 3), "errors":
            watcher.figures.get("errors")}


def run_outage(args: argparse.Namespace, config: Config, outage_s: float) -> dict[str, Any]:
    """A paced load through a daemon forwarding to one nats-server, which is down for
    `outage_s` from 5 s in (a quarter in, for a short --duration; and not before the
    forwarder has forwarded); by default the run lasts the outage plus 25 s. The same
    load through a daemon without forwarding first is the baseline."""
    from auditd.bench import measure

    args.rate = args.rate or _OUTAGE_RATE
    args.duration = args.duration or outage_s + _OUTAGE_AFTER_S + _OUTAGE_START_S
    args.events = int(args.rate * args.duration)
    # The same paced load with forwarding off, first: the same run's baseline.
    with ThrowawayDaemon(config, args.durability, args.capacity) as plain:
        baseline = measure(args, plain.socket, plain.db_path,
                           plain.proc.pid if plain.proc else None)
    with tempfile.TemporaryDirectory(prefix="adnats", dir="/tmp") as root:
        cluster = NatsCluster(Path(root), 1).start()
        node = cluster.nodes[0]
        back_at: list[float] = []

        def down_and_up(status_socket: str) -> None:
            # Not before the forwarder has forwarded: a slow start (a loaded machine)
            # would otherwise have the outage over before it ever connected.
            deadline = time.monotonic() + _DRAIN_TIMEOUT_S
            while time.monotonic() < deadline and not (
                    (figures := forward_figures(status_socket)) and figures["cursor"] > 0):
                time.sleep(_POLL_S)
            node.kill()
            time.sleep(outage_s)  # the outage itself: a timer thread, not a test's wait
            node.start()
            back_at.append(time.monotonic())

        try:
            extra = {"forward": {"servers": cluster.urls, "create_stream": True}}
            with ThrowawayDaemon(config, args.durability, args.capacity,
                                 extra=extra) as daemon:
                pid = daemon.proc.pid if daemon.proc else None
                # 5 s in, or a quarter in for a short run (--duration).
                outage = threading.Timer(min(_OUTAGE_START_S, args.duration / 4), down_and_up,
                                         (daemon.status_socket,))
                outage.start()
                figures = measure(args, daemon.socket, daemon.db_path, pid)
                outage.join()
                watcher = ForwardWatcher(daemon.status_socket,
                                         figures["events_committed"] or args.events)
                watcher.start()
                watcher.join()
        finally:
            cluster.stop()
    drained = None if watcher.done_at is None or not back_at else watcher.done_at - back_at[0]
    return {"outage_s": outage_s, "rate": args.rate, "duration_s": args.duration,
            "events_committed": figures["events_committed"],
            "reply_latency_ms": figures["latency_ms"],
            "reply_latency_ms_forwarding_off": baseline["latency_ms"],
            "p99_ratio_outage_to_off": round(figures["latency_ms"]["p99"]
                                             / baseline["latency_ms"]["p99"], 3)
            if baseline["latency_ms"]["p99"] else None,
            "peak_lag_events_after": watcher.peak_lag,
            "drained_s_after_server_back": None if drained is None else round(drained, 2),
            "forward": watcher.figures}


def run_forward_bench(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    if args.socket:
        raise ConfigError("--forward starts the daemons it measures: drop --socket")
    if args.forward_faults:
        from auditd.bench.forward_faults import run_forward_faults

        return run_forward_faults(args, config)
    if args.forward_outage is not None:
        if args.forward_outage <= 0:
            raise ConfigError(f"--forward-outage {args.forward_outage}: expected seconds > 0")
        return run_outage(args, config, args.forward_outage)
    if args.runs < 1:
        raise ConfigError(f"--runs {args.runs}: expected a positive number")
    off, on, drain = [], [], []
    for run in range(args.runs):
        off.append(_one_run(args, config, None))
        with tempfile.TemporaryDirectory(prefix="adnats", dir="/tmp") as root:
            on.append(_one_run(args, config, Path(root) / str(run)))
            drain.append(_drain_run(args, config, Path(root) / f"drain{run}"))

    def median(runs: list[dict[str, Any]], key: str) -> float | None:
        # None where a run was too short to time (a drain within one poll).
        values = [r[key] for r in runs if r[key] is not None]
        return float(round(statistics.median(values), 1)) if values else None

    ingest_off = median(off, "ingest_events_per_s") or 0.0
    ingest_on = median(on, "ingest_events_per_s") or 0.0
    return {"nodes": args.forward_nodes, "replicas": args.forward_nodes,
            "events": args.events, "runs": args.runs,
            "forwarded_per_s_median": median(on, "forwarded_per_s"),
            "drained_per_s_median": median(drain, "drained_per_s"),
            "ingest_off_per_s_median": ingest_off, "ingest_on_per_s_median": ingest_on,
            "ingest_ratio_on_off": round(ingest_on / ingest_off, 3) if ingest_off else None,
            "reply_p99_ms_off_median": median(off, "reply_p99_ms"),
            "reply_p99_ms_on_median": median(on, "reply_p99_ms"),
            "nats_server_cores_median": median(on, "nats_server_cores"),
            "off": off, "on": on, "drain": drain}
