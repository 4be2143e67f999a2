"""Forwarding to a 3-node JetStream cluster with an R3 stream: the stream leader is
SIGKILLed mid-forwarding, then the daemon, and the stream still holds every seq exactly
once, gap-free, in order (the consumer side's read-back says so)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import DaemonProcess, wait_committed, wait_for
from forward_helpers import forward_config, forward_figures, stream_count, wait_forwarded
from proofs_store import cli, send

from auditd.bench.nats_servers import NatsCluster

MakeDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def nats_three(short_tmp: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(short_tmp / "nats", size=3).start()
    yield cluster
    cluster.stop()


def stream_leader(cluster: NatsCluster, stream: str = "AUDIT") -> str:
    async def ask() -> str:
        for url in cluster.urls:
            try:
                nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
            except Exception:
                continue
            try:
                info = await nc.jetstream().stream_info(stream)
                assert info.cluster is not None and info.cluster.leader
                return str(info.cluster.leader)
            finally:
                await nc.close()
        raise AssertionError("no server answered")
    return asyncio.run(ask())


def test_leader_and_daemon_killed_mid_forwarding_every_seq_once(
        make_daemon: MakeDaemon, nats_three: NatsCluster) -> None:
    daemon = make_daemon(forward_config(nats_three.urls, replicas=3, max_in_flight=256,
                                        batch=128, ack_timeout="1s"))
    send(daemon, 0, 10_000, batch=500)
    wait_for(lambda: forward_figures(daemon)["cursor"] > 0, 60, "forwarding under way")
    leader = stream_leader(nats_three)
    node = next(n for n in nats_three.nodes if n.name == leader)
    node.kill(signal.SIGKILL)
    send(daemon, 10_000, 10_000, batch=500)
    daemon.kill()
    daemon.start()
    node.start()
    send(daemon, 20_000, 10_000, batch=500)
    wait_committed(daemon, 30_000)
    figures = wait_forwarded(daemon, 30_000, timeout=120)
    assert figures["errors"], "the leader's death went unnoticed: the test proved nothing"
    replay = cli(daemon.config_path, "forward", "replay", "--json")
    assert replay.stdout, replay.stderr
    report: dict[str, Any] = json.loads(replay.stdout)
    assert replay.returncode == 0, replay
    assert (report["events"], report["gaps"], report["repeats"]) == (30_000, [], []), report
    assert stream_count(nats_three.urls[0]) == 30_000 + report["checkpoints"]
