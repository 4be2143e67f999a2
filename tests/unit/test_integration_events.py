"""What the integrations make of log records, event dicts and arguments (no daemon)."""

from __future__ import annotations

import asyncio
import enum
import http
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from auditd.client import AuditHandler, AuditProcessor, BufferedSender, audit, current_scope
from auditd.client.plain import MAX_DEPTH, plain, without_surrogates


@pytest.fixture
def sender(tmp_path: Path) -> Iterator[BufferedSender]:
    """A sender for a socket nothing listens on (its thread starts only on submit)."""
    made = BufferedSender(str(tmp_path / "none.sock"), max_events=2)
    yield made
    made.close(0)


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def test_plain_keeps_json_values_and_reprs_the_rest() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    value = plain({"s": "x", "i": 2**64, "f": 1.5, "n": None, "b": True, "t": (1, [2]),
                   1: b"raw", "o": BrokenRepr(), "c": cyclic})
    assert value["s"] == "x" and value["f"] == 1.5 and value["n"] is None and value["b"]
    assert value["i"] == repr(2**64) and value["t"] == [1, [2]] and value["1"] == "b'raw'"
    assert value["o"] == "<unrepresentable BrokenRepr>"
    depth, inner = 0, value["c"]
    while isinstance(inner, list):
        depth, inner = depth + 1, inner[0]
    assert depth == MAX_DEPTH - 1 and inner == "[[...]]"
    msgspec.msgpack.encode(value)  # what plain() returns always encodes
    msgspec.json.encode(value)


class Color(enum.StrEnum):
    RED = "red"


class Meters(float):
    pass


class Word(str):
    def __str__(self) -> str:
        return "not the value"


def test_plain_makes_subclasses_of_str_float_and_int_their_base_values() -> None:
    value = plain([Color.RED, Meters(2.5), Word("w"), http.HTTPStatus.OK, True])
    assert value == ["red", 2.5, "w", 200, True]
    assert [type(item) for item in value] == [str, float, str, int, bool]
    msgspec.msgpack.encode(value)


def record(**kwargs: Any) -> logging.LogRecord:
    made = logging.getLogger("app.db").makeRecord(
        "app.db", logging.WARNING, "f.py", 3, "slow %s", ("query",), None, extra=kwargs)
    return made


def test_handler_event_from_a_record(sender: BufferedSender) -> None:
    handler = AuditHandler(sender=sender, type_prefix="app.", target="db1", tags={"env": "t"})
    event = handler.event(record(actor=7, rows=3, logger="shadow", message_id="m"))
    assert event["type"] == "app.warning" and event["actor"] == "7"
    assert (event["target"], event["tags"]) == ("db1", {"env": "t"})
    assert event["data"] == {"level": "WARNING", "logger": "app.db", "message": "slow query",
                             "rows": 3, "extra.logger": "shadow", "message_id": "m"}
    assert "id" not in event and isinstance(event["ts"], int)


def test_handler_and_processor_settings_are_checked(sender: BufferedSender) -> None:
    with pytest.raises(ValueError, match="socket_path or sender"):
        AuditHandler(socket_path="/x", sender=sender)
    with pytest.raises(ValueError, match="max_events only with socket_path"):
        AuditHandler(sender=sender, max_events=3)
    with pytest.raises(ValueError, match="event_as"):
        AuditProcessor(sender=sender, event_as="name")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"AuditHandler tags\['env'\]: expected a str"):
        AuditHandler(sender=sender, tags={"env": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="audit tags: key '' is not a str"):
        audit("ok", sender=sender, tags={"": "x"})
    with pytest.raises(ValueError, match="max_events must be at least 1"):
        BufferedSender("/x", max_events=0)


def test_processor_event_from_an_event_dict(sender: BufferedSender) -> None:
    processor = AuditProcessor(sender=sender, event_type="app.log", target="t0")
    event = processor.event("info", {"event": 42, "actor": "bob", "_record": object(),
                                     "timestamp": "2026-12-02T10:00:00Z"})
    assert (event["type"], event["actor"], event["target"]) == ("app.log", "bob", "t0")
    assert event["data"] == {"message": "42", "level": "info",
                             "timestamp": "2026-12-02T10:00:00Z"}
    as_type = AuditProcessor(sender=sender, event_as="type")
    assert as_type.event("warning", {"event": "x" * 300})["type"] == "x" * 190
    assert as_type.event("warning", {})["type"] == "log.warning"


def test_audit_arguments_are_checked(sender: BufferedSender) -> None:
    with pytest.raises(ValueError, match="audit type"):
        audit("", sender=sender)
    with pytest.raises(ValueError, match="audit type"):
        audit("x" * 191, sender=sender)
    with pytest.raises(TypeError, match="audit actor: expected str"):
        audit("ok", actor=3, sender=sender)  # type: ignore[arg-type]


def test_an_event_too_large_is_refused_at_submit_and_counted(sender: BufferedSender,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    assert not sender.submit({"type": "big", "data": "x" * (300 << 10)})
    assert not sender.submit({"type": "big", "data": "x" * (300 << 10)})
    assert (sender.rejected, sender.dropped, sender.pending) == (2, 0, 0)
    assert len([r for r in caplog.records if "auditd_event_refused" in r.msg]) == 1


def test_a_closed_sender_drops_what_is_submitted_and_what_it_held(
        sender: BufferedSender) -> None:
    assert sender.submit({"type": "held"})
    sender.close(0)
    assert not sender.submit({"type": "late"})
    assert (sender.dropped, sender.pending) == (2, 0)


def test_audit_scope_follows_tasks_not_plain_threads(sender: BufferedSender) -> None:
    seen: dict[str, Any] = {}

    async def child() -> None:
        seen["task"] = current_scope()
        with audit("inner", sender=sender) as inner:
            seen["inner"] = inner

    async def main() -> None:
        async with audit("outer", sender=sender) as outer:
            seen["outer"] = outer
            await asyncio.gather(child())
            thread = threading.Thread(target=lambda: seen.update(thread=current_scope()))
            thread.start()
            thread.join()
            seen["after"] = current_scope()
        seen["end"] = current_scope()

    asyncio.run(main())
    assert seen["task"] is seen["outer"] is seen["after"]
    assert seen["inner"].correlation_id == seen["outer"].correlation_id == seen["outer"].id
    assert seen["thread"] is None and seen["end"] is None


class RecordingSender(BufferedSender):
    """Keeps what audit() submits, in order, instead of sending it."""

    def __init__(self) -> None:
        super().__init__("/nonexistent")
        self.events: list[dict[str, Any]] = []

    def submit(self, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return True


def test_one_audit_block_shared_by_threads_exits_each_threads_own_scope() -> None:
    shared = audit("shared", sender=(sender := RecordingSender()))
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with shared as scope:
            scope.data["who"] = "first"
            first_in.set()
            second_in.wait()
        first_out.set()

    def second() -> None:
        first_in.wait()
        with shared as scope:
            scope.data["who"] = "second"
            second_in.set()
            first_out.wait()  # the first thread exits while this one is inside

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = sender.events
    starts = {event["id"]: event for event in events if event["type"] == "shared.started"}
    outcomes = [event for event in events if event["type"] == "shared.succeeded"]
    assert len(starts) == len(outcomes) == 2 and not shared._entered
    # Each outcome is caused by its own thread's start: the first thread's outcome (sent
    # first) links to the first start, not to the start entered last.
    assert [starts[event["causation_id"]]["id"] for event in outcomes] == list(starts)
    assert [event["data"]["who"] for event in outcomes] == ["first", "second"]


def test_a_lone_surrogate_is_escaped_not_a_refused_event(sender: BufferedSender) -> None:
    assert sender.submit({"type": "log.info", "data": {"file": "caf\udce9", "\udcff": 1}})
    assert (sender.rejected, sender.pending) == (0, 1)
    assert without_surrogates({"k\udcff": ["caf\udce9", 2]}) == {"k\\udcff": ["caf\\udce9", 2]}
