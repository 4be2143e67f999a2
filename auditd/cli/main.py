"""The `auditd` command: subcommands, exit codes 0 (ok), 1 (operational failure), 2 (usage).

The parser is `parser.py`; commands on the database file are `storage.py`; those that
talk to a running daemon's status socket are `operator.py`. Every failure leaves as
one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from auditd.cli.parser import UsageError, build_parser, command_named
from auditd.config import Config, load_config
from auditd.errors import AuditdError, ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace, Config], int]


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"auditd: {message}", file=sys.stderr)
    return code


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {pair!r}: expected key=value")
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


def _event(args: argparse.Namespace) -> dict[str, Any]:
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
            extra = json.loads(args.data_json)
        except ValueError as exc:
            raise UsageError(f"--data-json: not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise UsageError("--data-json: expected a JSON object like "
                                      f"'{{\"n\": 1}}', got {type(extra).__name__}")
        data.update(extra)
    if data:
        event["data"] = data
    return event


def cmd_send(args: argparse.Namespace, config: Config) -> int:
    """Exit 0 when the event is stored, now or before (a duplicate); 1 when refused."""
    from auditd.client import Client

    event = _event(args)
    socket_path = args.socket or config.ingest.socket
    with Client(socket_path, raise_on_reject=False) as client:
        reply = client.send(event)
    print(json.dumps(msgspec.to_builtins(reply)))
    stored = reply.ok == 1 or bool(reply.duplicates)
    return EXIT_OK if stored and not reply.rejected and reply.error is None else EXIT_FAILURE


def _status_socket(args: argparse.Namespace, config: Config) -> str:
    return str(args.status_socket or config.status.socket)


# The operator and storage commands import aiohttp or SQLite modules: only when run.

def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    return operator.status(_status_socket(args, config), args.json)


def cmd_dlq(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    return operator.dlq(_status_socket(args, config), args.action, args.ids, args.all,
                        args.json, args.limit)


def cmd_query(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import counts, operator
    from auditd.cli import query as query_command

    if not args.count_by:
        return query_command.run(args, _status_socket(args, config), operator.call)
    others = [f"--{name}" for name in ("target", "stream", "correlation", "causation",
                                       "tag", "grep") if getattr(args, name)]
    others += [f"--{name}" for name in ("after", "tree") if getattr(args, name)]
    others += ["--origin-host"] if args.origin_host else []
    if others:
        raise UsageError(f"--count-by counts from the projections: {', '.join(others)} "
                         "cannot narrow it (--type, --actor, --comm, --uid, --since, "
                         "--until can)")
    filters = [(name, str(value)) for name in ("type", "actor", "comm", "uid")
               for value in getattr(args, name)]
    params = counts.count_params(args.count_by, args.interval, filters, args.since,
                                 args.until)
    return counts.run_counts(_status_socket(args, config), params, args.json)


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    code = operator.backup(_status_socket(args, config), args.dest, args.json)
    if code != 0 or not args.verify:
        return code
    from auditd.cli.restore import verify_backup

    return verify_backup(args.dest, args, config)


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli.restore import cmd_restore as restore

    return restore(args, config)


def cmd_vacuum(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import operator

    return operator.vacuum(_status_socket(args, config), args.dry_run, args.json)


def cmd_tail(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import tail

    return tail.run(args, _status_socket(args, config))


def cmd_recover(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import storage

    return storage.cmd_recover(args, config)


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import storage

    return storage.cmd_migrate(args, config)


def cmd_projections(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import projections

    if args.action == "status":
        if args.name:
            raise UsageError("projections status takes no NAME")
        return projections.status(_status_socket(args, config), args.json)
    if not args.name:
        raise UsageError("projections rebuild: name the projection to rebuild")
    return projections.rebuild(_status_socket(args, config), args.name, args.json,
                               not args.no_wait)


def cmd_forward(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import forward

    if args.action == "status":
        return forward.status(_status_socket(args, config), args.json)
    return forward.replay(args, config)


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import lifecycle

    return lifecycle.cmd_export(args, config)


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli import lifecycle

    return lifecycle.cmd_import(args, config)


def cmd_bench(args: argparse.Namespace, config: Config) -> int:
    from auditd.bench import main as bench_main

    return bench_main(args, config)


def _proofs_command(name: str) -> Command:
    def run(args: argparse.Namespace, config: Config) -> int:
        from auditd.cli import proofs

        function: Command = getattr(proofs, f"cmd_{name}")
        return function(args, config)
    return run


COMMANDS: dict[str, Command] = {
    "verify": _proofs_command("verify"), "prove": _proofs_command("prove"),
    "verify-proof": _proofs_command("verify_proof"), "keygen": _proofs_command("keygen"),
    "export-vkey": _proofs_command("export_vkey"),
    "run": cmd_run, "send": cmd_send, "status": cmd_status, "dlq": cmd_dlq,
    "query": cmd_query,
    "backup": cmd_backup, "vacuum": cmd_vacuum, "restore": cmd_restore,
    "recover": cmd_recover, "migrate": cmd_migrate,
    "bench": cmd_bench, "projections": cmd_projections, "tail": cmd_tail,
    "export": cmd_export, "import": cmd_import, "forward": cmd_forward,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_named(argv)).parse_args(argv)
    try:
        # --config after the subcommand wins over one before it.
        config = load_config(args.config_sub or args.config)
        return COMMANDS[args.command](args, config)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
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
