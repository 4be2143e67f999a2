"""Shared pieces of the fault tests: journal parsing, held locks, the final invariants.

The journal is parsed here independently of auditd.journal.journal (the record format is the
contract being tested): header `>HIQI` = magic 0xA7E1, payload length, seq, crc32 of
length+seq+payload, then the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">HIQI")
MAGIC = 0xA7E1


@dataclass(frozen=True)
class JournalRecord:
    segment: Path
    offset: int  # of the header
    seq: int
    length: int  # of the payload

    @property
    def payload_offset(self) -> int:
        return self.offset + HEADER.size

    @property
    def end(self) -> int:
        return self.payload_offset + self.length


def journal_segments(storage: Path) -> list[Path]:
    return sorted((storage / "journal").glob("*.journal"))


def parse_segment(path: Path) -> list[JournalRecord]:
    """Every record of an undamaged segment; fails loudly on anything else."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        magic, length, seq, crc = HEADER.unpack_from(data, offset)
        assert magic == MAGIC, f"{path.name}@{offset}: bad magic {magic:#x}"
        payload = data[offset + HEADER.size : offset + HEADER.size + length]
        assert len(payload) == length, f"{path.name}@{offset}: short record"
        assert zlib.crc32(payload, zlib.crc32(data[offset + 2 : offset + 14])) == crc
        records.append(JournalRecord(path, offset, seq, length))
        offset += HEADER.size + length
    return records


def journal_records(storage: Path) -> list[JournalRecord]:
    return [record for path in journal_segments(storage) for record in parse_segment(path)]


@contextlib.contextmanager
def write_lock(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock (`BEGIN IMMEDIATE`) from this process until exit."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("ROLLBACK")
    finally:
        conn.close()




def log_events_named(daemon: Any, name: str) -> list[dict[str, Any]]:
    return [event for event in daemon.log_events() if event.get("event") == name]


def assert_seq_gap_free(daemon: Any) -> tuple[int, set[int]]:
    """Every seq 1..max is an event or a dead letter, never both; return (max, dead seqs)."""
    events = [row[0] for row in daemon.query("SELECT seq FROM events ORDER BY seq")]
    dead = [row[0] for row in daemon.query(
        "SELECT seq FROM dead_letters WHERE seq IS NOT NULL ORDER BY seq")]
    assert len(dead) == len(set(dead)), f"a seq is dead-lettered twice: {dead}"
    overlap = set(events) & set(dead)
    assert not overlap, f"seqs both stored and dead-lettered: {sorted(overlap)[:20]}"
    top = max(events[-1:] + dead[-1:] + [0])
    missing = set(range(1, top + 1)) - set(events) - set(dead)
    assert not missing, f"seq gaps (lost events): {sorted(missing)[:20]} of 1..{top}"
    return top, set(dead)


def assert_integrity_ok(db_path: Path) -> None:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def event_count(daemon: Any) -> int:
    return int(daemon.query("SELECT count(*) FROM events")[0][0])


def acked_seqs(events: list[dict[str, Any]], reply: dict[str, Any]) -> dict[str, int]:
    """id -> seq from one reply to a batch of events that all carry ids."""
    rejected = {index for index, *_ in reply.get("rejected", [])}
    assert not rejected, f"unexpected rejections: {reply}"
    duplicates = dict(reply.get("duplicates", []))
    result: dict[str, int] = {}
    next_seq = reply.get("first")
    for index, event in enumerate(events):
        if index in duplicates:
            result[event["id"]] = duplicates[index]
        else:
            assert next_seq is not None, f"no seq for event {index}: {reply}"
            result[event["id"]] = next_seq
            next_seq += 1
    if reply.get("ok"):
        assert next_seq == reply["last"] + 1, f"ok/first/last disagree: {reply}"
    return result


def status_request(daemon: Any, method: str, path: str,
                   body: Any = None) -> tuple[int, dict[str, Any]]:
    """One HTTP request over the daemon's status socket: (HTTP status, JSON body)."""
    import aiohttp

    async def call() -> tuple[int, dict[str, Any]]:
        connector = aiohttp.UnixConnector(path=daemon.status_socket)
        async with aiohttp.ClientSession(connector=connector) as session, \
                session.request(method, f"http://auditd{path}", json=body) as response:
            document: dict[str, Any] = json.loads(await response.text())
            return response.status, document

    return asyncio.run(call())


def health(daemon: Any) -> dict[str, Any]:
    return status_request(daemon, "GET", "/health")[1]
