"""Commands that work on the database file: `auditd recover` and `auditd migrate`.

`migrate` never runs beside a daemon: it refuses while a process has the database
open or a daemon answers on the config's sockets, refuses a roll-back that would
delete events unless told `--yes-delete-events`, and backs the database up first.
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.store import migrations
from auditd.store.connection import connect_sync
from auditd.store.migrations.guard import backup_beside, database_holder, process_name
from auditd.store.store import DB_NAME

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"auditd: {message}", file=sys.stderr)
    return code


def _progress(label: str) -> Callable[[int, int], None]:
    """A one-line progress display, only on a TTY."""
    def show(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{label}: {done}/{total}", end="", file=sys.stderr, flush=True)
    return show


def listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except TimeoutError:  # a backlog so full it cannot take us: very much alive
            return True
        except OSError:
            return False
    return True


def cmd_recover(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator  # aiohttp: imported only by commands that use it
    from auditd.store.recovery import salvage

    damaged = Path(args.damaged)
    if not damaged.exists():
        return fail(f"{damaged}: no such file")
    live = Path(config.storage.path) / DB_NAME
    if not live.exists():
        return fail(f"{live}: no live database (start the daemon once first)")
    try:  # through the running daemon, so the recovered ids join its idempotency filter
        code, document = operator.call(str(args.status_socket or config.status.socket),
                                       "POST", "/recover", {"path": str(damaged.resolve())})
        if code != 200:
            return fail(str(document.get("message", code)))
    except operator.StatusUnreachable:
        if listening(config.ingest.socket):  # copying beside it would bypass its id filter
            return fail(f"a daemon is listening on {config.ingest.socket} but its status "
                        "socket does not answer; recover through it (--status-socket) "
                        "or stop it first")
        try:
            document = salvage(damaged, live, _progress("recovering")).document(str(live))
            if document["copied"]:
                _projections_rebuilt_at_start(live)
                document["projections"] = "rebuilt at the next start"
        except sqlite3.Error as exc:
            return fail(f"recover from {damaged} failed: {exc}")
    print(json.dumps(document) if args.json else
          f"copied {document['copied']} events and {document.get('dead_letters_copied', 0)} "
          f"dead letters into {document['into']}; {document['already_present']} events "
          f"were already there; {document['unreadable']} could not be read")
    return EXIT_OK


def _projections_rebuilt_at_start(live: Path) -> None:
    """The copied events went in beside any writer: the projections count them only
    once rebuilt from the events, which the next start does."""
    from auditd.projections.projector import invalidate

    conn = connect_sync(live)
    try:
        invalidate(conn)
    finally:
        conn.close()


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    db = Path(config.storage.path) / DB_NAME
    if args.status:
        return _migration_status(db)
    refusal = daemon_in_the_way(db, config, "migrating")
    if refusal is not None:
        return fail(refusal)
    try:
        return _migrate(db, args.to, args.yes_delete_events)
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)
    except sqlite3.Error as exc:
        return fail(f"{db}: migration failed: {exc}")


def _migration_status(db: Path) -> int:
    done: dict[int, tuple[int, str | None]] = {}
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            done = migrations.recorded(conn)
        except sqlite3.Error as exc:
            return fail(f"{db}: cannot read the schema version: {exc}")
        finally:
            conn.close()
    for version in sorted(v for v in done if v > migrations.LATEST):
        print(f"{version:4d} {'(unknown)':20s} applied  newer than this auditd knows "
              f"(its newest is {migrations.LATEST})")
    for migration in migrations.MIGRATIONS:
        state = "applied" if migration.version in done else "pending"
        if migration.version in done:
            at, recorded_sum = done[migration.version]
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at / 1e9))
            mark = ("" if recorded_sum in (None, migrations.checksum(migration))
                    else "  CHECKSUM DIFFERS: applied from another definition")
            state += f"  {when}  {recorded_sum or '-'}{mark}"
        print(f"{migration.version:4d} {migration.name:20s} {state}")
    return EXIT_OK


def daemon_in_the_way(db: Path, config: Config, action: str) -> str | None:
    """Why `action` ("migrating", "restoring") now would pull the store from under a
    daemon; None when nothing holds it."""
    holder = database_holder(db)
    if holder is not None:
        return (f"{process_name(holder)} has {db} open; stop the daemon (and anything "
                f"else using the database) before {action}")
    for what, path in (("ingest", config.ingest.socket), ("status", config.status.socket)):
        if listening(path):
            return (f"a daemon answers on its {what} socket {path}; stop it before "
                    f"{action}")
    return None


def _migrate(db: Path, to: int | None, delete_events: bool) -> int:
    existed = db.exists()
    conn = connect_sync(db)
    try:
        before = migrations.current(conn)
        steps = migrations.plan(conn, to)
        if not steps:
            print("schema is up to date")
            return EXIT_OK
        target = migrations.LATEST if to is None else to
        lost = migrations.losses(conn, steps)
        if lost and not delete_events:
            what = "; ".join(
                f"rolling back migration {m.version} ({m.name}) would delete "
                + " and ".join(_rows(count, table) for table, count in counts.items())
                for m, counts in lost)
            return fail(f"{what}; pass --yes-delete-events to do it (a backup is taken "
                        "first)")
        if existed:
            backup = backup_beside(db, before, target)
            print(f"backup: {backup}")
        actions = migrations.migrate(conn, to)
    except AuditdError as exc:
        return fail(str(exc))
    finally:
        conn.close()
    print("\n".join(actions))
    return EXIT_OK


def _rows(count: int, table: str) -> str:
    noun = table.replace("_", " ")  # events, dead letters
    return f"{count} {noun[:-1] if count == 1 else noun}"
