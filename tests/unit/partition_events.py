"""Events for the sealed-partition tests, and the brute-force answers their queries
must agree with.

Unlike the soak's events these are made to reach every path in a small partition:
few values per field (so terms get long), absent fields, nested and non-ASCII data,
a tag value holding "=", ts out of order now and then, dead letters.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from auditd.schema import StoredEvent, encoder, id_hash
from auditd.store.partition.layout import words
from auditd.store.records import dead_letter_record, record_bytes

TYPES = ["user.login", "user.logout", "file.read", "file.write", "admin.grant", "db.query"]
ACTORS = ["alice@corp.example", "bob@corp.example", "svc-batch", "Zoë Ünal", "root"]
TAG_VALUES = {"env": ["prod", "staging"], "region": ["eu-west-1", "us-east-1", "ap"],
              "note": ["a=b", "plain"]}
DATA_WORDS = ["alpha", "beta", "gamma", "Grüße", "ÉCOLE", "delta-7", "x_y", "42"]
START = 1_767_225_600_000_000_000

Item = tuple[int, bytes, StoredEvent | None]  # seq, record, event (None: dead letter)


def varied_items(count: int, seed: int = 7, first_seq: int = 1,
                 dead_every: int = 53) -> list[Item]:
    rng = random.Random(seed)
    versions: dict[str, int] = {}
    items: list[Item] = []
    ids: list[str] = []
    for seq in range(first_seq, first_seq + count):
        if dead_every and seq % dead_every == 0:
            items.append((seq, dead_letter_record(seq, "invalid", "type: required",
                                                  b"raw %d" % seq), None))
            continue
        event_id = (f"evt-{seed}-{seq}" if rng.random() < 0.3 else
                    f"019b76da-{seq % 65536:04x}-7{rng.getrandbits(12):03x}-"
                    f"8{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}")
        stream = rng.choice([None, *(f"acct-{s}" for s in range(12))])
        stream_seq = None
        if stream is not None:
            stream_seq = versions[stream] = versions.get(stream, 0) + 1
        received = START + seq * 1_000_000_000
        ts = received - rng.randrange(3_000_000_000)
        if rng.random() < 0.02:
            ts = START + rng.randrange(count) * 1_000_000_000  # a client clock far off
        tags = {key: rng.choice(values) for key, values in TAG_VALUES.items()
                if rng.random() < 0.6}
        event = StoredEvent(
            seq, event_id, ts, received, rng.choice(TYPES),
            rng.choice([None, *ACTORS]),
            rng.choice([None, *(f"/srv/obj/{t:03d}.json" for t in range(40))]),
            stream, stream_seq,
            rng.choice([None, *(f"op-{c}" for c in range(max(1, count // 20)))]),
            rng.choice(ids) if ids and rng.random() < 0.4 else None,
            encoder.encode(tags) if tags else None, _data(rng),
            rng.randrange(100, 110), rng.choice([0, 1000, 1001]), 1000,
            rng.choice(["python3", "curl", "auditctl"]), id_hash(event_id))
        ids.append(event_id)
        items.append((seq, record_bytes(event), event))
    return items


def _data(rng: random.Random) -> bytes | None:
    shape = rng.randrange(6)
    if shape == 0:
        return None
    if shape == 1:
        return encoder.encode(" ".join(rng.sample(DATA_WORDS, 2)))
    if shape == 2:
        return encoder.encode([rng.choice(DATA_WORDS), 5, {"deep": rng.choice(DATA_WORDS)}])
    return encoder.encode({"ip": f"10.0.{rng.randrange(4)}.{rng.randrange(9)}",
                           "n": rng.randrange(1000), "ok": True, "none": None,
                           "nested": {"why": rng.choice(DATA_WORDS), "list": ["omega", 3.5]},
                           "bin": b"\x00\x01"})


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


# Keyed by everything the words come from: tests make events of the same seq and id
# with other content (another seed), and a stale entry made one of them fail.
_words_cache: dict[tuple[object, ...], set[str]] = {}


def event_words(event: StoredEvent) -> set[str]:
    key = (event.seq, event.id, event.type, event.actor, event.target, event.tags, event.data)
    found = _words_cache.get(key)
    if found is None:
        found = _words_cache[key] = _event_words(event)
    return found


def _event_words(event: StoredEvent) -> set[str]:
    tags = msgspec.msgpack.decode(event.tags) if event.tags else {}
    texts = [event.type, event.actor, event.target, *tags.values()]
    if event.data is not None:
        texts += _strings(msgspec.msgpack.decode(event.data))
    return {word for text in texts if text is not None for word in words(text)}


def event_matches(event: StoredEvent, filters: Mapping[str, Sequence[str]]) -> bool:
    tags = msgspec.msgpack.decode(event.tags) if event.tags else {}
    for name, values in filters.items():
        if name == "q":
            wanted = {word for value in values for word in words(value)}
            if not wanted <= event_words(event):
                return False
        elif name == "tag":
            if not any(tags.get(v.partition("=")[0]) == v.partition("=")[2] for v in values):
                return False
        elif name == "uid":
            if str(event.uid) not in values:
                return False
        elif getattr(event, name) not in values:
            return False
    return True


def brute_query(items: list[Item], filters: Mapping[str, Sequence[str]], *,
                since_ns: int | None = None, until_ns: int | None = None,
                after_seq: int | None = None, before_seq: int | None = None, limit: int,
                descending: bool = True) -> list[int]:
    found = [seq for seq, _, event in items if event is not None
             and (since_ns is None or event.ts >= since_ns)
             and (until_ns is None or event.ts < until_ns)
             and (after_seq is None or seq > after_seq)
             and (before_seq is None or seq < before_seq)
             and event_matches(event, filters)]
    if descending:
        found.reverse()
    return found[:limit]
