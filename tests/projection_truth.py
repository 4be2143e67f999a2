"""What the projections must say, computed from the stored events themselves (hot
rows and sealed partitions), and what the daemon says, over its status socket."""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, UnixHTTPConnection, wait_for

from auditd.store.partition.read import SealedPartition
from auditd.store.records import event_from_record, is_dead_letter

HOUR_NS = 3_600_000_000_000
Row = tuple[int, int, str, str | None, int, str]  # seq, ts, type, actor, uid, comm
FIELDS = {"type": 2, "actor": 3, "uid": 4, "comm": 5}


def stored_rows(db_path: Path) -> list[Row]:
    """Every stored event (sealed partitions and the hot table), by seq."""
    found: dict[int, Row] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        files = [str(f) for (f,) in db.execute("SELECT file FROM partitions ORDER BY first_seq")]
        hot = db.execute("SELECT seq, ts, type, actor, uid, comm FROM events_view").fetchall()
    for file in files:
        with SealedPartition(db_path.parent / "partitions" / file) as part:
            seqs = range(part.first_seq, part.last_seq + 1)
            for record in part.records(seqs):
                if not is_dead_letter(record):
                    e = event_from_record(record)
                    found[e.seq] = (e.seq, e.ts, e.type, e.actor, e.uid, e.comm)
    for row in hot:
        found.setdefault(int(row[0]), tuple(row))  # type: ignore[arg-type]
    return [found[seq] for seq in sorted(found)]


def bucket_start(ts: int, hours: int = 1) -> str:
    hour = ts // HOUR_NS
    hour -= hour % hours
    moment = datetime.datetime.fromtimestamp(hour * 3600, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def truth(rows: list[Row], by: str, hours: int = 1,
          uid: int | None = None) -> Counter[tuple[str, Any]]:
    column = FIELDS[by]
    return Counter((bucket_start(r[1], hours), r[column]) for r in rows
                   if uid is None or r[4] == uid)


def http(daemon: DaemonProcess, method: str, path: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        document: dict[str, Any] = json.loads(response.read())
    finally:
        conn.close()
    return response.status, document


def served(daemon: DaemonProcess, by: str, **params: Any) -> Counter[tuple[str, Any]]:
    pairs = [("by", by), *((k, str(v)) for k, v in params.items())]
    status, document = http(daemon, "GET", "/counts?" + urllib.parse.urlencode(pairs))
    assert status == 200, document
    got: Counter[tuple[str, Any]] = Counter()
    for start, value, count in document["buckets"]:
        assert (start, value) not in got, f"bucket given twice: {start} {value}"
        got[(start, value)] = count
    return got


def all_live(daemon: DaemonProcess) -> bool:
    """Every event handed a seq is committed (admin events too), and every projection
    is live at that checkpoint."""
    stats = daemon.stats()
    if stats["pending"] or stats["last_committed_seq"] != stats["last_seq"]:
        return False
    return all(p["state"] == "live" and p["position"] == stats["last_seq"]
               for p in stats["projections"].values())


def wait_projections_live(daemon: DaemonProcess, timeout: float = 60) -> None:
    wait_for(lambda: all_live(daemon), timeout, "every projection live at the checkpoint")


def assert_counts_match(daemon: DaemonProcess) -> list[Row]:
    """Every count projection and interval equal to the events; returns the rows."""
    wait_projections_live(daemon)
    rows = stored_rows(daemon.db_path)
    for by in FIELDS:
        assert served(daemon, by) == truth(rows, by), f"by={by}"
        assert served(daemon, by, interval="1d") == truth(rows, by, 24), f"by={by}, 1d"
    assert sum(served(daemon, "type").values()) == len(rows)
    return rows


def actor_truth(rows: list[Row], actor: str, uid: int | None = None) -> dict[str, Any]:
    mine = [r for r in rows if r[3] == actor and (uid is None or r[4] == uid)]
    return {"total": len(mine), "last_seq": max(r[0] for r in mine),
            "first_ts": min(r[1] for r in mine), "last_ts": max(r[1] for r in mine)}
