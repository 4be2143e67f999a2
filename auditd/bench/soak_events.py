"""The soak's events: event number i of a seed, computed from (seed, i) alone.

Cardinalities are issue 12's: 50 types (Zipf-skewed: the commonest ~22 % of events,
the rarest ~0.4 %), 5,000 actors, 100,000 targets, 20,000 streams (every event has
one, as the bench's `make_event` gives, and none an `expect`: no conflicts), 5
events per correlation id, 2-3 tags and a small data map, ~390 bytes encoded. No
event depends on a random state or on another event's draw, so any process makes any
batch, in any order, in bounded memory: the clients make their batches as they send
them, and the baseline makes the same events again.

Correlation groups interleave as concurrent operations do: each block of 40 events
holds 8 groups of 5 (i, i+8, i+16, ...), each later event caused by the one before it
in its group. Ids are UUIDv7 strings whose millisecond is i // 50 past 2026-01-01,
with i % 50 in their low bits: unique, and time-ordered as a client library's are, so
the daemon's id key (schema.id_hash) appends as it does in production.

Made for speed, since the clients share the daemon's cores: strings come from pools
built once per process, and the 64 bits of one splitmix64 hash per event choose every
field (~11 us an event with its encoding on the loaded 2-core machine, where the
daemon spends ~10 times that; assembling pre-encoded MessagePack by hand saved only a
fifth of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from auditd.ingest.framing import encode_frame
from auditd.schema import encoder

TYPES, ACTORS, TARGETS, STREAMS = 50, 5_000, 100_000, 20_000
PER_CORRELATION = 5
MAX_EVENT_BYTES = 480  # no event encodes larger (the tests check 200k events)
_GROUPS = 8  # correlation groups interleaved in each block of 40 events
_BLOCK = PER_CORRELATION * _GROUPS
_EVENTS_PER_MS = 50
_ID_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
_M64 = (1 << 64) - 1
_SLOTS = 4096  # the type is one of 4,096 slots (12 bits), weighted 1/(rank+1)
_DOMAINS = ("user", "file", "process", "network", "auth",
            "config", "service", "db", "api", "admin")
_VERBS = ("created", "read", "updated", "deleted", "denied")
_REGIONS = ("eu-west-1", "eu-central-1", "us-east-1", "us-west-2")
_OUTCOMES = ("success", "success", "success", "failure")
_AGENTS = ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "curl/8.5.0", "python-requests/2.32.3", "Go-http-client/2.0",
           "kube-probe/1.30", "aws-sdk-go-v2/1.30.3 os/linux lang/go#1.22.5")
_METHODS = ("GET", "GET", "GET", "POST", "PUT", "DELETE", "GET", "PATCH")
_STATUSES = (200, 200, 201, 204, 403, 404, 500, 200)
_VARIANT = "89ab"


def mix(x: int) -> int:
    """splitmix64's finaliser: 64 well-mixed bits of any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _type_slots() -> tuple[str, ...]:
    names = [f"{domain}.{verb}" for domain in _DOMAINS for verb in _VERBS]
    cumulative = list(accumulate(1 / (rank + 1) for rank in range(TYPES)))
    slots, rank = [], 0
    for slot in range(_SLOTS):
        while cumulative[rank] < (slot + 0.5) / _SLOTS * cumulative[-1]:
            rank += 1
        slots.append(names[rank])
    return tuple(slots)


class SoakEvents:
    """The events of one seed. Building one costs ~10 MB of string pools (per process)."""

    def __init__(self, seed: int) -> None:
        self.key = mix(seed)
        self.types = _type_slots()
        self.actors = [f"user{a:04d}@corp.example" if a % 10 else f"svc-batch-{a:04d}"
                       for a in range(ACTORS)]
        self.targets = [f"/srv/app{t % 40:02d}/objects/{t:06d}.json" for t in range(TARGETS)]
        self.streams = [f"account-{s:05d}" for s in range(STREAMS)]
        self.ips = [f"10.{x >> 8}.{x & 255}.{(x * 37 + 11) & 255}" for x in range(4096)]
        # Shared by the events that draw them: msgspec encodes a dict as often as asked.
        self.tags = [{"env": "staging" if k & 7 == 0 else "prod", "region": _REGIONS[k >> 3 & 3],
                      **({"outcome": _OUTCOMES[k >> 5 & 3]} if k & 128 else {})}
                     for k in range(256)]
        # Within one ms, id_hash keys differ by the id's last 20 bits: i % 50 is in them.
        self.suffixes = [f"{(k * 0x2F3 & 0x3FFF) << 6 | k:05x}" for k in range(_EVENTS_PER_MS)]
        self._prefixes: dict[int, str] = {}

    def event_id(self, i: int, h: int) -> str:
        """Event i's id (h is its hash): UUIDv7, version 7, variant 10."""
        ms = i // _EVENTS_PER_MS
        prefix = self._prefixes.get(ms)
        if prefix is None:
            if len(self._prefixes) > 4096:
                self._prefixes.clear()
            at = _ID_EPOCH_MS + ms
            prefix = self._prefixes[ms] = f"{at >> 16:08x}-{at & 0xFFFF:04x}-7"
        hx = h.to_bytes(8, "big").hex()
        return (prefix + hx[:3] + "-" + _VARIANT[h >> 62] + hx[3:6] + "-" + hx[6:13]
                + self.suffixes[i % _EVENTS_PER_MS])

    def correlation_id(self, group: int) -> str:
        x = mix(group ^ self.key ^ 0x5A5A)
        return (x.to_bytes(8, "big") + (x * 0x2545F4914F6CDD1D & _M64).to_bytes(8, "big")).hex()

    def events(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Events number start..stop-1, as a client sends them (no `ts`: the daemon
        stamps its receive time)."""
        numbers = range(start, stop)
        hashes = [mix(self.key ^ i) for i in numbers]
        ids = [self.event_id(i, h) for i, h in zip(numbers, hashes, strict=True)]
        correlations: dict[int, str] = {}
        out = []
        for i, h, own_id in zip(numbers, hashes, ids, strict=True):
            group = i // _BLOCK * _GROUPS + i % _GROUPS
            correlation = correlations.get(group)
            if correlation is None:
                correlation = correlations[group] = self.correlation_id(group)
            g = h * 0xD6E8FEB86659FD93 & _M64  # more bits for the payload: cheap, not mixed
            event: dict[str, Any] = {
                "type": self.types[h & (_SLOTS - 1)], "actor": self.actors[(h >> 12) % ACTORS],
                "target": self.targets[(h >> 25) % TARGETS], "id": own_id,
                "stream": self.streams[(h >> 42) % STREAMS], "correlation_id": correlation}
            if i % _BLOCK >= _GROUPS:  # caused by its group's previous event
                cause = i - _GROUPS
                event["causation_id"] = (ids[cause - start] if cause >= start
                                         else self.event_id(cause, mix(self.key ^ cause)))
            event["tags"] = self.tags[g >> 56]
            event["data"] = {
                "ip": self.ips[g >> 8 & 4095], "port": 1024 + (g >> 20) % 60_000,
                "method": _METHODS[g >> 36 & 7], "status": _STATUSES[g >> 39 & 7],
                "bytes": (g >> 24) % 1_000_000, "duration_ms": (g >> 42) % 5000,
                "agent": _AGENTS[(g >> 50) % len(_AGENTS)]}
            out.append(event)
        return out

    def frame(self, start: int, stop: int) -> bytes:
        """Events number start..stop-1 as one batch frame."""
        return encode_frame(encoder.encode(self.events(start, stop)))


def client_batches(client: int, clients: int, size: int, total: int) -> range:
    """The batch numbers a client sends: round-robin, so that the store receives events
    in about their number order, as from one busy host."""
    return range(client, (total + size - 1) // size, clients)


def client_events(client: int, clients: int, size: int, total: int) -> int:
    """How many events a client sends."""
    return sum(min(size, total - b * size) for b in client_batches(client, clients, size, total))


class ClientFrames(Sequence[bytes]):
    """One client's frames, each made when `drive` asks for it (in order, once each):
    frame j is batch number `client_batches(...)[j]`, encoded. Nothing is kept."""

    def __init__(self, client: int, clients: int, size: int, total: int, seed: int) -> None:
        self.batches = client_batches(client, clients, size, total)
        self.size, self.total = size, total
        self.source = SoakEvents(seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> bytes:  # type: ignore[override]  # no slices
        start = self.batches[j] * self.size
        return self.source.frame(start, min(self.total, start + self.size))
