"""The `auditd` argument parser: every subcommand, option and positional with its help.

Each help line says what the option does, its default where it has one and the form
it expects. `--config` is accepted before the subcommand and after it; the one after
wins (main reads `config_sub` first). Usage errors exit 2 with one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import NoReturn

from auditd.cli.argtypes import positive
from auditd.cli.lifecycle_args import add_export_arguments, add_import_arguments
from auditd.errors import AuditdError
from auditd.store.migrations import LATEST

EXIT_USAGE = 2


class UsageError(AuditdError):
    """The command line asks for something that cannot be done as written (exit 2)."""

_CONFIG_HELP = ("config file (TOML); default: $AUDITD_CONFIG, else /etc/auditd/auditd.toml, "
                "else built-in defaults")
_CONFIG_SUB_HELP = ("config file (TOML), as `auditd --config F`; given both before and "
                    "after the subcommand, this one wins")


class Parser(argparse.ArgumentParser):
    """argparse with the project's usage error: one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed package's version, from its metadata."""
    try:
        return metadata.version("auditd")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def command_named(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first positional, past --config FILE), if any."""
    tokens = iter(argv)
    for token in tokens:
        if len(token) > 2 and "--config".startswith(token):  # argparse takes "--conf" too
            next(tokens, None)
        elif not token.startswith("-"):
            return token
    return None


def build_parser(command_wanted: str | None = None) -> Parser:
    """The whole command line. With `command_wanted` (what `command_named` found), the
    bench's options are added only when it is bench: they import every benchmark, a
    tenth of a second that every other start of `auditd` (the daemon's too) would pay."""
    parser = Parser(prog="auditd", description="Local audit-event daemon.")
    parser.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"auditd {version()}",
                        help="print the installed auditd version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        made = sub.add_parser(name, help=help_text, description=help_text)
        made.add_argument("--config", dest="config_sub", metavar="FILE", help=_CONFIG_SUB_HELP)
        return made

    command("run", "run the daemon in the foreground (what systemd starts)")
    _send(command("send", "write one event from a shell, like logger; prints the reply; "
                          "exit 0 when stored (a duplicate too), 1 when refused"))
    _operator(command("status", "health, throughput, backlog, latencies, disk use, dead "
                                "letters; exit 1 unless healthy"))
    _dlq(_operator(command("dlq", "the dead-letter store: list, retry or drop entries")))
    from auditd.cli.counts import add_count_arguments
    from auditd.cli.query import add_query_arguments

    query = command("query", "filtered events from the running daemon, newest last; repeat "
                             "a filter to OR it; --count-by: counts per bucket instead")
    add_query_arguments(query)
    add_count_arguments(query)
    backup = _operator(command("backup", "a consistent online copy of the database, "
                                         "written by the running daemon"))
    backup.add_argument("dest", metavar="DEST",
                        help="path of the copy, relative to the current directory; it must "
                             "not exist (a backup never overwrites) and its directory must")
    backup.add_argument("--verify", action="store_true",
                        help="then verify the copy as `auditd verify` would (exit 1 when it "
                             "does not) and print the checkpoint root it holds")
    _vkey_option(backup)
    restore = command("restore", "put a verified backup in place of the store, daemon "
                                 "stopped; the replaced files are kept aside")
    restore.add_argument("source", metavar="SRC",
                         help="the backup's database file (`auditd backup DEST`), its "
                              "partitions/ beside it")
    _vkey_option(restore)
    restore.add_argument("--checkpoint", metavar="FILE",
                         help="a checkpoint seen earlier (as GET /checkpoint serves it): a "
                              "backup older than it is refused, one as new must hold it")
    restore.add_argument("--force", action="store_true",
                         help="restore a backup older than --checkpoint anyway")
    restore.add_argument("--json", action="store_true",
                         help="print one JSON document instead of readable lines")
    vacuum = _operator(command("vacuum", "apply retention now: the oldest partitions (and "
                                         "archive files) past max_age or over max_bytes "
                                         "go; waits until done"))
    vacuum.add_argument("--dry-run", action="store_true",
                        help="say what would be deleted, delete nothing")
    _recover(command("recover", "copy every readable event and dead letter of a damaged "
                                "database into the live store (idempotent)"))
    from auditd.cli.tail import add_arguments as add_tail_arguments

    add_tail_arguments(command("tail", "the last N events (default 10); with -f, each new "
                                       "one as it is committed, across daemon restarts"))
    _migrate(command("migrate", "apply or roll back schema migrations (daemon stopped; a "
                                "backup is taken first)"))

    _projections(_operator(command(
        "projections", "read models (counts, actor summaries): position and lag, or "
                       "rebuild one from the events, through the running daemon")))

    _forward(_operator(command(
        "forward", "forwarding to NATS JetStream: the daemon's cursor, lag and errors, or "
                   "a read-back of the stream that checks the copy is complete")))
    _proofs(command)
    add_export_arguments(command("export", "events out of the store with a manifest and a "
                                           "signed checkpoint (proofs.md): JSON lines or "
                                           "the records E, zstd for a .zst FILE"))
    add_import_arguments(command("import", "an export's events into the running daemon: "
                                           "checked against its manifest first, new seqs "
                                           "here, idempotent by id"))

    bench = command("bench", "load generator, storage baseline and replay timing; prints "
                             "events/s, latencies, peak RSS")
    if command_wanted in (None, "bench"):
        from auditd.bench import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
    return parser


def _proofs(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    verify = command("verify", "check the database, every record against its Merkle leaf "
                               "and the tree against its signed checkpoints; exit 1 names "
                               "the first bad seq, 2 when it cannot verify")
    verify.add_argument("--state", metavar="FILE",
                        help="remember the newest verified checkpoint, its compact range "
                             "and the key here, and check the store is consistent with the "
                             "one remembered; the next run reads only the newer seqs")
    verify.add_argument("--full", action="store_true",
                        help="with --state: read every seq again, not only those after "
                             "the remembered checkpoint")
    verify.add_argument("--checkpoint", metavar="FILE",
                        help="a checkpoint (as GET /checkpoint serves it) the store must "
                             "be consistent with")
    verify.add_argument("--vkey", metavar="KEY",
                        help="the verifier key (text or file; default: --state's, else "
                             "the store's own key)")
    verify.add_argument("--workers", type=positive, metavar="N",
                        help="worker processes (default: one per CPU)")
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    prove = command("prove", "an inclusion proof of SEQ, or a consistency proof between "
                             "two checkpoint sizes (proofs.md), read from the database")
    prove.add_argument("seq", metavar="SEQ", type=positive, nargs="?",
                       help="the event's seq")
    prove.add_argument("--size", type=positive, metavar="N",
                       help="a stored checkpoint's size (default: the newest)")
    prove.add_argument("--consistency", type=positive, nargs=2, metavar=("OLD", "NEW"),
                       help="prove checkpoint size OLD a prefix of size NEW")
    prove.add_argument("--json", action="store_true", help="compact JSON on one line")
    check = command("verify-proof", "check a saved proof offline: no daemon, no database")
    check.add_argument("file", metavar="FILE", help="the proof (JSON), - for stdin")
    check.add_argument("--vkey", metavar="KEY", required=True,
                       help="the verifier key: its text, or a file that holds it")
    command("keygen", "make the checkpoint signing key, or rotate it (the old one is kept "
                      "beside it)")
    command("export-vkey", "print the verifier key of the store's checkpoint key")


def _send(send: argparse.ArgumentParser) -> None:
    add = send.add_argument
    add("type", metavar="TYPE", help="the event's type, e.g. user.login (required)")
    add("--actor", metavar="NAME", help="who did it, e.g. alice (default: none)")
    add("--target", metavar="WHAT", help="what it was done to, e.g. /srv/app (default: none)")
    add("--stream", metavar="NAME",
        help="the stream the event belongs to; the daemon gives it the stream's next "
             "version (default: none)")
    add("--id", metavar="ID",
        help="idempotency id: an id already stored is answered as a duplicate with its "
             "first seq (default: a new UUIDv7)")
    add("--correlation", metavar="ID",
        help="correlation_id shared by the events of one operation (default: none)")
    add("--tag", action="append", default=[], metavar="K=V",
        help="a tag as key=value, e.g. --tag outcome=ok; repeat for more (at most 32)")
    add("--data", action="append", default=[], metavar="K=V",
        help="a data field as key=value (the value is a string); repeat for more")
    add("--data-json", metavar="JSON",
        help="data as a JSON object, e.g. '{\"n\": 1}'; merged over the --data fields")
    add("--socket", metavar="PATH",
        help="the daemon's ingest socket (default: ingest.socket from the config)")


def _vkey_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--vkey", metavar="KEY",
                         help="the verifier key to check with (its text or a file); "
                              "default: the store's own key")


def _operator(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command.add_argument("--status-socket", metavar="PATH",
                         help="the daemon's status socket (default: status.socket from "
                              "the config)")
    command.add_argument("--json", action="store_true",
                         help="print one JSON document instead of readable lines")
    return command


def _dlq(dlq: argparse.ArgumentParser) -> None:
    dlq.add_argument("action", choices=["list", "retry", "drop"],
                     help="list: show entries, oldest first; retry: commit entries again "
                          "(accepted events keep their seq); drop: delete entries")
    dlq.add_argument("ids", nargs="*", type=int, metavar="ID",
                     help="dead-letter ids (the first column of `dlq list`); retry and drop "
                          "take ids or --all, not both")
    dlq.add_argument("--all", action="store_true",
                     help="every entry (retry and drop only; not together with ids)")
    dlq.add_argument("--limit", type=positive, default=100, metavar="N",
                     help="at most N entries to list (default 100)")


def _recover(recover: argparse.ArgumentParser) -> None:
    recover.add_argument("damaged", metavar="OLD.db",
                         help="the damaged database the daemon moved aside, e.g. "
                              "/var/lib/auditd/auditd.db.damaged-20261122T101500")
    recover.add_argument("--status-socket", metavar="PATH",
                         help="recover through the running daemon on this status socket "
                              "(default: status.socket from the config; copied offline "
                              "when no daemon runs)")
    recover.add_argument("--json", action="store_true",
                         help="print one JSON document instead of a sentence")


def _migrate(migrate: argparse.ArgumentParser) -> None:
    migrate.add_argument("--to", type=int, metavar="VERSION",
                         help=f"schema version to end at, 0..{LATEST}; lower than the "
                              f"current one rolls back (default: {LATEST}, the newest)")
    migrate.add_argument("--status", action="store_true",
                         help="list the migrations, applied or pending, and change nothing")
    migrate.add_argument("--yes-delete-events", action="store_true",
                         help="allow a roll-back that deletes stored events and dead "
                              "letters (e.g. --to 0); refused without it")


def _projections(projections: argparse.ArgumentParser) -> None:
    from auditd.projections.definitions import PROJECTIONS

    projections.add_argument("action", choices=["status", "rebuild"],
                             help="status: each projection's state, position and lag; "
                                  "rebuild: drop NAME's rows and count them again from the "
                                  "events (admin; waits, with progress)")
    projections.add_argument("name", nargs="?", metavar="NAME",
                             choices=[p.name for p in PROJECTIONS],
                             help="the projection to rebuild: "
                                  + ", ".join(p.name for p in PROJECTIONS))
    projections.add_argument("--no-wait", action="store_true",
                             help="rebuild: return once the rebuild has begun")


def _forward(forward: argparse.ArgumentParser) -> None:
    forward.add_argument("action", choices=["status", "replay"],
                         help="status: cursor, lag, errors of the running daemon's "
                              "forwarder; replay: read this host's messages back from the "
                              "stream and check every seq is there once, in order")
    forward.add_argument("--from-seq", type=int, default=1, metavar="N",
                         help="replay: check seqs from N on (default 1)")
    forward.add_argument("--host", metavar="HOST",
                         help="replay: the host id whose messages to check (default: the "
                              "local store's)")
