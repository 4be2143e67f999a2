"""Benchmarks without a load: the storage baseline, the ring's hot reads, journal replay."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from auditd.bench.clients import make_event
from auditd.bench.daemon import ThrowawayDaemon
from auditd.config import Config
from auditd.journal.journal import encode_record
from auditd.ring import RingBuffer
from auditd.schema import StoredEvent, encoder, id_hash
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate
from auditd.store.statements import EVENTS, event_row, transaction
from auditd.store.store import DB_NAME


def stored_events(count: int, correlations: int = 0, first: int = 1,
                  versions: Counter[str] | None = None) -> list[StoredEvent]:
    """`count` events as the daemon stores them from seq `first` on: seq and stream_seq
    gap-free (pass the same `versions` to continue streams across calls), ts rising."""
    versions = Counter() if versions is None else versions
    now, pid, uid, gid = time.time_ns(), os.getpid(), os.getuid(), os.getgid()
    events = []
    for i in range(first - 1, first - 1 + count):
        wire = make_event(i)
        versions[wire["stream"]] += 1
        ts = now + i * 10_000  # arrival order, as the daemon's receive-time default gives
        events.append(StoredEvent(
            i + 1, wire["id"], ts, ts, wire["type"], wire["actor"], wire["target"],
            wire["stream"], versions[wire["stream"]],
            f"op-{i % correlations}" if correlations else None, None,
            encoder.encode(wire["tags"]), encoder.encode(wire["data"]), pid, uid, gid, "bench",
            id_hash(wire["id"])))
    return events


def run_baseline(count: int, batch_max: int) -> tuple[float, float]:
    """Rows/s and CPU seconds: the same events inserted with sqlite3, same schema.

    Names go through a dict that inserts misses into `names`, as the store does, and
    building the rows is timed because the daemon pays for it too. The streams upsert
    and the checkpoint row are the daemon's bookkeeping, not the storage ceiling.
    """
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adbase"))
    try:
        conn = connect_sync(root / DB_NAME)
        migrate(conn)
        events = stored_events(count)
        name_id = name_inserter(conn)

        started, cpu = time.perf_counter(), time.process_time()
        for at in range(0, count, batch_max):
            with transaction(conn):
                conn.executemany(EVENTS.one(),
                                 [event_row(e, name_id) for e in events[at:at + batch_max]])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        conn.close()
        return count / elapsed, round(cpu, 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_ring(capacity: int = 10_000, correlations: int = 100,
             repetitions: int = 2_000) -> dict[str, Any]:
    """µs per call of recent(100) and by_correlation() on a full, mostly committed ring."""
    ring: RingBuffer[StoredEvent] = RingBuffer(capacity, 1 << 40)
    ring.push(stored_events(capacity, correlations), [300] * capacity)
    ring.mark_committed(capacity - 100)  # the writer is always a little behind
    timings: dict[str, list[float]] = {"recent_100": [], "by_correlation": []}
    for i in range(repetitions):
        t0 = time.perf_counter_ns()
        ring.recent(100)
        t1 = time.perf_counter_ns()
        ring.by_correlation(f"op-{i % correlations}")
        t2 = time.perf_counter_ns()
        timings["recent_100"].append((t1 - t0) / 1000)
        timings["by_correlation"].append((t2 - t1) / 1000)
    result: dict[str, Any] = {"capacity": capacity, "repetitions": repetitions,
                              "events_per_correlation": capacity // correlations}
    for name, values in timings.items():
        result[f"{name}_us"] = {"mean": round(sum(values) / len(values), 2),
                                "p99": round(percentile(values, 0.99), 2),
                                "max": round(max(values), 2)}
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def write_journal(storage: Path, count: int, chunk: int = 50_000) -> int:
    """A journal of `count` events nobody committed yet, as a crash would leave it."""
    journal = storage / "journal"
    journal.mkdir(parents=True)
    written = 0
    with (journal / f"{1:020d}.journal").open("wb") as segment:
        for events in _chunks(count, chunk):
            data = b"".join(encode_record(e.seq, encoder.encode(e)) for e in events)
            segment.write(data)
            written += len(data)
    return written


def _chunks(count: int, chunk: int) -> Iterator[list[StoredEvent]]:
    versions: Counter[str] = Counter()
    for start in range(0, count, chunk):
        yield stored_events(min(chunk, count - start), first=start + 1, versions=versions)


def run_replay(count: int, config: Config) -> dict[str, Any]:
    """Seconds from `auditd run` to ready and to every journaled event committed."""
    written: list[int] = []
    daemon = ThrowawayDaemon(config, "write", None,
                             lambda storage: written.append(write_journal(storage, count)))
    started = time.monotonic()
    with daemon:
        ready = time.monotonic() - started
        with sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True) as conn:
            while int(conn.execute("SELECT value FROM meta WHERE key = 'committed_seq'")
                      .fetchone()[0]) < count:
                time.sleep(0.05)
        done = time.monotonic() - started
    return {"events": count, "journal_bytes": written[0], "ready_s": round(ready, 2),
            "all_committed_s": round(done, 2), "events_per_s": round(count / done, 1)}


def name_inserter(conn: sqlite3.Connection) -> Callable[[str], int]:
    """A string's `names` id, inserted on first sight and cached (a baseline's name_id)."""
    names: dict[str, int] = {}

    def name_id(value: str) -> int:
        found = names.get(value)
        if found is None:
            found = names[value] = int(conn.execute(
                "INSERT INTO names (value) VALUES (?) RETURNING id", (value,)
            ).fetchone()[0])
        return found

    return name_id
