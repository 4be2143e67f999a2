"""`auditd forward status` (the daemon's forwarding figures, through its status socket)
and `auditd forward replay` (read one host's messages back from the stream and check
the copy is complete: forward/replay.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from auditd.cli.operator import EXIT_FAILURE, EXIT_OK, _refusal, call
from auditd.config import Config
from auditd.proofs.checkpointer import host_id_of


def line(forward: dict[str, Any] | None) -> str:
    """The `auditd status` line, and the head of `forward status`."""
    if forward is None:
        return "forwarding:   off (forward.servers is empty)"
    state = "connected" if forward.get("connected") else "NOT connected"
    text = (f"forwarding:   {state}, {forward.get('state')}; stream {forward.get('stream')}, "
            f"cursor {forward.get('cursor')}, lag {forward.get('lag_events')} events "
            f"({forward.get('lag_seconds')} s)")
    if forward.get("fault"):
        text += f"; {forward['fault']}"
    return text


def render(forward: dict[str, Any] | None) -> str:
    if forward is None:
        return line(None)
    errors = forward.get("errors") or {}
    last = forward.get("last_success")
    rows = [line(forward),
            f"published:    {forward.get('published')} new, {forward.get('duplicates')} "
            f"duplicates acked, {forward.get('checkpoints')} checkpoints; "
            f"{forward.get('in_flight')} in flight",
            "errors:       " + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none")
            + f"; reconnects {forward.get('reconnects')}",
            "last success: " + ("never" if last is None else
                                f"{time.time() - last:.1f} s ago")]
    if forward.get("warning"):
        rows.append(f"warning:      {forward['warning']}")
    if forward.get("retention_blocked"):
        rows.append(f"retention:    {forward['retention_blocked']}")
    return "\n".join(rows)


def status(socket_path: str, as_json: bool) -> int:
    code, stats = call(socket_path, "GET", "/stats")
    if code != 200:
        return _refusal(code, stats)
    forward = stats.get("forward")
    print(json.dumps(forward) if as_json else render(forward))
    return EXIT_OK


def replay(args: argparse.Namespace, config: Config) -> int:
    from auditd.forward.replay import ReplayTimeout
    from auditd.forward.replay import replay as read_back

    if not config.forward.servers:
        print("auditd: forward.servers is empty: nothing to read back from", file=sys.stderr)
        return EXIT_FAILURE
    storage = Path(config.storage.path)
    host = args.host or _local_host(storage)
    if host is None:
        print(f"auditd: no store at {storage} to take the host id from: give --host",
              file=sys.stderr)
        return EXIT_FAILURE
    try:
        report = asyncio.run(read_back(config, host, args.from_seq, storage))
    except ReplayTimeout as exc:
        print(f"auditd: forward replay: {exc}: is the stream's cluster without a leader?",
              file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # a connection or stream failure: one line
        print(f"auditd: forward replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    document = report.document()
    if args.json:
        print(json.dumps(document))
    else:
        print(f"{host}: {report.events} events (seqs {args.from_seq}..{report.last_seq}), "
              f"{report.checkpoints} checkpoints; {report.compared} compared with the store; "
              + ("complete" if report.complete else
                 f"INCOMPLETE: gaps {report.gaps[:5]}, repeats {report.repeats[:5]}, "
                 f"mismatches {report.bad[:3]}, store committed {report.local_last}"))
    return EXIT_OK if report.complete else EXIT_FAILURE


def _local_host(storage: Path) -> str | None:
    path = storage / "auditd.db"
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return host_id_of(db)
    finally:
        db.close()
