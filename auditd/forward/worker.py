"""The forwarder's process: `python -m auditd.forward.worker`, started by the daemon
(forward/process.py) with pipes for stdin and stdout, one JSON document a line.

In: the first line {"config", "db", "partitions", "host", "cursor": [seq, size],
"committed"}, then {"committed": seq} as the daemon commits. Out: {"acked": [seq,
size]} as steps are acknowledged (at most every 20 ms, and the newest always), and
{"figures": {...}} every 200 ms. End of input (the daemon gone, even SIGKILLed) ends
the process; its log lines go to the daemon's stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from auditd.config import Config
from auditd.forward.cursor import Cursor
from auditd.forward.forwarder import Forwarder
from auditd.logs import configure_logging
from auditd.store.child_process import die_with_parent

_ACK_EVERY_S = 0.02
_FIGURES_EVERY_S = 0.2
_STOP_S = 10.0  # for the forwarder to close its connection once the daemon is gone
log = structlog.get_logger("auditd.forward")


class Outbox:
    """Lines to the daemon; the acked cursor coalesced (only the newest matters)."""

    def __init__(self) -> None:
        self.acked: Cursor | None = None
        self.wake = asyncio.Event()

    def ack(self, cursor: Cursor) -> None:
        self.acked = cursor
        self.wake.set()


def _write(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _send(forwarder: Forwarder, outbox: Outbox) -> None:
    loop = asyncio.get_running_loop()
    last_figures = 0.0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(outbox.wake.wait(), _FIGURES_EVERY_S)
        outbox.wake.clear()
        if outbox.acked is not None:
            cursor, outbox.acked = outbox.acked, None
            _write({"acked": [cursor.seq, cursor.checkpoint_size]})
        if loop.time() - last_figures >= _FIGURES_EVERY_S:
            _write({"figures": forwarder.figures.document()})
            last_figures = loop.time()
        await asyncio.sleep(_ACK_EVERY_S)


async def _read(reader: asyncio.StreamReader, forwarder: Forwarder) -> None:
    """Commits from the daemon until its end of the pipe closes."""
    while line := await reader.readline():
        forwarder.committed(int(json.loads(line)["committed"]))


async def main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return 0
    start = json.loads(first)
    config = msgspec.convert(start["config"], Config)
    configure_logging(config.log.level, config.log.format)
    outbox = Outbox()
    forwarder = Forwarder(config, Path(start["db"]), Path(start["partitions"]), start["host"],
                          Cursor(*start["cursor"]), outbox.ack)
    forwarder.committed(int(start["committed"]))
    tasks = [loop.create_task(forwarder.run(), name="forwarder"),
             loop.create_task(_send(forwarder, outbox), name="forward_send")]
    try:
        await _read(reader, forwarder)  # returns when the daemon is gone
    finally:
        for task in tasks:
            task.cancel()
        # Bounded: nats-py's reconnect loop, mid-connect, can outlive a cancel (workers
        # of SIGKILLed daemons were found still dialling a dead server an hour later).
        _, stuck = await asyncio.wait(tasks, timeout=_STOP_S)
        if outbox.acked is not None:  # the last cursor, if the daemon still reads
            with contextlib.suppress(OSError):
                _write({"acked": [outbox.acked.seq, outbox.acked.checkpoint_size]})
        if stuck:
            log.warning("forward_worker_stop_forced", tasks=[t.get_name() for t in stuck])
            sys.stderr.flush()
            os._exit(0)  # asyncio.run would wait on the stuck tasks again
    return 0


if __name__ == "__main__":
    # End of input alone left this process running where its shutdown hung.
    die_with_parent(os.getppid(), 0)
    # The daemon ends this process by closing its stdin (after the last acked cursor is
    # read); a SIGTERM or ^C meant for the whole group must not cut that short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
