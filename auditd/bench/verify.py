"""`python -m auditd.bench.verify --events N --store DIR`: the figures of `auditd verify`
and of proofs on a store of N soak events (sealed partitions of 131,072, the rest hot).

The store is built once into DIR (kept for later runs): partitions sealed from the soak's
records, the hot rows inserted, the tree built as the daemon builds it for a store
from before (auditd.proofs.ledger), one checkpoint signed. Then: verify's wall time
and events/s (median of --runs), and inclusion proofs built and checked (median ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from auditd.bench.micro import stored_events
from auditd.bench.sealed_events import StoredSoakEvents
from auditd.proofs import keys
from auditd.proofs.checkpointer import host_id_of
from auditd.proofs.ledger import Ledger
from auditd.proofs.notes import origin, sign_checkpoint, verifier_of
from auditd.proofs.offline import check_proof
from auditd.proofs.prove import inclusion
from auditd.proofs.verify import verify_store
from auditd.schema import StoredEvent
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate
from auditd.store.partition.build import seal_partition
from auditd.store.sealing.catalog import CatalogEntry, add
from auditd.store.statements import EVENTS, NAMES, event_row, insert_rows, transaction
from auditd.store.store import DB_NAME, Store

PARTITION = 131_072


class _TimedLedger(Ledger):
    """The ledger, with the time its `extend` calls take added up."""

    seconds = 0.0

    def extend(self, db: Any, events: Any, dead: Any) -> None:
        started = time.perf_counter()
        super().extend(db, events, dead)
        self.seconds += time.perf_counter() - started


async def _fill(path: Path, batches: list[list[StoredEvent]], ledger: Ledger | None) -> float:
    store = Store(path)
    store.ledger = ledger
    await store.open()
    try:
        started = time.perf_counter()
        for batch in batches:
            await store.insert_batch(batch, [], batch[-1].seq)
        return time.perf_counter() - started
    finally:
        await store.close()


def write_cost(count: int, batch_max: int, runs: int) -> dict[str, Any]:
    """The writer's events/s through Store.insert_batch with the tree off and on,
    alternating in one process; medians, and the ledger's own µs per event."""
    events = stored_events(count)
    batches = [events[i:i + batch_max] for i in range(0, count, batch_max)]
    rates: dict[str, list[float]] = {"off": [], "on": []}
    ledger_us: list[float] = []
    for _ in range(runs):
        for mode in ("off", "on"):
            root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adtree"))
            try:
                ledger = _TimedLedger(root / "partitions") if mode == "on" else None
                seconds = asyncio.run(_fill(root / DB_NAME, batches, ledger))
                rates[mode].append(count / seconds)
                if ledger is not None:
                    ledger_us.append(ledger.seconds * 1e6 / count)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"events": count, "batch": batch_max, "runs": runs,
            "off_events_per_s": round(off), "on_events_per_s": round(on),
            "cost_percent": round(100 * (off - on) / off, 1),
            "ledger_us_per_event": round(statistics.median(ledger_us), 2),
            "off_runs": [round(r) for r in rates["off"]],
            "on_runs": [round(r) for r in rates["on"]]}


def build_store(directory: Path, events: int, hot: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    db = connect_sync(directory / "auditd.db")
    migrate(db)
    source = StoredSoakEvents(1)
    sealed = events - hot
    partitions = directory / "partitions"
    partitions.mkdir(exist_ok=True)
    for first in range(1, sealed + 1, PARTITION):
        last = min(sealed, first + PARTITION - 1)
        info = seal_partition(source.records(first - 1, last), partitions, first, last)
        add(db, CatalogEntry(first, last, info.path.name, info.count, info.bytes,
                             info.format_version, time.time_ns(), info.seconds))
        print(f"sealed {first}..{last} in {info.seconds:.1f} s", flush=True)
    names: dict[str, int] = {}

    def name_id(value: str) -> int:
        found = names.get(value)
        if found is None:
            insert_rows(db, NAMES, [(value,)])
            found = names[value] = int(db.execute(
                "SELECT id FROM names WHERE value = ?", (value,)).fetchone()[0])
        return found

    for at in range(sealed, events, 4096):
        with transaction(db):
            insert_rows(db, EVENTS, [event_row(e, name_id)
                                     for e in source.events(at, min(events, at + 4096))])
    db.execute("UPDATE meta SET value = ? WHERE key = 'committed_seq'", (events,))
    ledger = Ledger(partitions)
    started = time.monotonic()
    ledger.load(db)
    print(f"tree built over {events} events in {time.monotonic() - started:.1f} s", flush=True)
    key = keys.write_key(directory / keys.KEY_NAME)
    checkpoint = sign_checkpoint(key, origin(host_id_of(db)), ledger.tree.size,
                                 ledger.tree.edge.root(), int(time.time()))
    db.execute("INSERT INTO checkpoints (size, root, time, text) VALUES (?, ?, ?, ?)",
               (checkpoint.size, checkpoint.root, checkpoint.time, checkpoint.text))
    db.close()


def run(directory: Path, events: int, hot: int, runs: int, workers: int | None,
        proofs: int) -> dict[str, Any]:
    if not (directory / "auditd.db").exists():
        build_store(directory, events, hot)
    db = connect_sync(directory / "auditd.db")
    vkey = verifier_of(origin(host_id_of(db)), keys.load_key(directory / keys.KEY_NAME))
    seconds, rates = [], []
    for _ in range(runs):
        report = verify_store(directory, vkey, workers=workers)
        assert report.status == "verified", report.document()
        seconds.append(report.seconds)
        rates.append(report.verified_events / report.seconds)
    rng = random.Random(5)
    build_ms, check_ms, lengths = [], [], []
    for _ in range(proofs):
        seq = rng.randint(1, events)
        started = time.perf_counter()
        doc = inclusion(db, directory / "partitions", seq)
        build_ms.append((time.perf_counter() - started) * 1000)
        text = json.dumps(doc)
        started = time.perf_counter()
        check_proof(text, vkey)
        check_ms.append((time.perf_counter() - started) * 1000)
        lengths.append(len(doc["path"]))
    db.close()
    return {"events": events, "hot": hot, "runs": runs, "workers": workers,
            "verify_seconds": [round(s, 2) for s in seconds],
            "verify_seconds_median": round(statistics.median(seconds), 2),
            "verify_events_per_s_median": round(statistics.median(rates)),
            "proof_build_ms_median": round(statistics.median(build_ms), 3),
            "proof_check_ms_median": round(statistics.median(check_ms), 3),
            "proof_hashes_max": max(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m auditd.bench.verify")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--hot", type=int, default=100_000, help="events left hot")
    parser.add_argument("--store", type=Path, help="built here once, kept")
    parser.add_argument("--write-cost", type=int, metavar="N",
                        help="only the writer's events/s with the tree off and on: N events "
                        "through Store.insert_batch, --runs alternations, batches of --batch")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--proofs", type=int, default=200)
    args = parser.parse_args()
    if args.write_cost:
        print(json.dumps(write_cost(args.write_cost, args.batch, args.runs)))
        return
    if args.store is None:
        parser.error("--store is required")
    print(json.dumps(run(args.store, args.events, args.hot, args.runs, args.workers,
                         args.proofs)))


if __name__ == "__main__":
    main()
