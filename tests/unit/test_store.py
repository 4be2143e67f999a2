"""The store on a real SQLite file: statement shapes, and batches queued in order."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from auditd.bench.micro import stored_events
from auditd.errors import BatchSkippedError, TransientStoreError
from auditd.store.statements import EVENTS
from auditd.store.store import DB_NAME, Store, connect_sync


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
