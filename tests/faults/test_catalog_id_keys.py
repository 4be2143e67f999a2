"""A catalog row whose packed id keys cannot be read (a store put together outside the
daemon, or damaged): start-up reads the partition's ids from the file itself, writes
them back and logs the repair once, and a duplicate of a sealed event is still found.
When the file cannot be read either, the start fails with one line naming it."""

from __future__ import annotations

import sqlite3
from typing import Any

from conftest import DaemonProcess, wait_sealed_through

from auditd.store.sealing.catalog import unpack_keys

PARTITION = 500


def sealed_store(make_daemon: Any) -> DaemonProcess:
    daemon: DaemonProcess = make_daemon({"storage": {"partition_events": PARTITION}})
    with daemon.connect() as conn:
        for start in range(0, 700, 100):
            assert conn.request([{"type": "test.keys", "id": f"ev-{i}"}
                                 for i in range(start, start + 100)])["ok"] == 100
    wait_sealed_through(daemon, PARTITION)
    daemon.stop()
    return daemon


def test_unreadable_packed_keys_are_read_from_the_partition(make_daemon: Any) -> None:
    daemon = sealed_store(make_daemon)
    with sqlite3.connect(daemon.db_path) as conn:
        conn.execute("UPDATE partitions SET id_keys = x'00ff'")
    daemon.start()
    repaired = [e for e in daemon.log_events() if e["event"] == "partition_id_keys_rebuilt"]
    assert len(repaired) == 1 and repaired[0]["events"] == PARTITION, repaired
    assert "ZstdError" in repaired[0]["reason"], repaired
    with daemon.connect() as conn:  # a sealed event's id is known again
        reply = conn.request([{"type": "test.keys", "id": "ev-10"}])
    assert reply["duplicates"] == [[0, 11]], reply
    ((blob,),) = daemon.query("SELECT id_keys FROM partitions")
    assert len(unpack_keys(blob)) == PARTITION  # written back: the next start reads it
    daemon.stop()
    daemon.start()
    assert sum(e["event"] == "partition_id_keys_rebuilt" for e in daemon.log_events()) == 1


def test_unreadable_keys_and_file_stop_the_start_with_one_line(make_daemon: Any) -> None:
    daemon = sealed_store(make_daemon)
    ((file,),) = daemon.query("SELECT file FROM partitions")
    with sqlite3.connect(daemon.db_path) as conn:
        conn.execute("UPDATE partitions SET id_keys = x''")
    with sqlite3.connect(daemon.storage / "partitions" / file) as part:  # it opens; its
        part.execute("UPDATE record_stream SET data = x'00'")  # records do not read
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) != 0
    text = daemon.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert f"partition {file}: its id keys are unreadable" in text, text[-3000:]
