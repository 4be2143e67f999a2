"""Records E and sealing: the record codecs, what seal_partition refuses, and what a
crash or an earlier sealer's leftover leaves behind (real files, a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from partition_events import varied_items

from auditd.bench.sealed_events import StoredSoakEvents
from auditd.schema import StoredEvent, encoder, id_hash
from auditd.store.partition import PartitionInputError, SealedPartition, seal_partition
from auditd.store.records import (
    dead_letter_from_record,
    dead_letter_record,
    event_from_record,
    is_dead_letter,
    record_bytes,
    record_seq,
)

KEY_ORDER = ["seq", "id", "ts", "received_at", "type", "actor", "target", "stream",
             "stream_seq", "correlation_id", "causation_id", "tags", "data", "pid", "uid",
             "gid", "comm"]
int64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=40)
optional_text = st.none() | text
msgpack_values = st.recursive(
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | text | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12)


@st.composite
def stored_events(draw: st.DrawFn) -> StoredEvent:
    event_id = draw(st.text(min_size=1, max_size=60))
    tags = draw(st.none() | st.dictionaries(text, text, max_size=4))
    data = draw(st.none() | msgpack_values)
    return StoredEvent(
        draw(st.integers(1, 2**63 - 1)), event_id, draw(int64), draw(int64),
        draw(st.text(min_size=1, max_size=40)), draw(optional_text), draw(optional_text),
        draw(optional_text), draw(st.none() | st.integers(1, 2**63 - 1)), draw(optional_text),
        draw(optional_text), None if tags is None else encoder.encode(tags),
        None if data is None else encoder.encode(data), draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)), draw(text),
        id_hash(event_id))


@settings(max_examples=100, deadline=None)
@given(stored_events())
def test_record_round_trip_and_plain_decode(event: StoredEvent) -> None:
    record = record_bytes(event)
    assert event_from_record(record) == event
    assert not is_dead_letter(record) and record_seq(record) == event.seq
    plain = msgspec.msgpack.decode(record)  # no schema: what any decoder sees
    fields = {name: getattr(event, name) for name in KEY_ORDER}
    fields["tags"] = None if event.tags is None else msgspec.msgpack.decode(event.tags)
    fields["data"] = None if event.data is None else msgspec.msgpack.decode(event.data)
    assert list(plain) == [name for name in KEY_ORDER if fields[name] is not None]
    assert plain == {name: value for name, value in fields.items() if value is not None}


def test_payloads_are_embedded_byte_for_byte() -> None:
    data = b"\x82\xa1b\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\xa1a\x01"  # 1.0 as a float64
    event = StoredEvent(3, "x", 1, 2, "t", None, None, None, None, None, None,
                        b"\x80", data, 1, 2, 3, "c", id_hash("x"))
    record = record_bytes(event)
    assert data in record and b"\xa4tags\x80" in record
    assert event_from_record(record).data == data


def test_dead_letter_record() -> None:
    record = dead_letter_record(9, "invalid", "type: required", b"raw frame")
    plain = msgspec.msgpack.decode(record)
    assert list(plain) == ["seq", "dead_letter", "code", "reason", "raw_sha256"]
    assert plain["dead_letter"] is True and len(plain["raw_sha256"]) == 32
    assert is_dead_letter(record) and record_seq(record) == 9
    assert dead_letter_from_record(record).code == "invalid"
    with pytest.raises(ValueError, match="dead letter"):
        event_from_record(record)


def _records(count: int, first: int = 1) -> list[tuple[int, bytes]]:
    return [(seq, record) for seq, record, _ in varied_items(count, first_seq=first)]


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r[:10] + r[11:], "gap: seq 12 follows seq 10"),
    (lambda r: [*r[:10], r[11], r[10], *r[12:]], "gap: seq 12 follows seq 10"),
    (lambda r: [*r[:10], r[10], r[9], *r[11:]], "disorder: seq 10 after seq 11"),
    (lambda r: [*r, (301, r[0][1])], "past the range"),
    (lambda r: r[:-1], "ended at seq 299"),
    (lambda r: [*r[:5], (6, r[6][1]), *r[6:]], "given as seq 6 holds seq 7"),
])
def test_bad_input_is_refused_and_leaves_nothing(tmp_path: Path, change, message) -> None:  # type: ignore[no-untyped-def]
    records = change(_records(300))[:301]
    with pytest.raises(PartitionInputError, match=message):
        seal_partition(iter(records), tmp_path, 1, 300)
    assert list(tmp_path.iterdir()) == []


def test_sealed_info_and_names(tmp_path: Path) -> None:
    seen: list[int] = []
    info = seal_partition(iter(_records(2000, first=1001)), tmp_path, 1001, 3000,
                          progress=seen.append, run_records=512)
    assert info.path == tmp_path / "p000000001001-000000003000.db"
    assert (info.first_seq, info.last_seq, info.count) == (1001, 3000, 2000)
    assert info.bytes == info.path.stat().st_size and info.dictionary_id != 0
    assert info.format_version == 1 and info.seconds > 0
    assert seen == [512, 1024, 1536, 2000]
    assert [p.name for p in tmp_path.iterdir()] == [info.path.name]
    with pytest.raises(FileExistsError):
        seal_partition(iter(_records(2000, first=1001)), tmp_path, 1001, 3000)


def test_small_partition_has_no_dictionary(tmp_path: Path) -> None:
    info = seal_partition(iter(_records(999)), tmp_path, 1, 999)
    assert info.dictionary_id == 0
    with SealedPartition(info.path) as part:
        assert part.check() == [] and part.record(999) == _records(999)[-1][1]


def test_soak_events_seal_and_check(tmp_path: Path) -> None:
    records = StoredSoakEvents(3).records(0, 1500, dead_letter_every=97)
    info = seal_partition(records, tmp_path, 1, 1500, run_records=512)
    with SealedPartition(info.path) as part:
        assert part.check() == []
        assert len(part.dead_letters()) == 1500 // 97


def test_leftover_temp_file_is_replaced(tmp_path: Path) -> None:
    temp = tmp_path / ".p000000000001-000000000300.tmp"
    temp.write_bytes(b"half a file from a sealer killed earlier")
    info = seal_partition(iter(_records(300)), tmp_path, 1, 300)
    assert not temp.exists()
    with SealedPartition(info.path) as part:
        assert part.check() == []


_KILLED_SEALER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from partition_events import varied_items
from auditd.store.partition import seal_partition

def records():
    for seq, record, _ in varied_items(4000):
        if seq == 1300:
            Path({marker!r}).write_text("stuck")
            time.sleep(60)  # killed here, with a run spilled
        yield seq, record

seal_partition(records(), Path({directory!r}), 1, 4000, run_records=512)
"""


def test_sigkilled_sealer_leaves_only_a_temp_file(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    directory = tmp_path / "partitions"
    directory.mkdir()
    script = _KILLED_SEALER.format(tests=str(Path(__file__).parent), marker=str(marker),
                                   directory=str(directory))
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert sorted(p.name for p in directory.iterdir()) == [".p000000000001-000000004000.tmp"]
    info = seal_partition(iter(_records(4000)), directory, 1, 4000)
    assert sorted(p.name for p in directory.iterdir()) == [info.path.name]
    with SealedPartition(info.path) as part:
        assert part.check() == []


@pytest.mark.parametrize("data", [b"\xa2\xff\xfe", b"\x81\x80\x02",
                                  b"\xc7\x0c\xff" + b"\xff" * 4 + b"\x00" * 8])
def test_a_record_whose_data_does_not_decode_is_sealed_and_read_whole(
        tmp_path: Path, data: bytes) -> None:
    """Older stores hold such payloads (ingest checks them since 2026-12-02): one of
    them failed its whole partition's seal and held every commit behind it."""
    records = _records(300)
    event = event_from_record(records[149][1])
    bad = record_bytes(msgspec.structs.replace(event, data=data, type="odd.payload"))
    records[149] = (150, bad)
    info = seal_partition(iter(records), tmp_path, 1, 300)
    with SealedPartition(info.path) as part:
        assert part.check() == []
        assert part.record(150) == bad
        assert part.query({"type": ["odd.payload"]}, limit=10) == [150]
        assert part.query({"q": ["odd"]}, limit=10) == [150]  # type's words still found
