"""The `auditd` command: subcommands, exit codes 0 (ok), 1 (operational failure), 2 (usage)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from auditd.config import Config, load_config
from auditd.errors import AuditdError, ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exit code 2, one line
        self.exit(EXIT_USAGE, f"auditd: {message}\n")


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"auditd: {message}", file=sys.stderr)
    return code


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected key=value")
        result[key] = value
    return result


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    import uvloop

    from auditd.daemon import Daemon
    from auditd.logs import configure_logging
    from auditd.systemd import listen_fds

    configure_logging(config.log.level, config.log.format)
    sockets = listen_fds()
    return uvloop.run(Daemon(config, sockets=sockets).run())


def cmd_send(args: argparse.Namespace, config: Config) -> int:
    from auditd.client import Client

    event: dict[str, Any] = {"type": args.type}
    for key in ("actor", "target", "stream", "id"):
        if getattr(args, key) is not None:
            event[key] = getattr(args, key)
    if args.correlation is not None:
        event["correlation_id"] = args.correlation
    if args.tag:
        event["tags"] = _key_values(args.tag, "--tag")
    data: dict[str, Any] = _key_values(args.data, "--data") if args.data else {}
    if args.data_json is not None:
        from auditd.ingest import depth

        if not depth.json_within(args.data_json):  # json.loads would recurse that deep
            raise ConfigError(f"--data-json: nested deeper than {depth.MAX_DEPTH} levels")
        try:
            data.update(json.loads(args.data_json))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--data-json: not a JSON object: {exc}") from None
    if data:
        event["data"] = data
    socket_path = args.socket or config.ingest.socket
    with Client(socket_path, raise_on_reject=False) as client:
        reply = client.send(event)
    print(json.dumps(msgspec.to_builtins(reply)))
    return EXIT_OK if reply.ok else EXIT_FAILURE


def _progress(label: str) -> Callable[[int, int], None]:
    """A one-line progress display, only on a TTY."""
    def show(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{label}: {done}/{total}", end="", file=sys.stderr, flush=True)
    return show


def cmd_recover(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from auditd.store.recovery import salvage
    from auditd.store.store import DB_NAME

    damaged = Path(args.damaged)
    if not damaged.exists():
        return _fail(f"{damaged}: no such file")
    live = Path(config.storage.path) / DB_NAME
    if not live.exists():
        return _fail(f"{live}: no live database (start the daemon once first)")
    try:  # through the running daemon, so the recovered ids join its idempotency filter
        from auditd.cli import operator

        code, document = operator.call(str(args.status_socket or config.status.socket),
                                       "POST", "/recover", {"path": str(damaged.resolve())})
        if code != 200:
            return _fail(str(document.get("message", code)))
    except operator.StatusUnreachable:
        if _listening(config.ingest.socket):  # copying beside it would bypass its id filter
            return _fail(f"a daemon is listening on {config.ingest.socket} but its status "
                         "socket does not answer; recover through it (--status-socket) "
                         "or stop it first")
        document = salvage(damaged, live, _progress("recovering")).document(str(live))
    print(json.dumps(document) if args.json else
          f"copied {document['copied']} events into {document['into']}; "
          f"{document['already_present']} were already there; "
          f"{document['unreadable']} could not be read")
    return EXIT_OK


def _listening(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from auditd.store import migrations
    from auditd.store.store import DB_NAME, connect_sync

    conn = connect_sync(Path(config.storage.path) / DB_NAME)
    try:
        if args.status:
            done = set(migrations.applied(conn))
            for migration in migrations.MIGRATIONS:
                state = "applied" if migration.version in done else "pending"
                print(f"{migration.version:4d} {migration.name:20s} {state}")
            return EXIT_OK
        try:
            actions = migrations.migrate(conn, args.to)
        except ValueError as exc:
            return _fail(str(exc), EXIT_USAGE)
    finally:
        conn.close()
    print("\n".join(actions) or "schema is up to date")
    return EXIT_OK


def _status_socket(args: argparse.Namespace, config: Config) -> str:
    return str(args.status_socket or config.status.socket)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    return operator.status(_status_socket(args, config), args.json)


def cmd_dlq(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    return operator.dlq(_status_socket(args, config), args.action, args.ids, args.all,
                        args.json, args.limit)


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    return operator.backup(_status_socket(args, config), args.dest, args.json)


def cmd_bench(args: argparse.Namespace, config: Config) -> int:
    from auditd.bench import main as bench_main

    return bench_main(args, config)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="auditd", description="Local audit-event daemon.")
    parser.add_argument("--config", help="config file (default: $AUDITD_CONFIG, "
                        "/etc/auditd/auditd.toml)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="the daemon, in the foreground")
    run.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run)

    send = sub.add_parser("send", help="write one event from a shell; prints the reply")
    send.add_argument("type")
    send.add_argument("--actor")
    send.add_argument("--target")
    send.add_argument("--stream")
    send.add_argument("--id")
    send.add_argument("--correlation")
    send.add_argument("--tag", action="append", default=[], metavar="K=V")
    send.add_argument("--data", action="append", default=[], metavar="K=V")
    send.add_argument("--data-json", metavar="JSON")
    send.add_argument("--socket", help="ingest socket (default: from the config)")
    send.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    send.set_defaults(handler=cmd_send)

    def operator_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
        command.add_argument("--status-socket", help="status socket (default: from the config)")
        command.add_argument("--json", action="store_true", help="one JSON document")
        return command

    status = operator_parser("status", "health, throughput, backlog, latencies, disk use")
    status.set_defaults(handler=cmd_status)
    dlq = operator_parser("dlq", "the dead-letter store: list, retry or drop entries")
    dlq.add_argument("action", choices=["list", "retry", "drop"])
    dlq.add_argument("ids", nargs="*", type=int, metavar="ID")
    dlq.add_argument("--all", action="store_true", help="every entry (retry, drop)")
    dlq.add_argument("--limit", type=int, default=100, help="entries to list")
    dlq.set_defaults(handler=cmd_dlq)
    backup = operator_parser("backup", "a consistent online copy of the database")
    backup.add_argument("dest", help="where to write the copy (must not exist)")
    backup.set_defaults(handler=cmd_backup)

    recover = sub.add_parser("recover", help="salvage readable events from a damaged database")
    recover.add_argument("damaged", help="the moved-aside database file")
    recover.add_argument("--json", action="store_true")
    recover.add_argument("--status-socket", help="status socket (default: from the config)")
    recover.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    recover.set_defaults(handler=cmd_recover)

    migrate = sub.add_parser("migrate", help="apply or roll back schema migrations")
    migrate.add_argument("--to", type=int, metavar="VERSION")
    migrate.add_argument("--status", action="store_true", help="list migrations and exit")
    migrate.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    migrate.set_defaults(handler=cmd_migrate)

    from auditd.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="load generator and storage baseline")
    bench.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
        config = load_config(getattr(args, "config_sub", None) or args.config)
        return handler(args, config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except AuditdError as exc:
        return _fail(str(exc))
    except (TimeoutError, OSError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
