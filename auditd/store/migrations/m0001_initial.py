"""Schema 1: events, the string dictionary, streams, the checkpoint and dead letters.

Why this shape (see the README's storage section):
- Repeated strings (type, actor, target, stream, comm) are stored once in `names` and
  referenced by small integer ids, so rows and index entries stay small.
- Idempotency is indexed on a 64-bit hash of the id rather than the id text: a much
  smaller index; the text is compared on a hash match.
- Filter indexes end in `ts` so a time range on a hot actor or type is one range scan;
  they are partial (`WHERE x IS NOT NULL`) so absent fields cost nothing.
- `seq` is the rowid: the table is stored in arrival order, cursors are rowid ranges.
- The commit checkpoint (`meta.committed_seq`) is written in the same transaction as
  the events it covers, which is what makes journal replay exactly-once.
"""

NO_UPDATE_TRIGGER = """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
       BEGIN SELECT RAISE(ABORT, 'events are append-only'); END"""

UP: tuple[str, ...] = (
    "CREATE TABLE names (id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE)",
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        id_hash INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        type INTEGER NOT NULL,
        actor INTEGER,
        target INTEGER,
        stream INTEGER,
        stream_seq INTEGER,
        correlation_id TEXT,
        causation_id TEXT,
        tags BLOB,
        data BLOB,
        pid INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        comm INTEGER NOT NULL
    )""",
    "CREATE INDEX events_id_hash ON events (id_hash)",
    "CREATE INDEX events_type_ts ON events (type, ts)",
    "CREATE INDEX events_actor_ts ON events (actor, ts) WHERE actor IS NOT NULL",
    "CREATE INDEX events_target_ts ON events (target, ts) WHERE target IS NOT NULL",
    "CREATE UNIQUE INDEX events_stream ON events (stream, stream_seq) WHERE stream IS NOT NULL",
    "CREATE INDEX events_correlation ON events (correlation_id) "
    "WHERE correlation_id IS NOT NULL",
    "CREATE INDEX events_ts ON events (ts)",
    """CREATE TABLE streams (
        stream INTEGER PRIMARY KEY, version INTEGER NOT NULL, last_seq INTEGER NOT NULL)""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "INSERT INTO meta VALUES ('committed_seq', 0), ('retention_gate', 0)",
    """CREATE TABLE dead_letters (
        dlq_id INTEGER PRIMARY KEY,
        seq INTEGER,
        source TEXT NOT NULL,
        code TEXT NOT NULL,
        reason TEXT NOT NULL,
        raw BLOB NOT NULL,
        size INTEGER NOT NULL,
        uid INTEGER,
        attempts INTEGER NOT NULL DEFAULT 1,
        first_failed_at INTEGER NOT NULL,
        last_failed_at INTEGER NOT NULL
    )""",
    "CREATE INDEX dead_letters_seq ON dead_letters (seq) WHERE seq IS NOT NULL",
    # For people and scripts reading the file with sqlite3: names resolved.
    """CREATE VIEW events_view AS SELECT e.seq, e.id, e.ts, e.received_at,
        t.value AS type, a.value AS actor, g.value AS target, s.value AS stream,
        e.stream_seq, e.correlation_id, e.causation_id, e.tags, e.data,
        e.pid, e.uid, e.gid, c.value AS comm
        FROM events e JOIN names t ON t.id = e.type
        LEFT JOIN names a ON a.id = e.actor LEFT JOIN names g ON g.id = e.target
        LEFT JOIN names s ON s.id = e.stream JOIN names c ON c.id = e.comm""",
    # Append-only: only the retention path, which opens the gate inside its own
    # transaction, may delete.
    NO_UPDATE_TRIGGER,
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
       WHEN (SELECT value FROM meta WHERE key = 'retention_gate') IS NOT 1
       BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
)

DOWN = (
    "DROP VIEW events_view",
    "DROP TABLE dead_letters",
    "DROP TABLE meta",
    "DROP TABLE streams",
    "DROP TABLE events",
    "DROP TABLE names",
)
