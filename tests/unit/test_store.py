"""The store on a real SQLite file: statement shapes, batches queued in order, what a
checkpoint makes durable, and how SQLite errors are classified (from real conditions)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from auditd.bench.micro import stored_events
from auditd.errors import (
    BatchSkippedError,
    PermanentStoreError,
    StoreError,
    StoreFaultError,
    TransientStoreError,
)
from auditd.store.connection import connect_sync
from auditd.store.sqlite_errors import classify
from auditd.store.statements import EVENTS
from auditd.store.store import DB_NAME, Store


@pytest.mark.parametrize(("rows", "chunks"), [
    (4096, [1024, 1024, 1024, 1024]),
    (456, [256, 128, 64, 8]),
    (1, [1]),
])
def test_rows_go_in_power_of_two_chunks_within_the_parameter_limit(
        rows: int, chunks: list[int]) -> None:
    values = [tuple(range(i * 18, i * 18 + 18)) for i in range(rows)]
    statements = list(EVENTS.statements(values))
    assert [len(params) // 18 for _, params in statements] == chunks
    assert all(sql.count("?") == len(params) <= 32_766 for sql, params in statements)
    flat = [value for _, params in statements for value in params]
    assert flat == [value for row in values for value in row]  # every row, in order
    # One statement text per chunk size: sqlite3's cache keeps reusing them.
    assert len({sql for sql, _ in statements}) == len(set(chunks))


def stored_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM events ORDER BY seq")]


def test_a_batch_queued_behind_a_failing_one_is_not_attempted(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    versions: Counter[str] = Counter()
    first = stored_events(3, first=1, versions=versions)
    second = stored_events(2, first=4, versions=versions)

    async def scenario() -> None:
        store = Store(path)
        await store.open()
        try:
            await store.load_state()
            blocker = connect_sync(path)
            blocker.execute("BEGIN IMMEDIATE")  # the store's BEGIN gives up after 200 ms
            failing = store.submit_batch(first, [], 3, after=None)
            behind = store.submit_batch(second, [], 5, after=3)
            with pytest.raises(TransientStoreError, match="locked"):
                await failing
            with pytest.raises(BatchSkippedError, match="through seq 3"):
                await behind
            blocker.execute("ROLLBACK")
            blocker.close()
            assert stored_seqs(path) == []
            # Once its predecessor commits, the same batch goes through.
            await store.submit_batch(first, [], 3, after=None)
            await store.submit_batch(second, [], 5, after=3)
        finally:
            await store.close()

    asyncio.run(scenario())
    assert stored_seqs(path) == [1, 2, 3, 4, 5]
    with sqlite3.connect(path) as conn:
        assert conn.execute(
            "SELECT value FROM meta WHERE key = 'committed_seq'").fetchone() == (5,)


def size(path: Path | str) -> int:
    return Path(path).stat().st_size


def test_the_wal_is_checkpointed_by_its_own_thread_not_by_commits(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME

    async def scenario() -> None:
        store = Store(path)
        await store.open()
        try:
            await store.load_state()
            await store.insert_batch(stored_events(3000), [], 3000)
            # The commit appended to the WAL and copied nothing into the database file.
            assert size(f"{path}-wal") > 1_000_000 > size(path)
            store.checkpoint_every_s = 0.01
            checkpoints = asyncio.ensure_future(store.checkpoint_forever())
            try:
                for _ in range(500):
                    if size(path) > 1_000_000:
                        break
                    await asyncio.sleep(0.01)
            finally:
                checkpoints.cancel()
            assert size(path) > 1_000_000  # the pages are in the file now
            assert await store.checkpoint_wal()  # and nothing is left to copy
        finally:
            await store.close()

    asyncio.run(scenario())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (3000,)


def test_durable_seq_advances_only_with_a_checkpoint_that_began_after_the_commit(
        tmp_path: Path) -> None:
    """What a held fsync-mode reply waits for: its commit copied into the database file
    (and synced) by a complete checkpoint. A reader on an older snapshot keeps the
    checkpoint from completing, so nothing is claimed durable."""
    path = tmp_path / DB_NAME
    told: list[int] = []

    async def scenario() -> None:
        store = Store(path)
        await store.open()
        store.on_durable = told.append
        try:
            await store.load_state()
            reader = sqlite3.connect(path, isolation_level=None)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot
            await store.insert_batch(stored_events(50), [], 50)
            assert not await store.checkpoint_wal()
            assert (store.durable_seq, told) == (0, [])
            reader.execute("COMMIT")
            reader.close()
            assert await store.checkpoint_wal()
            assert (store.durable_seq, told) == (50, [50])
            assert await store.checkpoint_wal()  # nothing new: not told again
            assert told == [50]
        finally:
            await store.close()

    asyncio.run(scenario())


def flip_page(path: Path, page: int) -> None:
    """Overwrite the first bytes of `page` (1-based): its b-tree header, or the file header."""
    with path.open("r+b") as handle:
        handle.seek((page - 1) * 4096)
        handle.write(b"\xff" * 16)


def committed_store(path: Path, count: int) -> None:
    async def fill() -> None:
        store = Store(path)
        await store.open()
        try:
            await store.load_state()
            await store.insert_batch(stored_events(count), [], count)
        finally:
            await store.close()  # the last one out checkpoints: everything is in the file

    asyncio.run(fill())


def commit_error(path: Path, first: int) -> StoreError:
    async def attempt() -> StoreError:
        store = Store(path)
        try:
            with pytest.raises(StoreError) as raised:  # at open, or at the commit
                await store.open()
                await store.load_state()
                await store.insert_batch(stored_events(1, first=first), [], first)
            return raised.value
        finally:
            await store.close()

    return asyncio.run(attempt())


@pytest.mark.parametrize(("page", "code"), [("events", "SQLITE_CORRUPT"),
                                            ("header", "SQLITE_NOTADB")])
def test_a_damaged_file_is_a_fault_not_a_retry(tmp_path: Path, page: str, code: str) -> None:
    path = tmp_path / DB_NAME
    committed_store(path, 200)
    with sqlite3.connect(path) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'"
                               ).fetchone()
    conn.close()
    flip_page(path, root if page == "events" else 1)
    error = commit_error(path, 201)
    assert isinstance(error, StoreFaultError), error
    assert (error.code, error.damaged) == (code, True)
    assert code in str(error)


def test_a_read_only_file_is_a_fault_not_a_retry(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    committed_store(path, 10)
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(path)], check=False,
                                           capture_output=True).returncode != 0:
        pytest.skip("chattr +i (root, and a filesystem that supports it) is needed here")
    try:
        error = commit_error(path, 11)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert isinstance(error, StoreFaultError), error
    assert (error.code, error.damaged) == ("SQLITE_READONLY", False)


def test_classes_by_primary_result_code(tmp_path: Path) -> None:
    """BUSY stays transient and a constraint permanent, from real errors; an error with
    no SQLite code at all (the connection is closed) is a fault."""
    path = tmp_path / DB_NAME
    committed_store(path, 5)
    conn = connect_sync(path)
    with pytest.raises(sqlite3.Error) as constraint:
        conn.execute("INSERT INTO events SELECT * FROM events WHERE seq = 1")
    holder = connect_sync(path)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.Error) as busy:
        conn.execute("BEGIN IMMEDIATE")
    holder.execute("ROLLBACK")
    holder.close()
    conn.close()
    with pytest.raises(sqlite3.Error) as closed:
        conn.execute("SELECT 1")
    assert isinstance(classify(constraint.value, "x"), PermanentStoreError)
    assert isinstance(classify(busy.value, "x"), TransientStoreError)
    fault = classify(closed.value, "reading")
    assert isinstance(fault, StoreFaultError), fault
    assert (fault.code, fault.damaged) == ("no SQLite result code", False)
