"""Reading events for a query: hot rows by seq, names by value, and events as JSON.

The hot reads run on the query engine's thread, with a read-only connection of its
own; every statement is a rowid or unique-index lookup (`seq IN (...)`, `value IN
(...)`), never a scan of the hot table.
"""

from __future__ import annotations

import base64
import datetime
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec

from auditd.schema import StoredEvent
from auditd.store.statements import json_list

SELECT_HOT_ROWS = (
    "SELECT seq, id, ts, received_at, type, actor, target, stream, stream_seq,"
    " correlation_id, causation_id, tags, data, pid, uid, gid, comm FROM events_view"
    " WHERE seq IN (SELECT value FROM json_each(?))")
SELECT_NAME_IDS = "SELECT value, id FROM names WHERE value IN (SELECT value FROM json_each(?))"


def connect_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to auditd.db (WAL: it never blocks the writer)."""
    conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True,
                           isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=1000")
    conn.execute("PRAGMA cache_size=-8192")
    return conn


def hot_rows(conn: sqlite3.Connection, seqs: Iterable[int]) -> dict[int, StoredEvent]:
    """The hot events of these seqs that are there (released or dead ones are not)."""
    found = {}
    for row in conn.execute(SELECT_HOT_ROWS, (json_list(seqs),)):
        (seq, event_id, ts, received, kind, actor, target, stream, stream_seq, correlation,
         causation, tags, data, pid, uid, gid, comm) = row
        # id_hash 0: a query's event is only shown and matched, never keyed by it.
        found[seq] = StoredEvent(seq, event_id, ts, received, kind, actor, target, stream,
                                 stream_seq, correlation, causation, tags, data, pid, uid,
                                 gid, comm, 0)
    return found


def name_ids(conn: sqlite3.Connection, values: Sequence[str]) -> dict[str, int]:
    if not values:
        return {}
    return {str(value): int(name_id)
            for value, name_id in conn.execute(SELECT_NAME_IDS, (json_list(values),))}


# -- JSON ------------------------------------------------------------------------------

_decode_any = msgspec.msgpack.Decoder()


def rfc3339(ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds: 2026-12-02T10:00:00.123456789Z."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime.datetime):  # a MessagePack timestamp inside data
        ns = int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000
        return rfc3339(ns)
    if isinstance(value, msgspec.msgpack.Ext):
        return {"$ext": value.code, "$bytes": base64.b64encode(value.data).decode()}
    return value


def _payload(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return _jsonable(_decode_any.decode(raw))
    except msgspec.DecodeError:
        return {"$bytes": base64.b64encode(raw).decode()}


def event_json(event: StoredEvent) -> dict[str, Any]:
    """An event as the status socket answers it (interfaces.md, "Events in JSON")."""
    return {
        "seq": event.seq, "id": event.id, "ts": rfc3339(event.ts), "type": event.type,
        "actor": event.actor, "target": event.target, "stream": event.stream,
        "stream_seq": event.stream_seq, "correlation_id": event.correlation_id,
        "causation_id": event.causation_id, "tags": _payload(event.tags),
        "data": _payload(event.data), "received_at": rfc3339(event.received_at),
        "pid": event.pid, "uid": event.uid, "gid": event.gid, "comm": event.comm,
    }
