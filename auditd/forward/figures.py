"""What the forwarding process reports to the daemon every 200 ms (forward/worker.py):
the /stats `forward` object, which the daemon's view (forward/process.py) completes."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

_SAMPLES = 4096  # commit times kept for the lag in seconds (one per 100 ms at most)
_SAMPLE_EVERY_S = 0.1


@dataclass(slots=True)
class ForwardFigures:
    stream: str
    servers: list[str]
    cursor: int = 0
    checkpoint_cursor: int = 0
    committed: int = 0
    published: int = 0  # messages acknowledged as new by the stream
    duplicates: int = 0  # acknowledged as already held (a resend JetStream deduped)
    checkpoints: int = 0  # checkpoint messages acknowledged
    errors: Counter[str] = field(default_factory=Counter)  # by kind
    in_flight: int = 0
    connected: bool = False
    reconnects: int = 0
    last_success: float | None = None  # time.time() of the last acknowledged step
    state: str = "starting"  # starting, connecting, forwarding, backing_off, refused
    fault: str | None = None  # why it is not forwarding now
    warning: str | None = None  # the stream's replicas below the recommendation
    replicas: int | None = None
    _commits: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=_SAMPLES))

    def committed_through(self, seq: int) -> None:
        self.committed = seq
        now = time.time()
        if not self._commits or now - self._commits[-1][1] >= _SAMPLE_EVERY_S:
            self._commits.append((seq, now))

    def advanced(self, seq: int, checkpoint_size: int) -> None:
        self.cursor, self.checkpoint_cursor = seq, checkpoint_size
        self.last_success = time.time()
        while len(self._commits) > 1 and self._commits[1][0] <= seq:
            self._commits.popleft()

    @property
    def lag_events(self) -> int:
        return max(0, self.committed - self.cursor)

    @property
    def lag_seconds(self) -> float:
        """Since the oldest unforwarded event was committed (to the 100 ms sample;
        past 4096 samples, the oldest kept)."""
        if self.lag_events == 0:
            return 0.0
        oldest = next((t for seq, t in self._commits if seq > self.cursor), None)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def document(self) -> dict[str, Any]:
        return {
            "stream": self.stream, "servers": self.servers, "state": self.state,
            "cursor": self.cursor, "checkpoint_cursor": self.checkpoint_cursor,
            "lag_events": self.lag_events, "lag_seconds": round(self.lag_seconds, 3),
            "published": self.published, "duplicates": self.duplicates,
            "checkpoints": self.checkpoints, "errors": dict(sorted(self.errors.items())),
            "in_flight": self.in_flight, "connected": self.connected,
            "reconnects": self.reconnects, "last_success": self.last_success,
            "replicas": self.replicas, "fault": self.fault, "warning": self.warning,
        }
