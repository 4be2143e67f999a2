"""`auditd bench --projections N`: what the projections cost and what they answer.

- write cost: the same events committed through Store.insert_batch (the writer's
  call, on the store's thread, in the writer's batch size) into fresh stores with the
  projector off and on, alternating, several runs; medians of events/s and of the
  projector's own time per batch.
- counts: a store of N events, ts spread over 30 days (a month of hourly rows), filled
  through the same path with the projector on; then GET /counts?by=type&interval=1h
  over the whole store, timed inside (the reader's query on the file, as the daemon
  runs it) and through a daemon's status socket (round trip); then the seconds a
  rebuild of counts_by_type takes on that store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from auditd.bench.daemon import ThrowawayDaemon
from auditd.bench.micro import percentile, stored_events
from auditd.cli.operator import UnixHTTPConnection
from auditd.config import Config
from auditd.projections.params import CountsQuery
from auditd.projections.projector import Projector
from auditd.projections.reads import _connect, counts_in
from auditd.schema import StoredEvent
from auditd.store.store import DB_NAME, Store

_MONTH_NS = 30 * 86_400 * 10**9
_CHUNK = 50_000


class _TimedProjector(Projector):
    """The projector, with the time its `project` calls take added up."""

    seconds = 0.0

    def project(self, db: Any, rows: Any, checkpoint: int) -> None:
        started = time.perf_counter()
        super().project(db, rows, checkpoint)
        self.seconds += time.perf_counter() - started


async def _fill(path: Path, batches: list[list[StoredEvent]],
                projector: Projector | None) -> float:
    """Commit the batches into a fresh store at `path`; the seconds it took."""
    store = Store(path)
    await store.open()
    try:
        if projector is not None:
            await store.on_writer(projector.load)
            store.projector = projector
        started = time.perf_counter()
        for batch in batches:
            await store.insert_batch(batch, [], batch[-1].seq)
        return time.perf_counter() - started
    finally:
        await store.close()


def write_cost(count: int, batch_max: int, runs: int) -> dict[str, Any]:
    events = stored_events(count)
    batches = [events[i:i + batch_max] for i in range(0, count, batch_max)]
    rates: dict[str, list[float]] = {"off": [], "on": []}
    project_ms: list[float] = []
    for _ in range(runs):
        for mode in ("off", "on"):
            root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adproj"))
            try:
                projector = _TimedProjector() if mode == "on" else None
                seconds = asyncio.run(_fill(root / DB_NAME, batches, projector))
                rates[mode].append(count / seconds)
                if projector is not None:
                    project_ms.append(projector.seconds * 1000 / len(batches))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"events": count, "batch": batch_max, "runs": runs,
            "off_events_per_s": round(off), "on_events_per_s": round(on),
            "cost_percent": round(100 * (off - on) / off, 1),
            "project_ms_per_batch": round(statistics.median(project_ms), 2),
            "off_runs": [round(r) for r in rates["off"]],
            "on_runs": [round(r) for r in rates["on"]]}


def _month_of(events: list[StoredEvent], total: int, start_ns: int) -> list[StoredEvent]:
    """The events with their ts spread evenly over 30 days, in seq order."""
    step = _MONTH_NS // max(1, total)
    return [msgspec.structs.replace(e, ts=start_ns + e.seq * step) for e in events]


def fill_month(storage: Path, count: int, batch_max: int) -> None:
    storage.mkdir(parents=True, exist_ok=True)
    start = time.time_ns() - _MONTH_NS
    versions: Counter[str] = Counter()

    async def fill() -> None:
        store = Store(storage / DB_NAME)
        await store.open()
        try:
            projector = Projector()
            await store.on_writer(projector.load)
            store.projector = projector
            for first in range(1, count + 1, _CHUNK):
                chunk = _month_of(stored_events(min(_CHUNK, count - first + 1), first=first,
                                                versions=versions), count, start)
                for at in range(0, len(chunk), batch_max):
                    batch = chunk[at:at + batch_max]
                    await store.insert_batch(batch, [], batch[-1].seq)
        finally:
            await store.close()

    asyncio.run(fill())


def _get(socket_path: str, url: str) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(socket_path, timeout=60)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _rebuild(socket_path: str, name: str) -> float:
    """Seconds from POST /projections/rebuild until the projection is live again."""

    started = time.perf_counter()
    conn = UnixHTTPConnection(socket_path, timeout=60)
    try:
        conn.request("POST", "/projections/rebuild", body=json.dumps({"name": name}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()
    while True:
        code, body = _get(socket_path, "/projections")
        entry = json.loads(body)["projections"][name]
        if code == 200 and entry["state"] == "live":
            return time.perf_counter() - started
        time.sleep(0.05)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3),
            "p99": round(percentile(values, 0.99), 3), "max": round(max(values), 3)}


def counts_latency(count: int, config: Config, repetitions: int = 50) -> dict[str, Any]:
    batch_max = config.writer.batch_max
    filled: list[float] = []

    def prepare(storage: Path) -> None:
        started = time.perf_counter()
        fill_month(storage, count, batch_max)
        filled.append(time.perf_counter() - started)

    # One partition bound above the store: no seal runs beside the measurement (the
    # counts read only the projection tables, never the events).
    quiet = msgspec.structs.replace(config, storage=msgspec.structs.replace(
        config.storage, partition_events=16_000_000))
    daemon = ThrowawayDaemon(quiet, "write", None, prepare)
    query = CountsQuery("type")
    with daemon:
        status_socket = daemon.status_socket
        conn = _connect(daemon.db_path)
        try:
            buckets = json.loads(counts_in(conn, query))
            inside = []
            for _ in range(repetitions):
                started = time.perf_counter()
                counts_in(conn, query)
                inside.append((time.perf_counter() - started) * 1000)
        finally:
            conn.close()
        through = []
        for _ in range(repetitions):
            started = time.perf_counter()
            code, body = _get(status_socket, "/counts?by=type&interval=1h")
            through.append((time.perf_counter() - started) * 1000)
            assert code == 200, body
        served = json.loads(body)
        rebuild_s = _rebuild(status_socket, "counts_by_type")
    counted = sum(n for _, _, n in served["buckets"])
    return {"events": count, "fill_s": round(filled[0], 1),
            "fill_events_per_s": round(count / filled[0]), "buckets": len(buckets),
            "counted": counted, "inside_ms": _summary(inside),
            "through_socket_ms": _summary(through), "repetitions": repetitions,
            "rebuild_counts_by_type_s": round(rebuild_s, 2)}


def run_projections(count: int, config: Config, runs: int = 5,
                    write_events: int = 200_000) -> dict[str, Any]:
    return {"write_cost": write_cost(write_events, config.writer.batch_max, runs),
            "counts_by_type_per_hour": counts_latency(count, config)}
