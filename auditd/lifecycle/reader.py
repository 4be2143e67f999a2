"""Reading an export file back: its manifest, then its records one by one, either
format, compressed or not; and the check that the records are what the manifest says.

The check reads the whole file before anything is imported, so a file that does not
match its manifest adds no event: a record out of seq order or outside the range, a
missing seq of a complete (unfiltered) export, more or fewer records than `count`, a
value cut by the end of the stream, and, for a complete MessagePack export of the
whole tree (seqs 1 .. the checkpoint's size), leaves whose root is not the
checkpoint's. With a verifier key, the checkpoint's signature is checked too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec

from auditd.lifecycle import jsonl
from auditd.lifecycle.files import json_lines, msgpack_values, open_input
from auditd.lifecycle.manifest import Manifest, ManifestError, Prefix, decode
from auditd.proofs.merkle import HASH_BYTES, compact_heights, fold, leaf_hash, node_hash
from auditd.proofs.notes import NoteError, VerifierKey, origin, parse_checkpoint, verify_checkpoint

_json_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class Record:
    """One record of a file: its seq, and for an event the wire fields to send again."""

    seq: int
    dead_letter: bool
    received_at: int = 0
    raw: bytes = b""  # the record E (MessagePack files)
    wire: dict[str, Any] | None = None


def _sniff(stream: IO[bytes]) -> str:
    """The format from the first byte: `{` opens a JSON line, a map header MessagePack."""
    peek = getattr(stream, "peek", None)
    head = peek(1)[:1] if peek is not None else b""
    if not head:
        return ""
    return "jsonl" if head == b"{" else "msgpack"


@contextlib.contextmanager
def records(path: str) -> Iterator[tuple[Manifest, str, Iterator[Record]]]:
    """(manifest, format, its records) of the file at `path`."""
    stream, _ = open_input(path)
    buffered: Any = stream if hasattr(stream, "peek") else _Buffered(stream)
    try:
        fmt = _sniff(buffered) or "msgpack"
        if fmt == "msgpack":
            values = msgpack_values(buffered)
            first = next(values, None)
            if first is None:
                raise ManifestError("the file is empty: no manifest")
            yield decode(first, fmt), fmt, (_msgpack_record(v) for v in values)
        else:
            lines = json_lines(buffered)
            first = next(lines, None)
            if first is None:
                raise ManifestError("the file is empty: no manifest")
            yield decode(first, fmt), fmt, _json_records(lines)
    finally:
        buffered.close()


class _Buffered:
    """peek() over a zstd reader (which has none)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.head = stream, b""

    def peek(self, n: int) -> bytes:
        if not self.head:
            self.head = self.stream.read(max(n, 1))
        return self.head

    def read(self, n: int = -1) -> bytes:
        if self.head:
            head, self.head = self.head, b""
            return head + self.stream.read(max(0, n - len(head))) if n > 0 else \
                head + self.stream.read()
        return self.stream.read(n)

    def close(self) -> None:
        self.stream.close()


class _Stamp(msgspec.Struct, gc=False):
    """What import needs of any record besides its wire fields (the rest is skipped)."""

    seq: int
    received_at: int = 0
    dead_letter: bool = False


class _Resend(msgspec.Struct, omit_defaults=True, gc=False):
    """An event record's client fields: decoded from E (the daemon's stamps skipped)
    and encoded as the wire event to send again, with no dict in between."""

    id: str
    ts: int
    type: str
    actor: str | None = None
    target: str | None = None
    stream: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tags: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_stamp_decoder = msgspec.msgpack.Decoder(_Stamp)
_resend_decoder = msgspec.msgpack.Decoder(_Resend)
_encode = msgspec.msgpack.Encoder().encode


def _msgpack_record(raw: bytes) -> Record:
    try:
        stamp = _stamp_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ManifestError(f"a record is not an export record: {exc}") from None
    return Record(stamp.seq, stamp.dead_letter, stamp.received_at, raw=raw)


def _json_records(lines: Iterator[bytes]) -> Iterator[Record]:
    for number, line in enumerate(lines, start=2):
        try:
            doc = _json_decode(line)
        except msgspec.DecodeError as exc:
            raise ManifestError(f"line {number}: not a JSON object ({exc}): the file is "
                                "truncated or edited") from None
        seq, dead, received, wire = jsonl.from_json(doc, number)
        yield Record(seq, dead, received, wire=None if dead else wire)


def wire_bytes(record: Record) -> bytes:
    """The event to send again, encoded: its client fields (the daemon stamps the rest)."""
    if record.wire is not None:
        return _encode(record.wire)
    try:
        return _encode(_resend_decoder.decode(record.raw))
    except msgspec.DecodeError as exc:
        raise ManifestError(f"seq {record.seq}: not an event record: {exc}") from None


@dataclass
class FileCheck:
    """What the check found: the file matches its manifest (else ManifestError)."""

    manifest: Manifest
    fmt: str
    events: int = 0
    dead_letters: int = 0
    root_checked: bool = False
    signature_checked: bool = False
    notes: list[str] = field(default_factory=list)


class _Root:
    """The RFC 6962 root of leaves appended one by one (a compact range), after those
    of the prefix."""

    def __init__(self, prefix: Prefix) -> None:
        self.stack = list(zip(compact_heights(prefix.size), prefix.compact, strict=True))

    def append(self, leaf: bytes) -> None:
        height, node = 0, leaf
        while self.stack and self.stack[-1][0] == height:
            node = node_hash(self.stack.pop()[1], node)
            height += 1
        self.stack.append((height, node))

    def root(self) -> bytes:
        return fold([node for _, node in self.stack])


def check_file(path: str, vkey: VerifierKey | None) -> FileCheck:
    """Read the whole file and check it against its manifest (ManifestError names the
    first difference); NoteError when the key does not verify the checkpoint."""
    with records(path) as (manifest, fmt, found):
        check = FileCheck(manifest, fmt)
        try:
            checkpoint, _ = parse_checkpoint(manifest.checkpoint)
        except NoteError as exc:
            raise ManifestError(f"manifest checkpoint: {exc}") from None
        if checkpoint.size < manifest.last_seq:
            raise ManifestError(f"manifest checkpoint size {checkpoint.size} is below its "
                                f"last_seq {manifest.last_seq}")
        if checkpoint.origin != origin(manifest.host):
            raise ManifestError(f"manifest checkpoint origin {checkpoint.origin!r} is not "
                                f"host {manifest.host!r}'s")
        if vkey is not None:
            verify_checkpoint(manifest.checkpoint, vkey)
            check.signature_checked = True
        prefix = _checked_prefix(manifest, vkey, check)
        whole_tree = manifest.complete and manifest.first_seq == prefix.size + 1 \
            and manifest.last_seq == checkpoint.size and fmt == "msgpack"
        tree = _Root(prefix) if whole_tree else None
        previous = manifest.first_seq - 1
        for record in found:
            seq = record.seq
            if seq <= previous or seq > manifest.last_seq:
                raise ManifestError(f"record of seq {seq} is out of order or outside the "
                                    f"manifest's range {manifest.first_seq}.."
                                    f"{manifest.last_seq}")
            if manifest.complete and seq != previous + 1:
                raise ManifestError(f"seq {previous + 1} is missing (the next record holds "
                                    f"seq {seq}): the file is not the complete export its "
                                    "manifest says")
            previous = seq
            if record.dead_letter:
                check.dead_letters += 1
            else:
                check.events += 1
            if tree is not None:
                tree.append(leaf_hash(record.raw))
        count = check.events + check.dead_letters
        if count != manifest.count:
            raise ManifestError(f"the file holds {count} records, its manifest says count "
                                f"{manifest.count}: it is truncated or edited")
        if manifest.complete and previous != manifest.last_seq:
            raise ManifestError(f"the records end at seq {previous}, the manifest's range "
                                f"at {manifest.last_seq}: the file is truncated")
        if tree is not None:
            if tree.root() != checkpoint.root:
                raise ManifestError(f"the records' Merkle root is not the root of the "
                                    f"manifest's checkpoint (size {checkpoint.size}): a "
                                    "record was edited")
            check.root_checked = True
        else:
            check.notes.append(_why_no_root(manifest, fmt, checkpoint.size))
    return check


_NO_PREFIX = Prefix(0, [], "")


def _checked_prefix(manifest: Manifest, vkey: VerifierKey | None, check: FileCheck) -> Prefix:
    """The manifest's prefix, its hashes checked against its checkpoint (and the
    checkpoint's signature with a key); an empty one when it has none."""
    prefix = manifest.prefix
    if prefix is None:
        return _NO_PREFIX
    if len(prefix.compact) != len(compact_heights(prefix.size)) \
            or any(len(h) != HASH_BYTES for h in prefix.compact):
        raise ManifestError(f"manifest prefix: {len(prefix.compact)} hashes do not make the "
                            f"compact range of size {prefix.size}")
    try:
        signed = verify_checkpoint(prefix.checkpoint, vkey) if vkey is not None \
            else parse_checkpoint(prefix.checkpoint)[0]
    except NoteError as exc:
        raise ManifestError(f"manifest prefix checkpoint: {exc}") from None
    if signed.size != prefix.size or signed.root != fold(prefix.compact):
        raise ManifestError(f"manifest prefix: its hashes are not the root its checkpoint "
                            f"of size {signed.size} signs")
    check.notes.append(f"seqs 1..{prefix.size} were deleted by retention before the export; "
                       "the prefix's signed hashes stand for them")
    return prefix


def _why_no_root(manifest: Manifest, fmt: str, size: int) -> str:
    if fmt != "msgpack":
        why = "a JSON lines export does not hold the records E"
    elif not manifest.complete:
        why = "a filtered export does not hold every leaf"
    else:
        why = f"the file holds seqs {manifest.first_seq}..{manifest.last_seq} of a tree of {size}"
    return f"records not checked against the checkpoint's root: {why}"
