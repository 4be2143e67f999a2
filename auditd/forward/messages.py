"""The messages of one forwarding step, read from a snapshot of the store in a thread.

proofs.md, "Forwarded messages": each seq is one message (a dead letter's too) whose
body is the record E byte for byte, with the headers `Nats-Msg-Id`
(`{host_id}:{store_epoch}:{seq}`), `Auditd-Seq`, `Auditd-Id`, `Auditd-Stream-Seq` when
set, `Auditd-Leaf` (the leaf hash, base64) and `Auditd-Dead-Letter: 1`. Each checkpoint
is one message on `audit.{host}._checkpoint`, its body the checkpoint text.
"""

from __future__ import annotations

import base64
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import msgspec

from auditd.proofs.merkle import leaf_hash
from auditd.proofs.records import RecordSource

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
CHECKPOINT_TOKEN = "_checkpoint"
DEAD_LETTER_TOKEN = "_dead_letter"


class _Heads(msgspec.Struct, kw_only=True):
    """The fields of a record E that a message's subject and headers carry."""

    id: str | None = None
    type: str | None = None
    stream: str | None = None
    stream_seq: int | None = None
    dead_letter: bool = False


_heads = msgspec.msgpack.Decoder(_Heads)


def token(value: str | None, empty: str = "_") -> str:
    """A subject token: characters outside [A-Za-z0-9_-] become `_`."""
    return _UNSAFE.sub("_", value) if value else empty


def render_subject(template: str, host: str, kind: str, stream: str) -> str:
    """`forward.subject` with its tokens put in (sanitised tokens, or wildcards)."""
    return template.replace("{host}", host).replace("{type}", kind).replace("{stream}",
                                                                            stream)


def checkpoint_subject(host: str) -> str:
    return f"audit.{host}.{CHECKPOINT_TOKEN}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the messages come from: the store's host id and epoch."""

    host: str
    epoch: str

    def msg_id(self, seq: int) -> str:
        return f"{self.host}:{self.epoch}:{seq}"

    def checkpoint_subject(self) -> str:
        return checkpoint_subject(token(self.host))


@dataclass(frozen=True, slots=True)
class Message:
    seq: int  # 0 for a checkpoint
    subject: str
    body: bytes
    headers: dict[str, str]
    checkpoint_size: int = 0


def identity_of(db: sqlite3.Connection) -> Identity:
    rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('host_id', "
                           "'store_epoch')").fetchall())
    return Identity(str(rows["host_id"]), str(rows["store_epoch"]))


def event_message(seq: int, record: bytes, who: Identity, subject: str) -> Message:
    heads = _heads.decode(record)
    leaf = base64.b64encode(leaf_hash(record)).decode()
    headers = {"Nats-Msg-Id": who.msg_id(seq), "Auditd-Seq": str(seq), "Auditd-Leaf": leaf}
    if heads.dead_letter:
        headers["Auditd-Dead-Letter"] = "1"
        kind = DEAD_LETTER_TOKEN
    else:
        headers["Auditd-Id"] = heads.id or ""
        if heads.stream_seq is not None:
            headers["Auditd-Stream-Seq"] = str(heads.stream_seq)
        kind = token(heads.type)
    name = render_subject(subject, token(who.host), kind, token(heads.stream, "_none"))
    return Message(seq, name, record, headers)


def checkpoint_message(size: int, text: str, who: Identity) -> Message:
    headers = {"Nats-Msg-Id": f"{who.host}:{who.epoch}:checkpoint:{size}",
               "Auditd-Checkpoint-Size": str(size)}
    return Message(0, who.checkpoint_subject(), text.encode(), headers, size)


@dataclass(slots=True)
class Step:
    """Seqs [first, last] (every one, or a gap the store cannot fill) and the stored
    checkpoints that the step completes, in size order."""

    messages: list[Message]
    last: int
    missing: list[int]


def read_step(db_path: Path, partitions_dir: Path, subject: str, first: int, last: int,
              checkpoint_after: int) -> Step:
    """Messages for seqs [first, last] followed by those of the checkpoints with sizes in
    (checkpoint_after, last]: a checkpoint goes out after the events it covers."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")
        who = identity_of(db)
        source = RecordSource(db, partitions_dir)
        try:
            messages = [event_message(seq, record, who, subject)
                        for seq, record in source.records(first, last)]
        finally:
            source.close()
        held = {m.seq for m in messages}
        missing = [seq for seq in range(first, last + 1) if seq not in held] \
            if len(held) != last - first + 1 else []
        for size, text in db.execute(
                "SELECT size, text FROM checkpoints WHERE size > ? AND size <= ? "
                "ORDER BY size, id", (checkpoint_after, last)):
            messages.append(checkpoint_message(int(size), str(text), who))
    finally:
        db.close()
    return Step(messages, last, missing)
