"""Projections: read models kept in step with the events (counts per hour, actor
summaries), updated in the writer's transaction, rebuilt from the events on demand.

`Projections` is what the daemon wires: the in-transaction `Projector` (set on the
Store), the background `Rebuilds`, and the `ProjectionReader` behind /counts and
/actors. See docs/design/projections.md.
"""

from __future__ import annotations

from typing import Any

from auditd.projections.definitions import BY_NAME, PROJECTIONS, Projection
from auditd.projections.params import BadParameter, CountsQuery, parse_counts
from auditd.projections.projector import Projector
from auditd.projections.reads import ProjectionReader
from auditd.projections.rebuild import Rebuilds
from auditd.store.store import Store

__all__ = ["BY_NAME", "PROJECTIONS", "BadParameter", "CountsQuery", "Projection",
           "Projections", "Projector", "parse_counts"]


class Projections:
    """`open()` after the store opened and before the first batch; `aclose()` before
    the store closes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.projector = Projector()
        self.rebuilds = Rebuilds(store, self.projector)
        self.reader = ProjectionReader(store.path)

    async def open(self) -> None:
        rebuilding = await self.store.on_writer(self.projector.load)
        self.store.projector = self.projector
        await self.reader.open()
        self.rebuilds.resume(rebuilding)

    async def aclose(self) -> None:
        await self.rebuilds.aclose()
        await self.reader.aclose()

    def document(self, committed_seq: int) -> dict[str, Any]:
        """Per projection: version, state, position, lag, and a rebuild's progress."""
        doc = self.projector.document(committed_seq)
        for name, progress in self.rebuilds.progress.items():
            if name in doc:
                doc[name]["rebuild"] = progress.document()
        return doc

    async def counts(self, query: CountsQuery, uid: int | None) -> dict[str, Any]:
        """The /counts document, its buckets as JSON text under "buckets_json" (built
        by SQLite; the status server splices it in as "buckets")."""
        restricted = query.restricted_to(uid)
        buckets = await self.reader.counts(restricted)
        name = f"counts_by_{query.by}"
        state = self.projector.states.get(name)
        return {"by": query.by, "interval": query.interval, "projection": name,
                "complete": state is not None and state.state == "live",
                "buckets_json": buckets}

    async def actor(self, actor: str, uid: int | None) -> dict[str, Any] | None:
        summary = await self.reader.actor(actor, uid)
        if summary is not None:
            state = self.projector.states.get("actor_summary")
            summary["complete"] = state is not None and state.state == "live"
        return summary

    async def rebuild(self, name: str) -> dict[str, Any]:
        return await self.rebuilds.start(name)
