"""`auditd projections status` and `auditd projections rebuild NAME`, through the
running daemon's status socket (the rebuild is an admin call: it runs inside the
daemon, a chunk per writer transaction, while events keep being committed).

`rebuild` waits until the projection is live again: a progress bar on a TTY, a line
every few seconds otherwise (or nothing, with --no-wait).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from auditd.cli.operator import EXIT_FAILURE, EXIT_OK, _refusal, call

_POLL_S = 0.2
_LINE_EVERY_S = 2.0
_WAIT_MAX_S = 24 * 3600.0


def render(document: dict[str, Any]) -> str:
    rows = document.get("projections", {})
    lines = [f"{'projection':<18} {'version':>7} {'state':<10} {'position':>12} {'lag':>10}"]
    for name, entry in rows.items():
        line = (f"{name:<18} {entry.get('version', '?'):>7} {entry.get('state', '?'):<10} "
                f"{entry.get('position', 0):>12,} {entry.get('lag', 0):>10,}")
        rebuild = entry.get("rebuild")
        if entry.get("state") == "rebuilding" and rebuild:
            line += f"  rebuilding {_percent(rebuild)} through seq {rebuild['through']:,}"
        lines.append(line)
    return "\n".join(lines)


def _percent(rebuild: dict[str, Any]) -> str:
    total = rebuild.get("total") or 0
    return f"{100.0 * rebuild.get('done', 0) / total:.0f}%" if total else "0%"


def status(socket_path: str, as_json: bool) -> int:
    code, document = call(socket_path, "GET", "/projections")
    if code != 200:
        return _refusal(code, document)
    print(json.dumps(document) if as_json else render(document))
    return EXIT_OK


def rebuild(socket_path: str, name: str, as_json: bool, wait: bool) -> int:
    code, document = call(socket_path, "POST", "/projections/rebuild", {"name": name})
    if code != 200:
        return _refusal(code, document)
    started = document.get("result", document)
    if not wait:
        print(json.dumps(document) if as_json else
              f"{name}: rebuilding through seq {started.get('rebuild_through', '?')}")
        return EXIT_OK
    entry = _wait_live(socket_path, name)
    if entry is None:
        print(f"auditd: {name}: still rebuilding after {_WAIT_MAX_S:.0f} s", file=sys.stderr)
        return EXIT_FAILURE
    progress = entry.get("rebuild") or {}
    if as_json:
        print(json.dumps({"name": name, **entry}))
    else:
        print(f"{name}: rebuilt, {progress.get('done', 0):,} seqs in "
              f"{_seconds(progress):.1f} s; live at seq {entry.get('position', 0):,}")
    return EXIT_OK


def _wait_live(socket_path: str, name: str) -> dict[str, Any] | None:
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + _WAIT_MAX_S
    last_line = 0.0
    while time.monotonic() < deadline:
        code, document = call(socket_path, "GET", "/projections")
        entry = document.get("projections", {}).get(name, {}) if code == 200 else {}
        progress = entry.get("rebuild") or {}
        if entry.get("state") == "live" and progress.get("finished_at"):
            if tty:
                print(file=sys.stderr)
            return dict(entry)
        done, total = progress.get("done", 0), progress.get("total", 0)
        if tty:
            filled = int(30 * done / total) if total else 0
            print(f"\r{name} [{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,} seqs",
                  end="", file=sys.stderr, flush=True)
        elif time.monotonic() - last_line >= _LINE_EVERY_S:
            last_line = time.monotonic()
            print(f"{name}: rebuilding, {done:,} of {total:,} seqs", file=sys.stderr)
        time.sleep(_POLL_S)
    return None


def _seconds(progress: dict[str, Any]) -> float:
    finished, started = progress.get("finished_at"), progress.get("started_at")
    return float(finished - started) if finished and started else 0.0
