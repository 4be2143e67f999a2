"""The catalogued sealed partitions, open for reading, on one thread of their own.

Each partition is an immutable SQLite file with a connection of its own (no ATTACH:
the build allows 10, and nothing here needs a cross-file transaction). Connections
are opened and used only on this set's thread: sqlite3 connections belong to the
thread that made them, and partition reads must not wait behind the writer's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from auditd.store.partition.read import SealedPartition
from auditd.store.sealing.catalog import CatalogEntry

_T = TypeVar("_T")
_CACHE_KB = 256


class SealedSet:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="auditd-partitions")
        self._open: list[SealedPartition] = []  # oldest first; touched only on _thread

    def _call(self, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def add(self, entries: Iterable[CatalogEntry]) -> None:
        """Open newly catalogued partitions (in seq order, after those already open)."""
        def open_all() -> None:
            for entry in entries:
                part = SealedPartition(self.directory / entry.file)
                # The daemon probes every partition for an id the Bloom filter cannot
                # rule out: mapped pages of each would count in its RSS (a 3M soak
                # peaked at 550 MB), and a page cache apiece would add up, so reads go
                # through the kernel's page cache with a small cache per connection.
                part.conn.execute("PRAGMA mmap_size=0")
                part.conn.execute(f"PRAGMA cache_size=-{_CACHE_KB}")
                self._open.append(part)
        await self._call(open_all)

    async def drop(self, first_seq: int) -> None:
        """Close the partition that begins at `first_seq` (retention took it out of the
        catalog); queries that hold it open read on until they close it."""
        def close_one() -> None:
            for part in [p for p in self._open if p.first_seq == first_seq]:
                self._open.remove(part)
                part.close()
        await self._call(close_one)

    def __len__(self) -> int:
        return len(self._open)

    @property
    def sealed_through(self) -> int:
        """The last seq of the newest partition open for reads (0: none)."""
        return self._open[-1].last_seq if self._open else 0

    def files(self) -> list[tuple[int, int, Path]]:
        """(first_seq, last_seq, path) of the partitions open for reads, oldest first:
        a snapshot any thread may take (queries open files of their own with it)."""
        return [(part.first_seq, part.last_seq, part.path) for part in list(self._open)]

    async def lookup_ids(self, ids: Iterable[str]) -> dict[str, int]:
        """The seq of each id stored in a sealed partition, newest partition first."""
        wanted = list(ids)

        def look() -> dict[str, int]:
            found: dict[str, int] = {}
            for part in reversed(self._open):
                for event_id in wanted:
                    if event_id not in found:
                        seq = part.lookup_id(event_id)
                        if seq is not None:
                            found[event_id] = seq
                if len(found) == len(wanted):
                    break
            return found

        return await self._call(look) if wanted and self._open else {}

    async def aclose(self) -> None:
        def close_all() -> None:
            for part in self._open:
                part.close()
            self._open.clear()
        await self._call(close_all)
        self._thread.shutdown(wait=True)
