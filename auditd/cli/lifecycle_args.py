"""The options of `auditd export` and `auditd import` (run by auditd.cli.lifecycle)."""

from __future__ import annotations

import argparse

from auditd.cli.argtypes import positive
from auditd.lifecycle.manifest import FORMATS


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    add = export.add_argument
    for dest, helped in (("type", "event type"), ("actor", "actor"), ("target", "target"),
                         ("stream", "stream name"), ("correlation", "correlation id"),
                         ("causation", "causation id"), ("uid", "uid of the writer"),
                         ("comm", "command name of the writer")):
        add(f"--{dest}", action="append", default=[], metavar="VALUE",
            help=f"only events with this {helped}; repeat to OR several")
    add("--tag", action="append", default=[], metavar="K=V",
        help="only events with tag K=V; repeat: values of one key OR, keys AND")
    add("--grep", action="append", default=[], metavar="WORDS",
        help="only events whose text has every word (as `auditd query --grep`)")
    add("--since", metavar="WHEN", help="events at or after WHEN (event time): RFC 3339, "
                                        "unix seconds, or a duration before now (7d)")
    add("--until", metavar="WHEN", help="events before WHEN (same forms as --since)")
    add("--format", choices=FORMATS, default="jsonl",
        help="jsonl (default): the manifest, then one event a line as the status API "
             "shows it; msgpack: the manifest, then each seq's record E byte for byte "
             "(verifiable against the checkpoint with no database)")
    add("-o", "--output", metavar="FILE",
        help="write here (zstd-compressed when FILE ends in .zst; written whole or not "
             "at all); default: stdout")
    add("--until-seq", type=positive, metavar="N",
        help="end the range at seq N (default: the newest checkpoint's size)")
    add("--status-socket", metavar="PATH",
        help="the running daemon's status socket, asked for a fresh checkpoint first "
             "(default: status.socket from the config; skipped when none answers)")
    add("--json", action="store_true",
        help="print the summary as one JSON document (on stdout; on stderr when the "
             "export itself goes to stdout)")


def add_import_arguments(imported: argparse.ArgumentParser) -> None:
    add = imported.add_argument
    add("file", metavar="FILE", help="an export file (either format, .zst or not)")
    add("--vkey", metavar="KEY",
        help="the exporting store's verifier key (`auditd export-vkey` there: its text or "
             "a file holding it): the manifest's checkpoint must carry its signature")
    add("--check-only", action="store_true",
        help="check the file against its manifest (and --vkey) and import nothing")
    add("--socket", metavar="PATH",
        help="the daemon's ingest socket (default: ingest.socket from the config)")
    add("--status-socket", metavar="PATH",
        help="the daemon's status socket (default: status.socket from the config)")
    add("--json", action="store_true", help="print the summary as one JSON document")
