"""auditd.client against the real daemon subprocess: seqs, rejections, overload, restarts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from conftest import wait_for

from auditd.client import AsyncClient, Client, FrameError, OverloadedError, Reply
from auditd.errors import RejectedError

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS: dict[str, Runner] = {"asyncio": asyncio.run, "uvloop": uvloop.run}

CHUNK = 200  # events per send_many call in the restart loop
RESTART_AFTER = 10  # chunks sent before the restart is triggered, and after it is done


def stored(daemon: Any) -> tuple[int, int, set[str]]:
    """count(*), count(DISTINCT id) and the ids, once everything is committed (stopped)."""
    daemon.stop()
    ((count, distinct),) = daemon.query("SELECT count(*), count(DISTINCT id) FROM events")
    ids = {row[0] for row in daemon.query("SELECT id FROM events")}
    return count, distinct, ids


def seqs(reply: Reply) -> list[int]:
    assert reply.first is not None and reply.last is not None
    return list(range(reply.first, reply.last + 1))


# -- seqs ----------------------------------------------------------------------------


def test_blocking_send_send_batch_send_many_get_consecutive_seqs(daemon: Any) -> None:
    with Client(daemon.ingest_socket) as client:
        assert client.send({"type": "user.login", "actor": "alice"}) == Reply(ok=1, first=1,
                                                                             last=1)
        assert client.send_batch([{"type": "a"}, {"type": "b"}, {"type": "c"}]) == Reply(
            ok=3, first=2, last=4)
        replies = client.send_many([{"type": "bulk", "data": i} for i in range(250)], batch=100)
    assert [reply.ok for reply in replies] == [100, 100, 50]
    assert [seq for reply in replies for seq in seqs(reply)] == list(range(5, 255))
    assert stored(daemon)[:2] == (254, 254)


async def _async_seqs(path: str) -> None:
    async with AsyncClient(path, max_in_flight=8) as client:
        assert await client.send({"type": "user.login"}) == Reply(ok=1, first=1, last=1)
        assert await client.send_batch([{"type": "a"}, {"type": "b"}]) == Reply(ok=2, first=2,
                                                                                last=3)
        # 300 concurrent sends through 8 slots: pipelined, each frame one seq.
        replies = await asyncio.gather(*(client.send({"type": "n", "data": i})
                                         for i in range(300)))
        assert sorted(reply.first or 0 for reply in replies) == list(range(4, 304))
        many = await client.send_many([{"type": "bulk"} for _ in range(250)], batch=100)
        assert [seq for reply in many for seq in seqs(reply)] == list(range(304, 554))


@pytest.mark.parametrize("loop", RUNNERS)
def test_async_send_send_batch_send_many_get_consecutive_seqs(daemon: Any, loop: str) -> None:
    RUNNERS[loop](_async_seqs(daemon.ingest_socket))
    assert stored(daemon)[:2] == (553, 553)


def test_resending_the_same_event_dict_is_answered_as_a_duplicate(daemon: Any) -> None:
    event: dict[str, Any] = {"type": "user.login"}
    with Client(daemon.ingest_socket) as client:
        assert client.send(event).first == 1
        again = client.send(event)
    assert (again.ok, again.first, again.duplicates) == (0, None, [(0, 1)])
    assert stored(daemon)[:2] == (1, 1)


# -- refusals --------------------------------------------------------------------------


def test_a_rejected_event_raises_rejected_error_naming_the_field(daemon: Any) -> None:
    with Client(daemon.ingest_socket) as client:
        with pytest.raises(RejectedError) as info:
            client.send({"type": "user.login", "actor": 42})
        assert "actor" in str(info.value)
        ((index, code, message),) = info.value.rejected
        assert (index, code) == (0, "invalid") and message.startswith("actor")
        # The valid events of a frame are accepted; the error says which one was not.
        with pytest.raises(RejectedError) as batch_info:
            client.send_batch([{"type": "ok"}, {"type": "x", "colour": "red"}])
        assert batch_info.value.rejected == [(1, "invalid", "colour: unknown key")]
        assert batch_info.value.reply["ok"] == 1
        # send_many reports indexes into the whole list.
        events: list[dict[str, Any]] = [{"type": "ok"} for _ in range(10)]
        events[7]["seq"] = 3
        with pytest.raises(RejectedError) as many_info:
            client.send_many(events, batch=4)
        assert [entry[:2] for entry in many_info.value.rejected] == [(7, "invalid")]
        assert "seq" in many_info.value.rejected[0][2]
    with Client(daemon.ingest_socket, raise_on_reject=False) as lenient:
        reply = lenient.send({"type": ""})
    assert reply.ok == 0 and reply.rejected[0][:2] == (0, "invalid")


async def _async_rejected(path: str) -> None:
    async with AsyncClient(path) as client:
        with pytest.raises(RejectedError, match="target"):
            await client.send({"type": "a", "target": ["not", "a", "string"]})
        assert (await client.send({"type": "still fine"})).ok == 1


def test_async_rejected_event_raises_and_the_connection_goes_on(daemon: Any) -> None:
    asyncio.run(_async_rejected(daemon.ingest_socket))


def test_a_batch_over_the_limit_raises_frame_error(make_daemon: Any) -> None:
    daemon = make_daemon({"ingest": {"max_batch_events": 5}})
    with Client(daemon.ingest_socket) as client:
        with pytest.raises(FrameError) as info:
            client.send_batch([{"type": "a"} for _ in range(6)])
        assert info.value.code == "batch_too_large"
        assert client.send_batch([{"type": "a"} for _ in range(5)]).ok == 5


def test_overloaded_frames_are_retried_until_stored_once(make_daemon: Any) -> None:
    daemon = make_daemon({"buffer": {"capacity": 300, "overflow": "reject"}})
    events = [{"type": "burst", "data": i} for i in range(6000)]
    with Client(daemon.ingest_socket, max_in_flight=64, overload_retries=0) as client:
        # Without retries the same load fails: the daemon really does answer overloaded.
        with pytest.raises(OverloadedError) as info:
            client.send_many([{"type": "probe"} for _ in range(6000)], batch=100)
        assert info.value.code == "overloaded"
        # The failed call left nothing in flight: the connection is still in step.
        client.overload_retries = 10_000
        replies = client.send_many(events, batch=100)
    assert sum(reply.ok + len(reply.duplicates) for reply in replies) == 6000
    daemon.stop()
    assert daemon.query("SELECT count(*), count(DISTINCT id) FROM events_view "
                        "WHERE type = 'burst'") == [(6000, 6000)]


async def _async_overloaded(path: str, events: list[dict[str, Any]]) -> list[Reply]:
    async with AsyncClient(path, max_in_flight=64, overload_retries=10_000) as client:
        return await client.send_many(events, batch=100)


def test_async_overloaded_frames_are_retried_until_stored_once(make_daemon: Any) -> None:
    daemon = make_daemon({"buffer": {"capacity": 300, "overflow": "reject"}})
    events = [{"type": "burst", "data": i} for i in range(6000)]
    replies = asyncio.run(_async_overloaded(daemon.ingest_socket, events))
    assert sum(reply.ok + len(reply.duplicates) for reply in replies) == 6000
    count, distinct, ids = stored(daemon)
    assert (count, distinct) == (6000, 6000)
    assert ids == {event["id"] for event in events}


def test_a_refused_connection_is_retried_once_a_slot_frees(make_daemon: Any) -> None:
    daemon = make_daemon({"ingest": {"max_connections": 1}})

    def release_once_refused(holder: Client) -> None:
        # The slot frees only after the daemon has refused the second client, so its
        # reply proves a retry, not a first try that happened to find the slot free.
        wait_for(lambda: '"connection_refused"' in daemon.log_text(), 30,
                 "the second connection to be refused")
        holder.close()

    with Client(daemon.ingest_socket) as holder:
        holder.send({"type": "holding the only slot"})
        releaser = threading.Thread(target=release_once_refused, args=(holder,))
        releaser.start()
        try:
            with Client(daemon.ingest_socket) as second:
                reply = second.send({"type": "waited"})
        finally:
            releaser.join()
    assert reply.ok == 1
    assert daemon.log_text().count('"connection_refused"') >= 1


# -- restarts ------------------------------------------------------------------------


class Restarter:
    """Restarts the daemon from another thread once `started` is set; `done` after."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.started = threading.Event()
        self.done = threading.Event()
        self.cancelled = False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        if self.started.wait(60) and not self.cancelled:
            self.daemon.restart()
            self.done.set()

    def join(self) -> None:
        self.cancelled = not self.started.is_set()  # the loop failed before the trigger
        self.started.set()
        self.thread.join()


class RestartLoop:
    """Chunks of new events, sent back to back: RESTART_AFTER chunks, then the restart is
    triggered and chunks go on until it is done, then RESTART_AFTER more. So the daemon
    goes down and comes back while the client is busy sending, however long that takes.
    """

    def __init__(self, restarter: Restarter) -> None:
        self.restarter = restarter
        self.events: list[dict[str, Any]] = []
        self.after_restart = 0
        self.deadline = time.monotonic() + 120

    def next_chunk(self) -> list[dict[str, Any]] | None:
        """The next chunk to send, or None when the loop is over."""
        if self.restarter.done.is_set():
            if self.after_restart == RESTART_AFTER:
                return None
            self.after_restart += 1
        assert time.monotonic() < self.deadline, "the restart never finished"
        if len(self.events) == RESTART_AFTER * CHUNK:
            self.restarter.started.set()
        chunk = [{"type": "load", "data": len(self.events) + i} for i in range(CHUNK)]
        self.events += chunk
        return chunk


def check_exactly_once(daemon: Any, loop: RestartLoop, replies: list[Reply]) -> None:
    assert loop.restarter.done.is_set() and loop.after_restart == RESTART_AFTER
    total = len(loop.events)
    assert sum(reply.ok + len(reply.duplicates) for reply in replies) == total
    assert daemon.log_text().count('"daemon_ready"') == 2
    count, distinct, ids = stored(daemon)
    assert (count, distinct) == (total, total)
    assert ids == {event["id"] for event in loop.events}


def test_blocking_client_survives_a_restart_mid_send_many(daemon: Any) -> None:
    replies: list[Reply] = []
    loop = RestartLoop(Restarter(daemon))
    try:
        with Client(daemon.ingest_socket) as client:
            while (chunk := loop.next_chunk()) is not None:
                replies += client.send_many(chunk, batch=100)
    finally:
        loop.restarter.join()
    check_exactly_once(daemon, loop, replies)


async def _async_restart_loop(path: str, loop: RestartLoop) -> list[Reply]:
    replies: list[Reply] = []
    async with AsyncClient(path) as client:
        while (chunk := loop.next_chunk()) is not None:
            replies += await client.send_many(chunk, batch=100)
    return replies


@pytest.mark.parametrize("loop", RUNNERS)
def test_async_client_survives_a_restart_mid_send_many(daemon: Any, loop: str) -> None:
    restart_loop = RestartLoop(Restarter(daemon))
    try:
        replies = RUNNERS[loop](_async_restart_loop(daemon.ingest_socket, restart_loop))
    finally:
        restart_loop.restarter.join()
    check_exactly_once(daemon, restart_loop, replies)
