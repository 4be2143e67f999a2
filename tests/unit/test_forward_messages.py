"""The forwarded message of a seq (proofs.md "Forwarded messages"): the record E as the
body, the headers, the subject's tokens sanitised; a dead letter's seq is a message too.
And the stream checks: each setting that would lose data is named."""

from __future__ import annotations

import base64
import hashlib

from nats.js import api

from auditd.forward.messages import Identity, checkpoint_message, event_message, token
from auditd.forward.stream import problems, subject_matches, subjects_for
from auditd.schema import StoredEvent
from auditd.store.records import dead_letter_record, record_bytes

WHO = Identity("host-1", "0b6c1f4e-epoch")


def stored(seq: int, **fields: object) -> StoredEvent:
    base: dict[str, object] = {
        "seq": seq, "id": f"id-{seq}", "ts": 1, "received_at": 2, "type": "user.login",
        "actor": "alice", "target": None, "stream": None, "stream_seq": None,
        "correlation_id": None, "causation_id": None, "tags": None, "data": None,
        "pid": 10, "uid": 1000, "gid": 1000, "comm": "sshd", "id_hash": 0}
    base.update(fields)
    return StoredEvent(**base)  # type: ignore[arg-type]


def test_an_event_message_carries_the_record_and_its_headers() -> None:
    record = record_bytes(stored(7, stream="orders/42", stream_seq=3))
    message = event_message(7, record, WHO, "audit.{host}.{type}.{stream}")
    assert message.body == record
    assert message.subject == "audit.host-1.user_login.orders_42"
    assert message.headers == {
        "Nats-Msg-Id": "host-1:0b6c1f4e-epoch:7", "Auditd-Seq": "7", "Auditd-Id": "id-7",
        "Auditd-Stream-Seq": "3",
        "Auditd-Leaf": base64.b64encode(hashlib.sha256(b"\0" + record).digest()).decode()}


def test_a_dead_letter_seq_is_a_message_marked_as_one() -> None:
    record = dead_letter_record(9, "commit_failed", "disk full", b"raw bytes")
    message = event_message(9, record, WHO, "audit.{host}.{type}")
    assert message.subject == "audit.host-1._dead_letter" and message.body == record
    assert message.headers["Auditd-Dead-Letter"] == "1" and "Auditd-Id" not in message.headers
    assert message.headers["Nats-Msg-Id"] == "host-1:0b6c1f4e-epoch:9"


def test_checkpoints_go_on_their_own_subject() -> None:
    message = checkpoint_message(100, "auditd/host-1\n100\nroot\n", WHO)
    assert message.subject == "audit.host-1._checkpoint" and message.checkpoint_size == 100
    assert token("a.b c*>") == "a_b_c__" and token(None) == "_"


def test_stream_settings_that_lose_data_are_each_named() -> None:
    subjects = subjects_for("audit.{host}.{type}")
    assert subjects == ["audit.*.*"]
    assert subject_matches("audit.>", "audit.h.x") and not subject_matches("audit.*", "audit.h.x")
    safe = api.StreamConfig(name="AUDIT", subjects=subjects, deny_delete=True, deny_purge=True,
                            discard=api.DiscardPolicy.NEW, storage=api.StorageType.FILE,
                            duplicate_window=600, retention=api.RetentionPolicy.LIMITS)
    assert problems(safe, ["audit.h.x", "audit.h._checkpoint"]) == []
    bad = api.StreamConfig(name="AUDIT", subjects=["other.>"], storage=api.StorageType.MEMORY,
                           retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=60)
    found = " / ".join(problems(bad, ["audit.h.x"]))
    for named in ("deny_delete", "deny_purge", "discard is old", "retention is workqueue",
                  "duplicate_window is 60s", "storage is memory", "do not take audit.h.x"):
        assert named in found, found
