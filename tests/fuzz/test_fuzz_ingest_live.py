"""End to end: a live daemon takes random and mutated frames from several connections
at once and answers every frame with exactly one reply (or one fatal reply, then a
close), while a well-behaved client's events all arrive."""

from __future__ import annotations

import random
import shutil
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fuzz_settings
import msgspec
import pytest
from conftest import DaemonProcess, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from auditd.bench import mutate
from auditd.bench.fuzz import exchange, send_stream
from auditd.ingest.framing import FrameDecoder, encode_frame

MAX_FRAME = 1 << 20


class SteadyClient(threading.Thread):
    """One event a frame, each reply awaited, until stopped: the well-behaved writer."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.acknowledged = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(60)
                sock.connect(self.path)
                decoder = FrameDecoder(1 << 20)
                while not self.stop.is_set():
                    sock.sendall(encode_frame(msgspec.msgpack.encode(
                        {"type": "steady", "data": {"n": self.acknowledged}})))
                    bodies: list[bytes] = []
                    while not bodies:
                        chunk = sock.recv(1 << 16)
                        assert chunk, "the daemon closed the steady connection"
                        bodies = decoder.feed(chunk)
                    reply = msgspec.msgpack.decode(bodies[0])
                    assert reply.get("ok") == 1, reply
                    self.acknowledged += 1
        except BaseException as exc:  # reported by the test
            self.failure = exc


@pytest.fixture(scope="module")
def live() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adfi"))
    daemon = DaemonProcess(root)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


frames = st.one_of(
    st.randoms(use_true_random=False).map(lambda rng: mutate.frame(rng, MAX_FRAME)),
    st.binary(min_size=1, max_size=80).map(encode_frame),
    st.binary(max_size=9))
streams = st.lists(st.lists(frames, max_size=12).map(b"".join), min_size=2, max_size=4)


def test_every_frame_answered_while_a_steady_client_writes(live: DaemonProcess) -> None:
    steady = SteadyClient(live.ingest_socket)
    steady.start()
    seen: Counter[str] = Counter()

    @settings(max_examples=fuzz_settings.examples(60))
    @given(streams=streams, seed=st.integers(0, 2**32))
    def at_once(streams: list[bytes], seed: int) -> None:
        def one(stream: bytes) -> Counter[str]:
            rng = random.Random(seed)
            tally, rest = send_stream(live.ingest_socket, stream, rng, MAX_FRAME)
            if rest:  # an incomplete frame: only a close is owed
                tally.update(exchange(live.ingest_socket, rest, 0, False, rng))
            return tally

        with ThreadPoolExecutor(len(streams)) as pool:
            for tally in pool.map(one, streams):
                for key in ("unanswered", "replies_not_owed", "unexpected_fatal",
                            "missing_fatal", "malformed_replies", "not_closed",
                            "reply_bytes_left"):
                    assert tally[key] == 0, (key, dict(tally))
                seen.update(tally)

    try:
        at_once()
    finally:
        steady.stop.set()
        steady.join(60)
    assert steady.failure is None, steady.failure
    assert live.running, "the daemon exited"
    assert seen["frames"] > 0 and steady.acknowledged > 0
    stored = "SELECT count(*) FROM events e JOIN names n ON n.id = e.type WHERE n.value = ?"
    wait_for(lambda: live.query(stored, "steady")[0][0] == steady.acknowledged,
             what=f"{steady.acknowledged} steady events stored")
    assert "Traceback" not in live.log_text()
