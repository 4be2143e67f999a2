"""The manifest that opens every export file (proofs.md, "Export files").

Its keys, in this order: `format` ("auditd-export"), `version` (1), `host` (the
exporting store's host id), `first_seq`, `last_seq` (the seq range the export
covers), `count` (the records that follow), `filters` (filter name -> values, empty
for none) and `checkpoint` (the text of a signed checkpoint of size >= last_seq); after
retention, `prefix` (the prune point the range starts after: docs/design/retention.md).
A reader checks the records against it: their number, their range, and for a complete
export the checkpoint's root over their leaves (the prefix's hashes first).
"""

from __future__ import annotations

import msgspec

from auditd.errors import AuditdError

FORMATS = ("jsonl", "msgpack")  # an export file's two formats (--format)

FORMAT = "auditd-export"
VERSION = 1


class ManifestError(AuditdError):
    """An export file whose manifest is missing, unreadable, or does not match what
    follows it; the message names what differs."""


class Prefix(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """What stands for the seqs below `first_seq` that retention deleted: its prune
    point (the compact range of the first `size` leaves, largest subtree first, and a
    checkpoint of that size), so that an export or archive starting after it still
    rebuilds the tree's root (an extension of proofs.md's manifest, omitted when there
    is no prune point)."""

    size: int
    compact: list[bytes]
    checkpoint: str


class Manifest(msgspec.Struct, gc=False, omit_defaults=True):
    format: str
    version: int
    host: str
    first_seq: int
    last_seq: int
    count: int
    filters: dict[str, list[str]]
    checkpoint: str
    prefix: Prefix | None = None

    @property
    def complete(self) -> bool:
        """Unfiltered: every seq of the range is in the file, dead letters included."""
        return not self.filters


_msgpack_decoder = msgspec.msgpack.Decoder(Manifest)
_json_decoder = msgspec.json.Decoder(Manifest)
_msgpack_encode = msgspec.msgpack.Encoder().encode
_json_encode = msgspec.json.Encoder().encode


def encode(manifest: Manifest, fmt: str) -> bytes:
    """The manifest as the file's first value: a MessagePack map, or a JSON line."""
    if fmt == "msgpack":
        return _msgpack_encode(manifest)
    return _json_encode(manifest) + b"\n"


def decode(raw: bytes | memoryview, fmt: str) -> Manifest:
    """A file's first value as a manifest; ManifestError naming the field otherwise."""
    try:
        manifest = (_msgpack_decoder if fmt == "msgpack" else _json_decoder).decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError too: it names the field
        raise ManifestError(f"the file does not start with an export manifest: {exc}") from None
    if manifest.format != FORMAT:
        raise ManifestError(f"manifest format {manifest.format!r}: expected {FORMAT!r}")
    if manifest.version != VERSION:
        raise ManifestError(f"manifest version {manifest.version}: this auditd reads "
                            f"version {VERSION}")
    if manifest.first_seq < 1 or manifest.last_seq < manifest.first_seq - 1:
        raise ManifestError(f"manifest seq range {manifest.first_seq}..{manifest.last_seq} "
                            "is not a range")
    if manifest.count < 0:
        raise ManifestError(f"manifest count {manifest.count} is negative")
    return manifest
