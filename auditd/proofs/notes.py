"""Signed checkpoints: C2SP tlog-checkpoint in a C2SP signed note, Ed25519 keys.

    auditd/<host-id>
    <size>
    <root, base64>
    time <unix seconds>

    — auditd/<host-id> <base64(key_id || signature)>

The signed text is the four lines, each ending in a newline; `key_id` is the first 4
bytes of SHA-256(key_name || 0x0A || 0x01 || public key). The verifier key is
golang.org/x/mod/sumdb/note's text: `<name>+<key id, 8 hex>+<base64(0x01 || key)>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from auditd.proofs.merkle import HASH_BYTES

_ALG_ED25519 = b"\x01"
_DASH = "\u2014 "


class NoteError(ValueError):
    """A checkpoint or key that does not parse or does not verify; says which."""


def origin(host_id: str) -> str:
    return f"auditd/{host_id}"


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ALG_ED25519 + public).digest()[:4]


@dataclass(frozen=True, slots=True)
class VerifierKey:
    name: str
    key_id: bytes
    public: Ed25519PublicKey

    def text(self) -> str:
        raw = _raw_public(self.public)
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(_ALG_ED25519 + raw).decode()}"


def verifier_of(name: str, private: Ed25519PrivateKey) -> VerifierKey:
    public = private.public_key()
    return VerifierKey(name, key_id(name, _raw_public(public)), public)


def parse_vkey(text: str) -> VerifierKey:
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError("verifier key: expected <name>+<key id>+<base64 key>")
    name, hex_id, b64 = parts
    try:
        raw = base64.b64decode(b64, validate=True)
        wanted_id = bytes.fromhex(hex_id)
    except (binascii.Error, ValueError):
        raise NoteError("verifier key: the key id or the key does not decode") from None
    if len(raw) != 33 or raw[:1] != _ALG_ED25519 or len(wanted_id) != 4:
        raise NoteError("verifier key: not an Ed25519 key (algorithm 0x01, 32 bytes)")
    if key_id(name, raw[1:]) != wanted_id:
        raise NoteError("verifier key: the key id does not match the name and key")
    return VerifierKey(name, wanted_id, Ed25519PublicKey.from_public_bytes(raw[1:]))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time: int
    text: str  # the whole note, signature line included

    @property
    def body(self) -> str:
        return checkpoint_body(self.origin, self.size, self.root, self.time)


def checkpoint_body(origin_line: str, size: int, root: bytes, unix_time: int) -> str:
    return f"{origin_line}\n{size}\n{base64.b64encode(root).decode()}\ntime {unix_time}\n"


def sign_checkpoint(private: Ed25519PrivateKey, origin_line: str, size: int, root: bytes,
                    unix_time: int) -> Checkpoint:
    body = checkpoint_body(origin_line, size, root, unix_time)
    signature = private.sign(body.encode())
    public = _raw_public(private.public_key())
    stamp = base64.b64encode(key_id(origin_line, public) + signature).decode()
    return Checkpoint(origin_line, size, root, unix_time,
                      f"{body}\n{_DASH}{origin_line} {stamp}\n")


def parse_checkpoint(text: str) -> tuple[Checkpoint, list[tuple[str, bytes]]]:
    """The checkpoint and its signature lines (key name, key_id || signature)."""
    body, sep, rest = text.partition("\n\n")
    if not sep:
        raise NoteError("checkpoint: no blank line before the signatures")
    lines = body.split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint: expected origin, size and root lines")
    origin_line, size_text, root_text = lines[0], lines[1], lines[2]
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise NoteError(f"checkpoint: size {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        raise NoteError("checkpoint: the root is not base64") from None
    if len(root) != HASH_BYTES:
        raise NoteError(f"checkpoint: the root is {len(root)} bytes, not {HASH_BYTES}")
    unix_time = 0
    for extra in lines[3:]:
        if extra.startswith("time ") and extra[5:].isdigit():
            unix_time = int(extra[5:])
        elif not extra:
            raise NoteError("checkpoint: an empty line inside the signed text")
    signatures = []
    for line in rest.split("\n"):
        if not line:
            continue
        if not line.startswith(_DASH):
            raise NoteError("checkpoint: a signature line must start with an em dash")
        name, _, stamp = line[len(_DASH):].rpartition(" ")
        try:
            signatures.append((name, base64.b64decode(stamp, validate=True)))
        except binascii.Error:
            raise NoteError("checkpoint: a signature is not base64") from None
    if not rest.endswith("\n") or not signatures:
        raise NoteError("checkpoint: no signature line")
    checkpoint = Checkpoint(origin_line, int(size_text), root, unix_time, text)
    return checkpoint, signatures


def verify_checkpoint(text: str, vkey: VerifierKey) -> Checkpoint:
    """Parse and check a checkpoint's signature by `vkey`; NoteError says what failed."""
    checkpoint, signatures = parse_checkpoint(text)
    body = text.partition("\n\n")[0] + "\n"
    for name, stamp in signatures:
        if name != vkey.name or len(stamp) != 4 + 64 or stamp[:4] != vkey.key_id:
            continue
        try:
            vkey.public.verify(stamp[4:], body.encode())
        except InvalidSignature:
            raise NoteError(f"checkpoint of size {checkpoint.size}: the signature by "
                            f"{vkey.name} does not verify") from None
        if checkpoint.origin != vkey.name:
            raise NoteError(f"checkpoint: origin {checkpoint.origin!r} is not the key's "
                            f"name {vkey.name!r}")
        return checkpoint
    raise NoteError(f"checkpoint of size {checkpoint.size}: no signature by the key "
                    f"{vkey.name}+{vkey.key_id.hex()}")


