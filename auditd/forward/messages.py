"""The messages of one forwarding step, read from a snapshot of the store in a thread.

proofs.md, "Forwarded messages": each seq is one message (a dead letter's too) whose
body is the record E byte for byte, with the headers `Nats-Msg-Id`
(`{host_id}:{store_epoch}:{seq}`), `Auditd-Seq`, `Auditd-Id`, `Auditd-Stream-Seq` when
set, `Auditd-Leaf` (the leaf hash, base64) and `Auditd-Dead-Letter: 1`. Each checkpoint
is one message on `audit.{host}._checkpoint`, its body the checkpoint text.
"""

from __future__ import annotations

import base64
import functools
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import msgspec

from auditd.forward.wire import header_block, hpub
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


@functools.lru_cache(maxsize=4096)
def _event_subject(template: str, host: str, kind: str | None, stream: str | None,
                   dead_letter: bool) -> str:
    """An event's subject, from its raw tokens: a store holds few types and streams, and
    sanitising each message's anew was a tenth of the reader's time."""
    return render_subject(template, token(host), DEAD_LETTER_TOKEN if dead_letter
                          else token(kind), token(stream, "_none"))


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
    else:
        headers["Auditd-Id"] = heads.id or ""
        if heads.stream_seq is not None:
            headers["Auditd-Stream-Seq"] = str(heads.stream_seq)
    name = _event_subject(subject, who.host, heads.type, heads.stream, heads.dead_letter)
    return Message(seq, name, record, headers)


def checkpoint_message(size: int, text: str, who: Identity) -> Message:
    headers = {"Nats-Msg-Id": f"{who.host}:{who.epoch}:checkpoint:{size}",
               "Auditd-Checkpoint-Size": str(size)}
    return Message(0, who.checkpoint_subject(), text.encode(), headers, size)


@dataclass(slots=True)
class Step:
    """Seqs [first, last] (every one, or a gap the store cannot fill) and the stored
    checkpoints that the step completes, in size order, framed as HPUB commands that ask
    for their acks at `<reply prefix>.<first>.<index>` (forward.acks)."""

    first: int
    last: int
    count: int  # messages
    commands: bytes
    payload_bytes: int
    checkpoint_sizes: list[int]
    missing: list[int]
    oversized: tuple[str, int] | None = None  # (which, bytes): past max_payload


def frame(messages: list[Message], first: int, last: int, reply_prefix: str,
          max_payload: int) -> Step:
    """The step of these messages: commands, and what the forwarder's cursor needs. A body
    past the servers' `max_payload` ends the step before it (and the checkpoints it
    would cover), named in `oversized`: what precedes it still goes out."""
    oversized = None
    big = next((m for m in messages if len(m.body) > max_payload), None)
    if big is not None:
        oversized = (f"seq {big.seq}" if big.seq else
                     f"the checkpoint of size {big.checkpoint_size}", len(big.body))
        before = messages[:messages.index(big)]
        if big.seq:  # the checkpoints (which come after the events) that it leaves whole
            last = big.seq - 1
            before += [m for m in messages if not m.seq and m.checkpoint_size <= last]
        messages = before
    reply = f"{reply_prefix}.{first}."
    commands = b"".join(hpub(m.subject, f"{reply}{index}", header_block(m.headers), m.body)
                        for index, m in enumerate(messages))
    held = {m.seq for m in messages if m.seq}
    missing = [seq for seq in range(first, last + 1) if seq not in held] \
        if len(held) != last - first + 1 else []
    return Step(first, last, len(messages), commands, sum(len(m.body) for m in messages),
                [m.checkpoint_size for m in messages if m.seq == 0], missing, oversized)


def read_step(db_path: Path, partitions_dir: Path, subject: str, first: int, last: int,
              checkpoint_after: int, reply_prefix: str, max_payload: int) -> Step:
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
        for size, text in db.execute(
                "SELECT size, text FROM checkpoints WHERE size > ? AND size <= ? "
                "ORDER BY size, id", (checkpoint_after, last)):
            messages.append(checkpoint_message(int(size), str(text), who))
    finally:
        db.close()
    return frame(messages, first, last, reply_prefix, max_payload)
