"""The soak's events as the daemon would have stored them: for sealed-partition tests
and `python -m auditd.store.partition.measure`.

soak_events.SoakEvents makes the wire events (issue 12's cardinalities); this adds what
the sequencer stamps: seq, stream_seq (gap-free per stream), received_at, and a `ts`
that rises with jitter, as client clocks and batching give.
"""

from __future__ import annotations

from collections.abc import Iterator

from auditd.bench.soak_events import SoakEvents, mix
from auditd.schema import StoredEvent, encoder, id_hash
from auditd.store.records import dead_letter_record, record_bytes

START_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
SPACING_NS = 20_000_000  # 50 events a second: 1M events span ~5.8 hours
JITTER_NS = 50_000_000  # ts may run up to 50 ms behind its arrival


class StoredSoakEvents:
    """Events number 0, 1, ... of a seed as StoredEvents with seq = number + 1.

    Stream versions are counted as the events are made, so ask for consecutive
    ranges (as a sealer reads them)."""

    def __init__(self, seed: int = 1, pid: int = 4242, uid: int = 1000, gid: int = 1000,
                 comm: str = "audit-client", long_correlation_every: int = 0) -> None:
        self.source = SoakEvents(seed)
        self.key = mix(seed ^ 0x7E57)
        self.peer = (pid, uid, gid, comm)
        self.versions: dict[str, int] = {}
        # Every so many events, the next 100 share one correlation id: a long operation.
        self.long_correlation_every = long_correlation_every

    def events(self, start: int, stop: int) -> list[StoredEvent]:
        out = []
        pid, uid, gid, comm = self.peer
        for i, wire in enumerate(self.source.events(start, stop), start):
            stream = wire["stream"]
            version = self.versions[stream] = self.versions.get(stream, 0) + 1
            received = START_NS + i * SPACING_NS
            ts = received - mix(self.key ^ i) % JITTER_NS
            correlation = wire["correlation_id"]
            every = self.long_correlation_every
            if every and i % every < 100:
                correlation = f"op-long-{i // every:06d}"
            out.append(StoredEvent(
                i + 1, wire["id"], ts, received, wire["type"], wire["actor"], wire["target"],
                stream, version, correlation, wire.get("causation_id"),
                encoder.encode(wire["tags"]), encoder.encode(wire["data"]), pid, uid, gid, comm,
                id_hash(wire["id"])))
        return out

    def records(self, start: int, stop: int, batch: int = 4096,
                dead_letter_every: int = 0) -> Iterator[tuple[int, bytes]]:
        """(seq, E) of events start..stop-1; with `dead_letter_every`, every such seq holds
        a dead letter instead (its event is not made)."""
        for at in range(start, stop, batch):
            for event in self.events(at, min(stop, at + batch)):
                if dead_letter_every and event.seq % dead_letter_every == 0:
                    yield event.seq, dead_letter_record(
                        event.seq, "invalid", "type: required", event.id.encode())
                else:
                    yield event.seq, record_bytes(event)
