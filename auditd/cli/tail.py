"""`auditd tail [-n N] [-f] [filters]`: the last events, and with -f each new one.

It reads GET /tail on the status socket. Following, it never gives up: when the
stream ends (the daemon stopping or restarting, a cut for reading too slowly, a lost
connection) it reconnects with backoff and asks for the events after the last seq it
has, so nothing is missed and nothing printed twice. Ctrl-C ends it (exit 0).

Output: a readable line per event, or `--jsonl` (the daemon's lines as they come) or,
without -f, `--json` (one document).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO
from urllib.parse import urlencode

from auditd.cli.argtypes import at_least
from auditd.cli.parser import UsageError
from auditd.errors import AuditdError

_count = at_least(0)  # -n, --after: zero is allowed

EXIT_OK, EXIT_FAILURE = 0, 1
_BACKOFF_FIRST_S, _BACKOFF_MOST_S = 0.1, 5.0
# Heartbeats come every 10 s while nothing matches: this long without a byte means the
# connection is dead even if no error said so.
_SILENCE_S = 35.0
# (flag, /tail parameter, help)
_FILTERS = (
    ("--type", "type", "only events of this type, e.g. user.login"),
    ("--actor", "actor", "only events by this actor"),
    ("--target", "target", "only events on this target"),
    ("--stream", "stream", "only events of this stream"),
    ("--correlation", "correlation_id", "only events with this correlation_id"),
    ("--causation", "causation_id", "only events with this causation_id"),
    ("--uid", "uid", "only events written by this uid (others' need a reader or admin)"),
    ("--comm", "comm", "only events written by this command name"),
    ("--tag", "tag", "only events with this tag, as KEY=VALUE"),
)
_GREP_HELP = ("only events whose text (type, actor, target, tags, strings in data) has all "
              "these words; a trailing * matches a prefix; repeat to add words")


def add_arguments(tail: argparse.ArgumentParser) -> None:
    add = tail.add_argument
    add("-n", "--lines", type=_count, metavar="N",
        help="start with the last N matching events (default 10; 0 for none)")
    add("--after", type=_count, metavar="SEQ",
        help="start with the events after this seq instead of the last N (to go on "
             "from a saved seq)")
    add("-f", "--follow", action="store_true",
        help="keep printing new events as they are committed; reconnects by itself "
             "after a daemon restart")
    for flag, _, text in _FILTERS:
        add(flag, action="append", default=[], metavar="VALUE",
            help=f"{text}; repeat to OR")
    add("--grep", action="append", default=[], metavar="WORDS", help=_GREP_HELP)
    add("--since", metavar="TIME",
        help="only events whose time is at or after this: 1h, 30m, unix seconds or "
             "RFC 3339")
    add("--until", metavar="TIME", help="only events whose time is before this (as --since)")
    add("--json", action="store_true",
        help="print one JSON document {\"events\": [...], \"last_seq\": N} (not with -f)")
    add("--jsonl", action="store_true",
        help="print each event as one JSON line, as the daemon sends it")
    add("--status-socket", metavar="PATH",
        help="the daemon's status socket (default: status.socket from the config)")


def parameters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The filters as /tail's query parameters."""
    found = [(name, value) for flag, name, _ in _FILTERS
             for value in getattr(args, flag[2:])]
    found += [("q", words) for words in args.grep]
    found += [(name, getattr(args, name)) for name in ("since", "until")
              if getattr(args, name) is not None]
    return found


def run(args: argparse.Namespace, socket_path: str) -> int:
    if args.json and args.jsonl:
        raise UsageError("--json and --jsonl: give one")
    if args.json and args.follow:
        raise UsageError("--json prints one document, which a follow never finishes: "
                         "use --jsonl with -f")
    if args.after is not None and args.lines is not None:
        raise UsageError("-n and --after: give one")
    tail = Tail(socket_path, parameters(args), args, sys.stdout)
    try:
        return asyncio.run(tail.run())
    except KeyboardInterrupt:
        return EXIT_OK


class TailFailed(AuditdError):
    """The daemon refused the request (a bad filter, a forbidden one) or is unreachable."""


class _Unavailable(Exception):
    """The daemon answered 503 (stopping, or at its most followers)."""


class Tail:
    def __init__(self, socket_path: str, filters: list[tuple[str, str]],
                 args: argparse.Namespace, out: TextIO) -> None:
        self.socket_path = socket_path
        self.filters = filters
        self.follow: bool = args.follow
        self.mode = "json" if args.json else "jsonl" if args.jsonl else "text"
        self.after: int | None = args.after
        self.lines: int | None = args.lines
        self.out = out
        self.events: list[dict[str, Any]] = []  # --json only
        self.last_seq: int | None = args.after

    def _query(self) -> str:
        params = list(self.filters)
        if self.last_seq is not None:
            params.append(("after", str(self.last_seq)))
        else:
            params.append(("n", str(10 if self.lines is None else self.lines)))
        if self.follow:
            params.append(("follow", "1"))
        return "/tail?" + urlencode(params)

    async def run(self) -> int:
        import aiohttp

        delay = _BACKOFF_FIRST_S
        while True:
            try:
                ended = await self._once()
            except (aiohttp.ClientError, OSError, _Unavailable, TimeoutError) as exc:
                if not self.follow:
                    raise TailFailed(f"cannot read the daemon at {self.socket_path}: "
                                     f"{exc or type(exc).__name__}") from None
                ended = f"connection lost ({exc or type(exc).__name__})"
            else:
                delay = _BACKOFF_FIRST_S
            if not self.follow:
                if self.mode == "json":
                    json.dump({"events": self.events, "last_seq": self.last_seq}, self.out)
                    self.out.write("\n")
                return EXIT_OK
            if delay == _BACKOFF_FIRST_S:  # once an outage, not at every retry
                print(f"auditd tail: {ended}; reconnecting"
                      + (f" after seq {self.last_seq}" if self.last_seq is not None else ""),
                      file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
            delay = min(_BACKOFF_MOST_S, delay * 2)

    async def _once(self) -> str:
        """One request; returns why the stream ended (a follow reconnects then)."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                        sock_read=_SILENCE_S if self.follow else 300)
        connector = aiohttp.UnixConnector(path=self.socket_path)
        async with (aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.get(f"http://auditd{self._query()}") as response):
            if response.status == 503:  # starting or stopping: a follow waits
                raise _Unavailable(f"the daemon is unavailable (HTTP {response.status})")
            if response.status != 200:
                raw = await response.read()
                try:
                    message = json.loads(raw).get("message") or raw.decode()
                except (ValueError, AttributeError):
                    message = raw[:200].decode(errors="replace")
                raise TailFailed(f"the daemon refused: {message}")
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    ended = self._line(raw)
                    if ended is not None:
                        return ended
        return "the daemon ended the stream"

    def _line(self, raw: bytes) -> str | None:
        """Print one line; a final line's reason (its last_seq is taken as the cursor)."""
        if not raw.strip():
            return None
        document = json.loads(raw)
        if "heartbeat" in document:
            return None
        if "error" in document:
            seq = document.get("last_seq")
            if isinstance(seq, int):
                self.last_seq = max(seq, self.last_seq or 0)
            return str(document.get("message") or document["error"])
        seq = document["seq"]
        if self.last_seq is not None and seq <= self.last_seq:
            return None  # never printed twice, whatever the daemon sends
        self.last_seq = seq
        if self.mode == "jsonl":
            self.out.write(raw.decode() + "\n")
            self.out.flush()
        elif self.mode == "json":
            self.events.append(document)
        else:
            self.out.write(readable(document) + "\n")
            self.out.flush()
        return None


def readable(event: dict[str, Any]) -> str:
    """`2026-12-02T10:13:38.739Z  seq 7  user.login  alice -> /srv/app  uid 0 sshd  k=v`"""
    when = str(event.get("ts", ""))
    if len(when) > 24 and when.endswith("Z"):
        when = when[:23] + "Z"  # milliseconds are enough to read
    who = event.get("actor") or "-"
    what = event.get("target")
    parts = [when, f"seq {event.get('seq')}", str(event.get("type")),
             f"{who} -> {what}" if what else who,
             f"uid {event.get('uid')} {event.get('comm', '')}".rstrip()]
    parts += list(_tags(event.get("tags")))
    return "  ".join(parts)


def _tags(tags: Any) -> Iterator[str]:
    if isinstance(tags, dict):
        for key, value in tags.items():
            yield f"{key}={value}"
