"""`auditd export` and `auditd import` (proofs.md, "Export files"; docs/design/
export.md).

export reads the database file in one read-only snapshot, the daemon running or not;
a running daemon is first asked for a fresh checkpoint (`POST /checkpoint`, admin), so
the file reaches up to what is committed now; without one (stopped, or the caller is
not an admin) the newest stored checkpoint bounds the file, and the summary says how
many newer events it leaves out. import needs the running daemon. Progress goes to
stderr on a TTY; the one-line summary to stderr always (stdout may be the export).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from auditd.cli.parser import UsageError
from auditd.config import Config
from auditd.lifecycle.export import export_store, filters_of
from auditd.lifecycle.files import Output
from auditd.query.spec import BadQuery, QuerySpec, parse_query

EXIT_OK, EXIT_FAILURE = 0, 1
# option dest -> the filter's name (GET /events parameters; the manifest's keys)
_FILTERS = {"type": "type", "actor": "actor", "target": "target", "stream": "stream",
            "correlation": "correlation_id", "causation": "causation_id", "uid": "uid",
            "comm": "comm", "tag": "tag", "grep": "q"}


def _spec(args: argparse.Namespace) -> tuple[QuerySpec | None, list[tuple[str, str]]]:
    pairs = [(name, str(value)) for dest, name in _FILTERS.items()
             for value in getattr(args, dest)]
    pairs += [(name, getattr(args, name)) for name in ("since", "until")
              if getattr(args, name) is not None]
    if not pairs:
        return None, []
    try:
        return parse_query(pairs), pairs
    except BadQuery as exc:
        raise UsageError(f"--{exc}") from None


def _fresh_checkpoint(status_socket: str) -> str:
    """Ask the running daemon for a checkpoint; a sentence saying what happened."""
    from auditd.cli import operator

    try:
        status, document = operator.call(status_socket, "POST", "/checkpoint", {})
    except operator.StatusUnreachable:
        return "no daemon answers: the newest stored checkpoint bounds the export"
    except operator.StatusReplyError as exc:
        return f"{exc}; the newest stored checkpoint bounds the export"
    if status == 200:
        return f"the daemon signed a checkpoint of size {document.get('size')}"
    return (f"the daemon did not sign a checkpoint ({document.get('message') or status}): "
            "the newest stored checkpoint bounds the export")


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    spec, pairs = _spec(args)
    if args.output and args.output != "-" and Path(args.output).is_dir():
        raise UsageError(f"-o {args.output}: is a directory; name the file to write")
    said = _fresh_checkpoint(str(args.status_socket or config.status.socket))
    output = Output(args.output)
    try:
        result = export_store(Path(config.storage.path), output, fmt=args.format, spec=spec,
                              filters=filters_of(spec, pairs) if spec else {},
                              until_seq=args.until_seq)
    except BaseException:
        output.abandon()
        raise
    m = result.manifest
    size = int(m.checkpoint.split("\n")[1])
    start = 1 if m.prefix is None else m.prefix.size + 1
    alone = m.complete and m.first_seq == start and m.last_seq == size
    doc: dict[str, Any] = {
        "file": args.output or "-", "format": args.format, "host": m.host,
        "first_seq": m.first_seq, "last_seq": m.last_seq, "count": m.count,
        "filters": m.filters, "bytes": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "events_per_s": round(m.count / result.seconds) if result.seconds > 0 else None,
        "not_exported_newer": result.newer_than_checkpoint, "checkpoint_note": said,
        "checkpoint_size": size, "verifiable_alone": alone}
    if args.json:
        print(json.dumps(doc), file=sys.stderr if not args.output else sys.stdout)
    else:
        newer = (f"; {result.newer_than_checkpoint:,} newer events are past the checkpoint"
                 if result.newer_than_checkpoint else "")
        checkable = ("its records rebuild the checkpoint's root" if alone else
                     f"not checkable against the checkpoint of size {size:,} on its own")
        print(f"exported {m.count:,} records (seqs {m.first_seq}..{m.last_seq} of host "
              f"{m.host}) to {args.output or 'stdout'}: {result.bytes_written:,} bytes in "
              f"{result.seconds:.2f} s; {checkable} ({said}{newer})", file=sys.stderr)
    return EXIT_OK


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    from auditd.cli.proofs import read_vkey
    from auditd.lifecycle.importer import import_file
    from auditd.lifecycle.manifest import ManifestError
    from auditd.lifecycle.reader import check_file
    from auditd.proofs.notes import NoteError

    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    vkey = read_vkey(args.vkey) if args.vkey else None
    try:
        check = check_file(args.file, vkey)
    except ManifestError as exc:
        print(f"auditd: import refused, {args.file} does not match its manifest: {exc}",
              file=sys.stderr)
        return EXIT_FAILURE
    except NoteError as exc:
        print(f"auditd: import refused, {args.file}: --vkey: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.check_only:
        m = check.manifest
        print(f"{args.file} matches its manifest: {check.events:,} events and "
              f"{check.dead_letters:,} dead letters, seqs {m.first_seq}..{m.last_seq} of "
              f"host {m.host}" + "".join(f"; {note}" for note in check.notes)
              + ("; signature checked" if check.signature_checked else ""))
        return EXIT_OK
    report = import_file(args.file, check, args.socket or config.ingest.socket,
                         str(args.status_socket or config.status.socket),
                         max_frame_bytes=config.size("ingest", "max_frame_bytes"),
                         max_batch=config.ingest.max_batch_events)
    doc = report.document(check)
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"imported {report.new:,} new events, {report.duplicates:,} duplicates, "
              f"{report.refused:,} refused, {report.dead_letters:,} dead letters skipped "
              f"(from host {check.manifest.host}, {report.seconds:.2f} s)"
              + "".join(f"; {note}" for note in check.notes))
        for refusal in report.refusals:
            print(f"refused: {refusal}")
    return EXIT_FAILURE if report.refused else EXIT_OK
