"""`auditd verify-proof`: a saved proof checked with nothing but the verifier key."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import msgspec

from auditd.proofs.merkle import consistent, leaf_hash, root_from_inclusion
from auditd.proofs.notes import NoteError, VerifierKey, verify_checkpoint
from auditd.store.records import record_seq


class ProofInvalid(ValueError):
    """What failed, in a sentence."""


def _hashes(values: Any, field: str) -> list[bytes]:
    if not isinstance(values, list):
        raise ProofInvalid(f"{field}: expected a list of base64 hashes")
    out = []
    for value in values:
        try:
            raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
        except binascii.Error:
            raw = b""
        if len(raw) != 32:
            raise ProofInvalid(f"{field}: {value!r} is not a base64 SHA-256 hash")
        out.append(raw)
    return out


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProofInvalid(f"{key}: expected an integer >= 0")
    return value


def _checkpoint(doc: dict[str, Any], key: str, vkey: VerifierKey) -> Any:
    text = doc.get(key)
    if not isinstance(text, str):
        raise ProofInvalid(f"{key}: expected the checkpoint's text")
    try:
        return verify_checkpoint(text, vkey)
    except NoteError as exc:
        raise ProofInvalid(f"{key}: {exc}") from None


def check_proof(text: str, vkey: VerifierKey) -> str:
    """Check an inclusion or consistency proof; what it proves, or ProofInvalid."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ProofInvalid(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProofInvalid("expected a JSON object")
    if "from" in doc:
        return _consistency(doc, vkey)
    return _inclusion(doc, vkey)


def _inclusion(doc: dict[str, Any], vkey: VerifierKey) -> str:
    seq, index, size = _int(doc, "seq"), _int(doc, "index"), _int(doc, "size")
    checkpoint = _checkpoint(doc, "checkpoint", vkey)
    if checkpoint.size != size:
        raise ProofInvalid(f"size {size} is not the checkpoint's ({checkpoint.size})")
    if index != seq - 1:
        raise ProofInvalid(f"index {index} is not seq - 1 ({seq - 1})")
    try:
        record = base64.b64decode(doc.get("record", ""), validate=True)
        own_seq = record_seq(record)
    except (binascii.Error, TypeError, ValueError, msgspec.DecodeError) as exc:
        raise ProofInvalid(f"record: not a base64 MessagePack record ({exc})") from None
    if own_seq != seq:
        raise ProofInvalid(f"the record's own seq is {own_seq}, not {seq}")
    path = _hashes(doc.get("path"), "path")
    try:
        root = root_from_inclusion(index, size, leaf_hash(record), path)
    except ValueError as exc:
        raise ProofInvalid(f"path: {exc}") from None
    if root != checkpoint.root:
        raise ProofInvalid("path: the record and path do not lead to the checkpoint's root")
    return f"seq {seq} is leaf {index} of the signed tree of size {size}"


def _consistency(doc: dict[str, Any], vkey: VerifierKey) -> str:
    old, new = _int(doc, "from"), _int(doc, "to")
    old_checkpoint = _checkpoint(doc, "from_checkpoint", vkey)
    new_checkpoint = _checkpoint(doc, "checkpoint", vkey)
    if old_checkpoint.size != old or new_checkpoint.size != new:
        raise ProofInvalid(f"from/to ({old}, {new}) are not the checkpoints' sizes "
                           f"({old_checkpoint.size}, {new_checkpoint.size})")
    path = _hashes(doc.get("path"), "path")
    if not consistent(old, new, old_checkpoint.root, new_checkpoint.root, path):
        raise ProofInvalid(f"path: does not prove the tree of size {old} a prefix of "
                           f"the tree of size {new}")
    return f"the signed tree of size {old} is a prefix of the signed tree of size {new}"
