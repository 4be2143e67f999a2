"""`auditd query`: filtered events from the running daemon, newest last.

Filters map onto GET /events parameters (a repeated option ORs, different options
AND); `--since`/`--until` take RFC 3339, unix seconds or a duration before now and are
checked here, so a typo is a usage error before anything is sent. Output: a table on a
TTY, JSON lines otherwise (or as `--json`/`--jsonl` say). `--correlation ID --tree`
draws the causal tree of one operation from GET /correlations/{id}.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from auditd.cli.parser import UsageError
from auditd.query.spec import MAX_LIMIT, BadQuery, parse_time

EXIT_OK, EXIT_FAILURE = 0, 1
Call = Callable[[str, str, str], tuple[int, dict[str, Any]]]
# option dest -> GET /events parameter
_REPEATED = {"type": "type", "actor": "actor", "target": "target", "stream": "stream",
             "correlation": "correlation_id", "causation": "causation_id", "uid": "uid",
             "comm": "comm", "origin_host": "origin_host"}


def add_query_arguments(query: argparse.ArgumentParser) -> None:
    add = query.add_argument
    for dest, helped in (("type", "event type, e.g. user.login"), ("actor", "actor"),
                         ("target", "target, e.g. /srv/app"), ("stream", "stream name"),
                         ("correlation", "correlation id"), ("causation", "causation id"),
                         ("uid", "uid of the writing process"),
                         ("comm", "command name of the writing process"),
                         ("origin_host", "origin host (imported events, `auditd import`)")):
        add(f"--{dest.replace('_', '-')}", action="append", default=[], metavar="VALUE",
            help=f"only events with this {helped}; repeat to OR several")
    add("--tag", action="append", default=[], metavar="K=V",
        help="only events with tag K=V; repeat: values of one key OR, keys AND")
    add("--grep", action="append", default=[], metavar="WORDS",
        help="only events whose text (type, actor, target, tag values, strings in data) "
             "has every word, whole and case-insensitive; `word*` matches a prefix")
    add("--since", metavar="WHEN",
        help="events at or after WHEN (event time): RFC 3339 / ISO-8601, unix seconds, or "
             "a duration before now such as 30m, 1h, 7d")
    add("--until", metavar="WHEN", help="events before WHEN (same forms as --since)")
    add("--after", type=int, metavar="SEQ",
        help="events after this seq, oldest first (a cursor; default: the newest events)")
    add("--limit", type=_limit, default=100, metavar="N",
        help=f"at most N events (default 100, at most {MAX_LIMIT})")
    add("--tree", action="store_true",
        help="with one --correlation: draw the operation's causal tree")
    add("--status-socket", metavar="PATH",
        help="the daemon's status socket (default: status.socket from the config)")
    out = query.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print one JSON document {\"events\": [...], \"next\": ...}")
    out.add_argument("--jsonl", action="store_true",
                     help="print one event a line as JSON (the default when not a TTY)")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{value}: expected 1 to {MAX_LIMIT}")
    return value


def _seconds(name: str, text: str) -> str:
    try:
        ns = parse_time(name, text)
    except BadQuery as exc:
        raise UsageError(f"--{exc}") from None
    return f"{ns // 10**9}.{ns % 10**9:09d}"


def query_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = [(parameter, str(value)) for dest, parameter in _REPEATED.items()
             for value in getattr(args, dest)]
    for tag in args.tag:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {tag!r}: expected K=V")
        pairs.append((f"tag.{key}", value))
    pairs += [("q", words) for words in args.grep]
    if args.since is not None:
        pairs.append(("since", _seconds("since", args.since)))
    if args.until is not None:
        pairs.append(("until", _seconds("until", args.until)))
    pairs.append(("limit", str(args.limit)))
    if args.after is not None:
        pairs += [("after", str(args.after)), ("order", "asc")]
    else:
        pairs.append(("order", "desc"))  # the newest N, shown newest last
    return pairs


def run(args: argparse.Namespace, socket_path: str, call: Call) -> int:
    if args.tree:
        if len(args.correlation) != 1:
            raise UsageError("--tree needs exactly one --correlation ID")
        path = "/correlations/" + urllib.parse.quote(args.correlation[0], safe="")
    else:
        path = "/events?" + urllib.parse.urlencode(query_pairs(args))
    status, document = call(socket_path, "GET", path)
    if status != 200:
        print(f"auditd: {document.get('message') or document.get('error') or status}",
              file=sys.stderr)
        return EXIT_FAILURE
    events: list[dict[str, Any]] = document.get("events", [])
    if not args.tree and args.after is None:
        events.reverse()
    if args.json:
        print(json.dumps({**document, "events": events}, ensure_ascii=False))
    elif args.tree and not args.jsonl:  # asked for by name: drawn on a TTY or not
        print("\n".join(tree_lines(events)))
    elif args.jsonl or not sys.stdout.isatty():
        for event in events:
            print(json.dumps(event, ensure_ascii=False))
    else:
        print("\n".join(table_lines(events)))
    return EXIT_OK


_COLUMNS = ("time", "seq", "type", "actor", "target", "uid", "comm")


def table_lines(events: list[dict[str, Any]]) -> list[str]:
    """Aligned columns, one event a line; long cells cut with an ellipsis."""
    rows = [[str(e["ts"])[:23].replace("T", " "), str(e["seq"]), e["type"], e["actor"] or "",
             e["target"] or "", str(e["uid"]), e["comm"]] for e in events]
    rows = [[cell if len(cell) <= 40 else cell[:39] + "…" for cell in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in
              enumerate(_COLUMNS)]
    lines = ["  ".join(name.upper().ljust(w) for name, w in zip(_COLUMNS, widths,
                                                                  strict=True)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    if not rows:
        lines.append("(no events)")
    return lines


def tree_lines(events: list[dict[str, Any]]) -> list[str]:
    """The causal tree: each event under the one its causation_id names; an event whose
    cause is not in the correlation is a root."""
    by_id = {e["id"]: e for e in events}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for event in events:
        cause = event.get("causation_id")
        children.setdefault(cause if cause in by_id else None, []).append(event)
    lines: list[str] = []

    def label(event: dict[str, Any]) -> str:
        who = f" by {event['actor']}" if event.get("actor") else ""
        what = f" on {event['target']}" if event.get("target") else ""
        return f"{event['type']}{who}{what}  (seq {event['seq']}, {event['ts']})"

    def walk(event: dict[str, Any], prefix: str, last: bool, seen: set[str]) -> None:
        lines.append(prefix + ("└─ " if last else "├─ ") + label(event))
        seen.add(event["id"])
        kids = [k for k in children.get(event["id"], []) if k["id"] not in seen]
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("   " if last else "│  "), i == len(kids) - 1, seen)

    roots = children.get(None, [])
    seen: set[str] = set()
    for i, root in enumerate(roots):
        walk(root, "", i == len(roots) - 1, seen)
    if not events:
        lines.append("(no events)")
    return lines
