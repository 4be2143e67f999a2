"""Database id lookups for ingest: bounded retries with capped exponential backoff.

A frame whose ids the Bloom filter cannot rule out waits for a lookup. A failing lookup
is retried a few times (50 ms, 100 ms, 200 ms, 400 ms apart), then the frame is given
up on (its connection answers it with an error and moves on) rather than wedged. The
fault is kept for health from the first failure until a lookup succeeds again; while it
lasts a probe retries on its own (0.5 s up to every 5 s), so health clears by itself
even when no frame needs a lookup. One log line when lookups start failing, one when
they recover: never one per attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

import structlog

from auditd.stats import Stats

log = structlog.get_logger("auditd.ingest.lookups")

ATTEMPTS = 5
_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 0.5
_PROBE_FIRST_S = 0.5
_PROBE_MAX_S = 5.0
_PROBE_ID = "auditd.id-lookup-probe"


class IdSource(Protocol):
    async def lookup_ids(self, ids: Iterable[str]) -> dict[str, int]: ...


class IdLookups:
    """Owns the lookups' fault state and the probe task; aclose() stops the probe."""

    def __init__(self, source: IdSource, stats: Stats, attempts: int = ATTEMPTS,
                 first_delay_s: float = _FIRST_DELAY_S) -> None:
        self.source = source
        self.stats = stats
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self.fault: str | None = None  # why lookups fail now, for health
        self.last_error = ""  # the latest failure's own words
        self._probe: asyncio.Task[None] | None = None

    async def find(self, ids: list[str]) -> dict[str, int] | None:
        """The stored seq of each id that is stored, or None once every attempt failed.

        Cancellation: nothing to undo (a read).
        """
        delay = self.first_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                found = await self.source.lookup_ids(ids)
            except Exception as exc:  # any failure of the read: retried, then reported
                self._failed(exc, attempt)
                if attempt < self.attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _MAX_DELAY_S)
                continue
            self._recovered()
            return found
        self._start_probe()
        return None

    def _failed(self, exc: Exception, attempt: int) -> None:
        self.stats.id_lookup_failures += 1
        self.last_error = str(exc)
        reason = f"id lookups in the database are failing: {exc}"
        if self.fault is None:
            log.warning("id_lookup_failing", error=str(exc), attempt=attempt,
                        note="frames that need a lookup are answered overloaded until "
                        "it works again")
        self.fault = reason

    def _recovered(self) -> None:
        if self.fault is not None:
            log.info("id_lookup_recovered")
            self.fault = None

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_ok(), name="id_lookup_probe")

    async def _probe_until_ok(self) -> None:
        delay = _PROBE_FIRST_S
        while self.fault is not None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PROBE_MAX_S)
            try:
                await self.source.lookup_ids([_PROBE_ID])
            except Exception as exc:  # still failing: the fault stays, quietly
                self.stats.id_lookup_failures += 1
                self.last_error = str(exc)
                self.fault = f"id lookups in the database are failing: {exc}"
                continue
            self._recovered()

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
