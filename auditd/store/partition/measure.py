"""`python -m auditd.store.partition.measure N [--partition-events K]`: seal N soak
events into partitions and report bytes per event (per table and per field), sealing
CPU and wall time per 1M events, the sealer's peak RSS, and query timings.

The events are the soak's (auditd/bench/soak_events.py) as the daemon stores them
(auditd/bench/sealed_events.py), written once to a scratch file of records. Each
partition is sealed by a child process reading that file, so that its CPU time and
peak RSS are the sealer's alone, not the generator's. Queries run on the first
partition, each kind many times with fresh random arguments: median and p99.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from auditd.bench.sealed_events import StoredSoakEvents
from auditd.bench.soak_events import ACTORS
from auditd.store.partition.build import seal_partition
from auditd.store.partition.fields import decode_fields
from auditd.store.partition.read import SealedPartition
from auditd.store.partition.space import table_space

HOUR_NS = 3600 * 10**9
FIELD_NAMES = {"y": "type", "a": "actor", "g": "target", "s": "stream", "c": "correlation_id",
               "k": "causation_id", "u": "uid", "m": "comm", "t": "tags", "w": "text words",
               "i": "id", "d": "dead letters"}


def write_records(path: Path, count: int, seed: int, cuts: list[int]) -> list[int]:
    """The records of seqs 1..count, length-prefixed; the file offset of each cut."""
    source = StoredSoakEvents(seed, long_correlation_every=50_000)
    offsets = []
    with path.open("wb") as out:
        for seq, record in source.records(0, count):
            if seq in cuts:
                offsets.append(out.tell())
            out.write(len(record).to_bytes(4, "little"))
            out.write(record)
    return offsets


def _read_records(path: Path, offset: int, first: int, last: int) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as source:
        source.seek(offset)
        for seq in range(first, last + 1):
            yield seq, source.read(int.from_bytes(source.read(4), "little"))


def seal_child(path: Path, offset: int, directory: Path, first: int, last: int) -> None:
    """The sealer: one partition from the records file; prints its figures as JSON."""
    cpu, wall = time.process_time(), time.perf_counter()
    info = seal_partition(_read_records(path, offset, first, last), directory, first, last)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"path": str(info.path), "count": info.count, "bytes": info.bytes,
                      "cpu": cpu, "wall": wall, "process_cpu": usage.ru_utime + usage.ru_stime,
                      "peak_rss_kb": usage.ru_maxrss, "by_field": info.bytes_by_field}))


def _timed(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, p99) in ms."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def _words_around(part: SealedPartition, share: float) -> list[tuple[str, int]]:
    """The long text words whose counts are nearest `share` of the events from below
    and from above (the soak's words jump from ~0.02 % to ~0.4 %: none is at 0.1 %)."""
    wanted = share * part.count
    rows = part.conn.execute("SELECT text, count FROM long_terms WHERE text LIKE 'w%'").fetchall()
    below = [row for row in rows if row[1] <= wanted]
    above = [row for row in rows if row[1] > wanted]
    picked = [max(below, key=lambda row: row[1])] if below else []
    picked += [min(above, key=lambda row: row[1])] if above else []
    return [(text[1:], count) for text, count in picked]


def bench_queries(path: Path, repeat: int, seed: int) -> dict[str, tuple[float, float]]:
    rng = random.Random(seed)
    out: dict[str, tuple[float, float]] = {}
    with SealedPartition(path) as part:
        first, last = part.first_seq, part.last_seq
        samples = [decode_fields(part.record(rng.randint(first, last)) or b"")
                   for _ in range(repeat)]
        samples = [s for s in samples if not s.dead_letter]
        zones = part.zones()
        span, start_ts = zones.maxs[-1] - zones.mins[0], zones.mins[0]
        around = _words_around(part, 0.001)
        long_corr = [row[0][1:] for row in part.conn.execute(
            "SELECT text FROM long_terms WHERE text LIKE 'c%' AND count >= 100")]
        actors = [f"user{a:04d}@corp.example" for a in range(ACTORS) if a % 10]
        pick = iter(samples * 20).__next__

        def in_hour() -> list[int]:
            since = start_ts + rng.randrange(max(1, span - HOUR_NS))
            return part.query({"type": [pick().type]}, since_ns=since,
                              until_ns=since + HOUR_NS, limit=100)

        def cursor_page() -> list[int]:
            return part.query({"type": [pick().type]}, before_seq=rng.randint(first, last),
                              limit=100)

        kinds: dict[str, Callable[[], object]] = {
            "newest 100 of one actor": lambda: part.query({"actor": [rng.choice(actors)]},
                                                          limit=100),
            "newest 100 of one type in 1 h": in_hour,
            "id lookup": lambda: part.lookup_id(pick().id),
            "100-event correlation": lambda: part.query(
                {"correlation_id": [rng.choice(long_corr)]}, limit=1000),
            "newest 100 of one actor, with their records": lambda: part.records(
                part.query({"actor": [rng.choice(actors)]}, limit=100)),
            "OR of two actors newest 100": lambda: part.query(
                {"actor": rng.sample(actors, 2)}, limit=100),
            "page of one type after a cursor": cursor_page,
            "record(seq) random": lambda: part.record(rng.randint(first, last)),
            "records(100 random seqs)": lambda: part.records(
                [rng.randint(first, last) for _ in range(100)]),
            "open + close": lambda: SealedPartition(path).close(),
        }
        for word, count in around:
            kinds[f"text {word!r} ({count / part.count:.3%}) newest 100"] = (
                lambda word=word: part.query({"q": [word]}, limit=100))  # type: ignore[misc]
            kinds[f"text {word!r} AND 'corp' newest 100"] = (
                lambda word=word: part.query({"q": [word, "corp"]}, limit=100))  # type: ignore[misc]
        for name, run in kinds.items():
            if "correlation" in name and not long_corr:
                continue
            part._blocks.clear()  # no block cached from an earlier kind
            out[name] = _timed(run, repeat)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m auditd.store.partition.measure")
    parser.add_argument("events", type=int)
    parser.add_argument("--partition-events", type=int, default=0,
                        help="seal partitions of this many events (default: one of all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=300, help="runs of each query kind")
    parser.add_argument("--dir", type=Path, default=None, help="keep the files here")
    parser.add_argument("--seal-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seal_child:
        path, offset, directory, first, last = args.seal_child
        seal_child(Path(path), int(offset), Path(directory), int(first), int(last))
        return
    root = args.dir or Path(tempfile.mkdtemp(dir="/tmp", prefix="sealmeasure"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report(root, args.events, args.partition_events or args.events, args.seed, args.repeat)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def report(root: Path, events: int, per_partition: int, seed: int, repeat: int) -> None:
    records = root / "records.bin"
    cuts = list(range(1, events + 1, per_partition))
    started = time.perf_counter()
    offsets = write_records(records, events, seed, cuts)
    print(f"{events} events written in {time.perf_counter() - started:.1f} s "
          f"({records.stat().st_size / events:.0f} B/record E)")
    results: list[dict[str, Any]] = []
    for first, offset in zip(cuts, offsets, strict=True):
        last = min(events, first + per_partition - 1)
        child = subprocess.run(
            [sys.executable, "-m", "auditd.store.partition.measure", "0", "--seal-child",
             str(records), str(offset), str(root), str(first), str(last)],
            check=True, capture_output=True, text=True)
        results.append(json.loads(child.stdout))
    records.unlink()
    total_bytes = sum(r["bytes"] for r in results)
    per_million = 1_000_000 / events
    print(f"partitions: {len(results)} of {per_partition} events; "
          f"{total_bytes / events:.1f} B/event all included")
    tables: Counter[str] = Counter()
    for result in results:
        for space in table_space(Path(result["path"])):
            tables[space.name] += space.bytes
    for name, size in tables.most_common():
        print(f"  table {name:16} {size / events:7.2f} B/event")
    fields: Counter[str] = Counter()
    for result in results:
        fields.update(result["by_field"])
    for letter, size in fields.most_common():
        print(f"  index {FIELD_NAMES.get(letter, letter):16} {size / events:7.2f} B/event "
              "(payload)")
    cpu = sum(r["cpu"] for r in results)
    wall = sum(r["wall"] for r in results)
    print(f"seal: {cpu * per_million:.1f} s CPU and {wall * per_million:.1f} s wall per 1M "
          f"({cpu / events * 1e6:.1f} us/event); sealer peak RSS "
          f"{max(r['peak_rss_kb'] for r in results) / 1024:.0f} MB")
    print(f"queries on {Path(results[0]['path']).name} ({results[0]['count']} events), "
          f"{repeat} runs each: median / p99 ms")
    for name, (median, p99) in bench_queries(Path(results[0]["path"]), repeat, seed).items():
        print(f"  {name:48} {median:8.3f} {p99:8.3f}")
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
