"""`auditd bench --forward --forward-faults`: exactly once under faults (step 8's bar).

`--events` (the bar's run: 1,000,000) go through a throw-away daemon forwarding to a 3-node
nats-server cluster with an R3 stream while, one after another: the stream's leader is
SIGKILLed, then the node the forwarder is connected to, then the daemon itself, twice.
A killed node is restarted once forwarding has gone on without it (so the cluster keeps
its quorum for the next fault); the daemon is restarted at once, and the writer, the
project's blocking client, reconnects and resends its unacknowledged frames with the
same ids (ingest's dedupe keeps each event once). Then the stream is read back with
`auditd forward replay`: every seq exactly once, gap-free, in order. `--rate` paces
the writer (a small run's faults then land while it writes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from auditd.bench.daemon import ThrowawayDaemon, wait_until
from auditd.bench.forward import forward_figures
from auditd.bench.nats_servers import NatsCluster, NatsNode
from auditd.bench.paced_writer import PacedWriter
from auditd.config import Config
from auditd.errors import AuditdError
from auditd.forward.replay import asked

_FAULTS = ("stream_leader", "connected_node", "daemon", "daemon")
_DEADLINE_S = 900.0


def _wait(what: str, check: Callable[[], Any]) -> Any:
    return wait_until(check, what, _DEADLINE_S, "--forward-faults")


def stream_leader(cluster: NatsCluster, stream: str) -> NatsNode:
    def leader() -> str | None:
        for node in cluster.nodes:
            if node.process is None:
                continue
            try:
                info = node.monitor("/jsz?accounts=true&streams=true")
            except OSError:
                continue
            for account in info.get("account_details") or []:
                for found in account.get("stream_detail") or []:
                    if found.get("name") == stream and found.get("cluster", {}).get("leader"):
                        return str(found["cluster"]["leader"])
        return None

    name = _wait("stream leader", leader)
    return next(node for node in cluster.nodes if node.name == name)


def connected_node(cluster: NatsCluster) -> NatsNode:
    def holder() -> NatsNode | None:
        for node in cluster.nodes:
            if node.process is None:
                continue
            try:
                connections = node.monitor("/connz").get("connections") or []
            except OSError:
                continue
            if any(c.get("name") == "auditd" for c in connections):
                return node
        return None

    found: NatsNode = _wait("node the forwarder is connected to", holder)
    return found


def _moved_past(daemon: ThrowawayDaemon, cursor: int) -> Callable[[], int | None]:
    """The cursor once past `cursor` (forwarding goes on)."""
    def check() -> int | None:
        figures = forward_figures(daemon.status_socket)
        return figures["cursor"] if figures and figures["cursor"] > cursor else None
    return check


def run_forward_faults(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    events = args.events
    started = time.monotonic()
    faults: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="adff", dir="/tmp") as root:
        cluster = NatsCluster(Path(root), 3).start()
        extra = {"forward": {"servers": cluster.urls, "create_stream": True, "replicas": 3,
                             "backoff_min": "50ms", "backoff_max": "1s",
                             "ack_timeout": "2s"}}
        try:
            with ThrowawayDaemon(config, args.durability, args.capacity,
                                 extra=extra) as daemon:
                writer = PacedWriter(daemon.socket, events, args.rate,
                                     event_type="bench.forward", prefix="ff")
                writer.start()
                for number, fault in enumerate(_FAULTS, 1):
                    at = events * number // (len(_FAULTS) + 1)
                    cursor = _wait(f"forward cursor at {at}", _moved_past(daemon, at - 1))
                    faults.append(_inject(fault, cluster, daemon, cursor,
                                          min(events, cursor + max(1, events // 50))))
                writer.join(_DEADLINE_S)
                if writer.error is not None or writer.sent != events:
                    raise AuditdError(f"--forward-faults: the writer stopped after "
                                      f"{writer.sent} events: {writer.error!r}")
                figures = _wait("forward cursor at the last committed seq", lambda: (
                    (f := forward_figures(daemon.status_socket)) and f["lag_events"] == 0
                    and f["cursor"] >= events and f))
                replay = subprocess.run(
                    [sys.executable, "-m", "auditd.cli", "forward", "replay", "--json",
                     "--config", str(daemon.root / "auditd.toml")],
                    capture_output=True, text=True, timeout=_DEADLINE_S, check=False)
                held = asyncio.run(stream_messages(cluster.urls))
        finally:
            cluster.stop()
    report: dict[str, Any] = json.loads(replay.stdout) if replay.stdout else {
        "failed": replay.stderr.strip()}
    return {"events": events, "faults": faults, "seconds": round(time.monotonic() - started, 1),
            "cursor": figures["cursor"], "duplicates_acked": figures["duplicates"],
            "errors": figures["errors"], "replay": report, "stream_messages": held,
            # The stream's own count too: the read-back's events and checkpoints, no more.
            "exactly_once": replay.returncode == 0 and report.get("events") == events
            and not report.get("gaps") and not report.get("repeats")
            and held == events + report.get("checkpoints", 0)}


async def stream_messages(urls: list[str], stream: str = "AUDIT") -> int:
    nc = await nats.connect(servers=urls, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=3)
        info = await asked(lambda: js.stream_info(stream))
        return int(info.state.messages)
    finally:
        await nc.close()


def _inject(fault: str, cluster: NatsCluster, daemon: ThrowawayDaemon, cursor: int,
            beyond: int) -> dict[str, Any]:
    """One fault at `cursor`; over once forwarding has reached `beyond` (a killed node is
    restarted only then: what was in flight when it died proves nothing)."""
    began = time.monotonic()
    done: dict[str, Any] = {"fault": fault, "at_cursor": cursor}
    if fault == "daemon":
        daemon.sigkill_and_restart()
    else:
        node = stream_leader(cluster, "AUDIT") if fault == "stream_leader" \
            else connected_node(cluster)
        done["node"] = node.name
        node.kill(signal.SIGKILL)
        _wait(f"forwarding to {beyond} without {node.name}", _moved_past(daemon, beyond - 1))
        node.start()
        cluster.wait_healthy()
    moved = _wait(f"forwarding to {beyond}", _moved_past(daemon, beyond - 1))
    done["seconds_until_forwarding_moved"] = round(time.monotonic() - began, 2)
    done["cursor_after"] = moved
    # What the forwarder saw, since the daemon's start (a restart zeroes its figures).
    figures = forward_figures(daemon.status_socket) or {}
    done["errors"], done["reconnects"] = figures.get("errors"), figures.get("reconnects")
    return done
