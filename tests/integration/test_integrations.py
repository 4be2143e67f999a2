"""The logging handler, structlog processor and audit() against a real daemon subprocess.

Each delivers its records; with the daemon down (or stalled) each call returns, the
buffer keeps what fits and counts the rest as dropped, and the buffered records are
stored once the daemon is back. No durations are asserted: that a call returned at
all while nothing listens is the behaviour; `python -m auditd.bench.integrations`
measures how long it takes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from conftest import FAST_RETRY, DaemonProcess, wait_for, write_lock
from stored_events import stored_count, stored_events

from auditd.client import (
    AuditHandler,
    AuditProcessor,
    BufferedSender,
    audit,
    current_scope,
    default_sender,
    set_default_sender,
)

MakeDaemon = Callable[..., DaemonProcess]
# A submit waits at most max_block (5 ms by default) for the buffer's lock, and counts
# the event as dropped past it: on a loaded test machine the sender's own thread can be
# off the CPU that long while it holds the lock, and these tests count events exactly.
PATIENT = {"max_block": 30.0}


def wait_stored(daemon: DaemonProcess, count: int) -> list[dict[str, Any]]:
    """Until `count` events are committed to the database; those events."""
    wait_for(lambda: stored_count(daemon.db_path) >= count, 60, f"{count} events stored")
    return stored_events(daemon.db_path)


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records
            if record.name == "auditd.client" and "auditd_events_dropped" in record.msg]


@pytest.fixture
def app_logger() -> Iterator[logging.Logger]:
    """A logger of its own (not propagating), its handlers closed after the test."""
    logger = logging.getLogger(f"test.integrations.{id(object())}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


@pytest.fixture
def sender_for() -> Iterator[Callable[..., BufferedSender]]:
    """Factory: sender_for(daemon, **options), each closed after the test."""
    made: list[BufferedSender] = []

    def factory(daemon: DaemonProcess, **options: Any) -> BufferedSender:
        sender = BufferedSender(daemon.ingest_socket, **{**PATIENT, **options})
        made.append(sender)
        return sender

    yield factory
    for sender in made:
        sender.close(0)


# -- logging.Handler -------------------------------------------------------------------


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


def test_handler_delivers_level_logger_message_extra_and_exception(
        daemon: DaemonProcess, app_logger: logging.Logger) -> None:
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT, actor="svc")
    app_logger.addHandler(handler)
    when = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)
    app_logger.info("deployed %s", "v1.4", extra={
        "target": "/srv/app", "version": [1, 4], "when": when, "thing": Opaque(),
        "level": "shadowed", "nested": {"a": {"b": (1, 2)}, 3: None}})
    try:
        raise ValueError("bad config")
    except ValueError:
        app_logger.exception("deploy failed", extra={"actor": "alice"})
    handler.flush(30)
    assert (handler.pending, handler.dropped, handler.rejected) == (0, 0, 0)
    info, error = wait_stored(daemon, 2)
    assert (info["type"], info["actor"], info["target"]) == ("log.info", "svc", "/srv/app")
    assert info["data"] == {"level": "INFO", "logger": app_logger.name,
                            "message": "deployed v1.4", "version": [1, 4],
                            "when": repr(when), "thing": "<Opaque>",
                            "extra.level": "shadowed", "nested": {"a": {"b": [1, 2]},
                                                                  "3": None}}
    assert (error["type"], error["actor"], error["target"]) == ("log.error", "alice", None)
    assert error["data"]["message"] == "deploy failed"
    assert error["data"]["exception"].startswith("Traceback (most recent call last):")
    assert error["data"]["exception"].endswith("ValueError: bad config")
    assert info["id"] != error["id"] and len(info["id"]) == 36


def test_handler_fixed_type_and_records_inside_audit_link_to_the_block(
        daemon: DaemonProcess, app_logger: logging.Logger) -> None:
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT, event_type="app.log")
    app_logger.addHandler(handler)
    with audit("deploy.app", sender=handler.sender) as scope:
        app_logger.warning("step one")
    handler.flush(30)
    started, record, succeeded = wait_stored(daemon, 3)
    assert record["type"] == "app.log"
    assert record["correlation_id"] == scope.correlation_id == started["correlation_id"]
    assert record["causation_id"] == started["id"] == scope.id
    assert succeeded["causation_id"] == started["id"]


def test_handler_with_the_daemon_down_returns_counts_drops_and_delivers_later(
        make_daemon: MakeDaemon, app_logger: logging.Logger,
        caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon(start=False)
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT, max_events=5)
    app_logger.addHandler(handler)
    for n in range(20):
        app_logger.info("record %d", n)  # returns: nothing listens, nothing waits
    assert (handler.dropped, handler.pending) == (15, 5)
    assert len(drop_warnings(caplog)) == 1  # once for the episode, not 15 times
    daemon.start()
    handler.flush(60)
    assert (handler.pending, handler.dropped) == (0, 15)
    stored = wait_stored(daemon, 5)
    assert [event["data"]["message"] for event in stored] == [f"record {n}" for n in range(5)]


def test_each_drop_episode_is_logged_once(make_daemon: MakeDaemon,
                                          app_logger: logging.Logger,
                                          caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon(start=False)
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT, max_events=2)
    app_logger.addHandler(handler)
    for n in range(5):
        app_logger.info("first outage %d", n)
    daemon.start()
    handler.flush(60)
    app_logger.info("back")  # buffered: the episode is over
    handler.flush(60)
    daemon.stop()
    for n in range(5):
        app_logger.info("second outage %d", n)
    assert len(drop_warnings(caplog)) == 2
    assert handler.dropped == 3 + 3  # five records each time, two of them buffered
    daemon.start()
    handler.flush(60)
    assert len(wait_stored(daemon, 5)) == 5


def test_handler_on_the_root_logger_does_not_recurse_on_its_own_warning(
        make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon(start=False)
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT, max_events=1)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for n in range(10):
            logging.getLogger("test.root.app").warning("record %d", n)
    finally:
        root.removeHandler(handler)
    # The drop warning reached the root logger's handlers (caplog) once; the handler
    # itself dropped it (counted) instead of buffering it and warning again.
    assert len(drop_warnings(caplog)) == 1
    assert handler.dropped == 9 + 1
    daemon.start()
    handler.flush(60)
    handler.close()
    assert (handler.pending, handler.dropped) == (0, 10)
    assert [event["data"]["message"] for event in wait_stored(daemon, 1)] == ["record 0"]


def test_handler_with_a_stalled_daemon_returns_drops_and_delivers_after_the_stall(
        make_daemon: MakeDaemon, app_logger: logging.Logger) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16}, **FAST_RETRY})
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT, max_events=10,
                           batch_events=4)
    app_logger.addHandler(handler)
    with write_lock(daemon):
        # The writer cannot commit: the daemon holds at most 16 pending events, then
        # stops reading this connection; the handler's own buffer fills behind it.
        for n in range(100):
            app_logger.info("stalled %d", n)
        dropped = handler.dropped
        assert dropped >= 100 - 16 - 10 - 4
    handler.flush(60)
    assert (handler.pending, handler.dropped) == (0, dropped)
    assert len(wait_stored(daemon, 100 - dropped)) == 100 - dropped


def test_records_sent_across_a_daemon_crash_are_stored_exactly_once(
        make_daemon: MakeDaemon, app_logger: logging.Logger) -> None:
    daemon = make_daemon()
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT)
    app_logger.addHandler(handler)
    for n in range(1000):
        app_logger.info("n=%d", n)
    daemon.kill()  # some of those are in flight: resent after the restart
    for n in range(1000, 2000):
        app_logger.info("n=%d", n)
    daemon.start()
    for n in range(2000, 3000):
        app_logger.info("n=%d", n)
    handler.flush(60)
    assert (handler.pending, handler.dropped) == (0, 0)
    stored = wait_stored(daemon, 3000)
    assert sorted(event["data"]["message"] for event in stored) == sorted(
        f"n={n}" for n in range(3000))
    assert len({event["id"] for event in stored}) == 3000


def test_a_batch_over_the_daemons_limit_is_split_and_a_refused_record_counted(
        make_daemon: MakeDaemon, app_logger: logging.Logger,
        caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon({"ingest": {"max_batch_events": 4}}, start=False)
    handler = AuditHandler(socket_path=daemon.ingest_socket, **PATIENT)
    app_logger.addHandler(handler)
    for n in range(50):  # buffered while the daemon is down: sent as one batch of 50
        app_logger.info("queued %d", n, extra={"actor": "x" * 300} if n == 7 else None)
    daemon.start()
    handler.flush(60)
    assert (handler.pending, handler.dropped, handler.rejected) == (0, 0, 1)
    stored = wait_stored(daemon, 49)
    assert [event["data"]["message"] for event in stored] == [
        f"queued {n}" for n in range(50) if n != 7]
    (refused,) = [r for r in caplog.records if "auditd_event_refused" in r.msg]
    assert "actor" in refused.getMessage()


# -- structlog processor ---------------------------------------------------------------


def test_processor_sends_the_event_dict_and_returns_it_unchanged(
        daemon: DaemonProcess, sender_for: Callable[..., BufferedSender]) -> None:
    sender = sender_for(daemon)
    capture = structlog.testing.LogCapture()
    log = structlog.wrap_logger(structlog.ReturnLogger(), processors=[
        structlog.processors.add_log_level, AuditProcessor(sender=sender, event_as="type"),
        capture])
    log.info("user.login", actor="alice", method="sso", when=datetime.date(2026, 12, 2))
    log.bind(target="/srv/app").warning("deploy.slow", seconds=12.5)
    assert capture.entries == [
        {"event": "user.login", "level": "info", "actor": "alice", "method": "sso",
         "when": datetime.date(2026, 12, 2), "log_level": "info"},
        {"event": "deploy.slow", "level": "warning", "target": "/srv/app", "seconds": 12.5,
         "log_level": "warning"}]
    assert sender.flush(30)
    login, slow = wait_stored(daemon, 2)
    assert (login["type"], login["actor"]) == ("user.login", "alice")
    assert login["data"] == {"level": "info", "method": "sso",
                             "when": "datetime.date(2026, 12, 2)"}
    assert (slow["type"], slow["target"]) == ("deploy.slow", "/srv/app")
    assert slow["data"] == {"level": "warning", "seconds": 12.5}


def test_processor_message_mode_exception_and_drop(
        daemon: DaemonProcess, sender_for: Callable[..., BufferedSender]) -> None:
    sender = sender_for(daemon)
    processor = AuditProcessor(sender=sender, drop=True, actor="svc")
    event_dict = {"event": "cache miss", "key": "k1"}
    with pytest.raises(structlog.DropEvent):
        processor(None, "info", event_dict)
    assert event_dict == {"event": "cache miss", "key": "k1"}
    try:
        raise KeyError("k2")
    except KeyError:
        with pytest.raises(structlog.DropEvent):
            processor(None, "error", {"event": "lookup failed", "exc_info": True})
    assert sender.flush(30)
    miss, failed = wait_stored(daemon, 2)
    assert (miss["type"], miss["actor"]) == ("log.info", "svc")
    assert miss["data"] == {"message": "cache miss", "level": "info", "key": "k1"}
    assert failed["type"] == "log.error"
    assert failed["data"]["exception"].endswith("KeyError: 'k2'")


def test_processor_with_the_daemon_down_counts_drops_and_delivers_later(
        make_daemon: MakeDaemon, sender_for: Callable[..., BufferedSender],
        caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon(start=False)
    processor = AuditProcessor(sender=sender_for(daemon, max_events=3), event_as="type")
    for n in range(10):
        assert processor(None, "info", {"event": "job.tick", "n": n})["n"] == n
    assert processor.dropped == 7
    assert len(drop_warnings(caplog)) == 1
    daemon.start()
    assert processor.sender.flush(60)
    assert [event["data"]["n"] for event in wait_stored(daemon, 3)] == [0, 1, 2]


# -- audit() ---------------------------------------------------------------------------


def test_audit_block_records_start_and_success_linked(
        daemon: DaemonProcess, sender_for: Callable[..., BufferedSender]) -> None:
    sender = sender_for(daemon)
    with audit("deploy.app", target="/srv/app", actor="alice", sender=sender,
               version="1.4") as scope:
        assert current_scope() is scope
        scope.data["files"] = 12
    assert current_scope() is None
    assert sender.flush(30)
    started, succeeded = wait_stored(daemon, 2)
    assert (started["type"], succeeded["type"]) == ("deploy.app.started",
                                                    "deploy.app.succeeded")
    assert started["id"] == scope.id == started["correlation_id"] == scope.correlation_id
    assert started["causation_id"] is None
    assert succeeded["correlation_id"] == started["id"]
    assert succeeded["causation_id"] == started["id"]
    assert {e["actor"] for e in (started, succeeded)} == {"alice"}
    assert {e["target"] for e in (started, succeeded)} == {"/srv/app"}
    assert started["data"] == {"version": "1.4"}
    assert succeeded["data"]["files"] == 12 and succeeded["data"]["version"] == "1.4"
    assert succeeded["data"]["duration_ms"] >= 0


def test_audit_failure_records_the_exception_and_nested_blocks_link(
        daemon: DaemonProcess, sender_for: Callable[..., BufferedSender]) -> None:
    sender = sender_for(daemon)
    with pytest.raises(RuntimeError, match="disk full"), \
            audit("deploy.app", sender=sender) as outer:
        with audit("deploy.copy", sender=sender) as inner:
            assert current_scope() is inner
        assert current_scope() is outer
        raise RuntimeError("disk full")
    assert sender.flush(30)
    events = wait_stored(daemon, 4)
    by_type = {event["type"]: event for event in events}
    assert list(by_type) == ["deploy.app.started", "deploy.copy.started",
                             "deploy.copy.succeeded", "deploy.app.failed"]
    root = by_type["deploy.app.started"]
    assert {event["correlation_id"] for event in events} == {root["id"]}
    assert by_type["deploy.copy.started"]["causation_id"] == root["id"]
    assert by_type["deploy.copy.succeeded"]["causation_id"] == by_type[
        "deploy.copy.started"]["id"]
    failed = by_type["deploy.app.failed"]
    assert failed["causation_id"] == root["id"]
    assert (failed["data"]["error_type"], failed["data"]["error"]) == ("RuntimeError",
                                                                       "disk full")


def test_audit_decorates_sync_and_async_functions(
        daemon: DaemonProcess, sender_for: Callable[..., BufferedSender]) -> None:
    sender = sender_for(daemon)

    @audit("job.sync", sender=sender, kind="sync")
    def work(x: int) -> int:
        return x * 2

    @audit("job.async", sender=sender)
    async def fail(x: int) -> int:
        await asyncio.sleep(0)
        raise ValueError(f"no {x}")

    async def both() -> None:
        with pytest.raises(ValueError, match="no 3"):
            await fail(3)
        # Concurrent calls of one decorated function: each its own block.
        await asyncio.gather(*(asyncio.to_thread(work, n) for n in range(3)))

    assert work(21) == 42
    asyncio.run(both())
    assert sender.flush(30)
    events = wait_stored(daemon, 10)
    assert [event["type"] for event in events[:4]] == [
        "job.sync.started", "job.sync.succeeded", "job.async.started", "job.async.failed"]
    assert events[3]["data"]["error_type"] == "ValueError"
    assert events[3]["causation_id"] == events[2]["id"]
    starts = {event["id"] for event in events[4:] if event["type"] == "job.sync.started"}
    assert len(starts) == 3
    assert {event["causation_id"] for event in events[4:]
            if event["type"] == "job.sync.succeeded"} == starts
    assert all(event["data"]["kind"] == "sync" for event in events
               if event["type"].startswith("job.sync."))


def test_audit_with_the_daemon_down_returns_counts_drops_and_delivers_later(
        make_daemon: MakeDaemon, sender_for: Callable[..., BufferedSender]) -> None:
    daemon = make_daemon(start=False)
    sender = sender_for(daemon, max_events=4)
    for n in range(5):
        with audit("batch.run", sender=sender, n=n):
            pass
    assert (sender.dropped, sender.pending) == (6, 4)
    with pytest.raises(KeyError), audit("batch.run", sender=sender):
        raise KeyError("the caller's own exception passes through")
    daemon.start()
    assert sender.flush(60)
    assert [event["type"] for event in wait_stored(daemon, 4)] == [
        "batch.run.started", "batch.run.succeeded"] * 2


def test_default_sender_comes_from_the_environment_and_is_replaceable(
        daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDITD_INGEST_SOCKET", daemon.ingest_socket)
    previous = set_default_sender(None)
    try:
        with audit("env.check"):
            pass
        sender = default_sender()
        assert sender.path == daemon.ingest_socket
        assert sender.flush(30)
        assert [event["type"] for event in wait_stored(daemon, 2)] == [
            "env.check.started", "env.check.succeeded"]
    finally:
        set_default_sender(previous)
        sender.close(0)
