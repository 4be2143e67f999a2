"""A writer thread for benches that kill the daemon under load: events `{prefix}-0`,
`{prefix}-1`, ... through the project's blocking client, which rides out the daemon's
restarts (it reconnects and resends its unacknowledged frames with the same ids, and
ingest's dedupe keeps each event once)."""

from __future__ import annotations

import threading
import time

from auditd.client.blocking import Client

FRAME = 500  # events a frame
_CHUNK = 20_000  # events generated at a time when not paced


class PacedWriter(threading.Thread):
    """Sends `events` events (until `stop()` when None), paced at `rate` events/s if set;
    `sent` counts those acknowledged, `error` holds what ended it early."""

    def __init__(self, socket_path: str, events: int | None, rate: float | None, *,
                 event_type: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.socket_path, self.events, self.rate = socket_path, events, rate
        self.event_type, self.prefix = event_type, prefix
        self.sent = 0
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        step = FRAME if self.rate else _CHUNK
        began = time.monotonic()
        try:
            with Client(self.socket_path, reconnect_deadline=120.0) as client:
                first = 0
                while not self._stopping.is_set() and (
                        self.events is None or first < self.events):
                    last = first + step
                    if self.events is not None:
                        last = min(last, self.events)
                    chunk = [{"type": self.event_type, "id": f"{self.prefix}-{i}",
                              "actor": f"user{i % 7}", "data": {"n": i}}
                             for i in range(first, last)]
                    client.send_many(chunk, FRAME)
                    self.sent += len(chunk)
                    first = last
                    if self.rate:  # the pace of a paced load, not a wait for a condition
                        self._stopping.wait(
                            max(0.0, began + self.sent / self.rate - time.monotonic()))
        except BaseException as exc:  # reported by the bench, not lost in a thread
            self.error = exc
