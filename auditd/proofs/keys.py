"""The checkpoint signing key: where it is, making it, rotating it.

Where: `[proofs] key_file` when set; else the `checkpoint.key` credential systemd
passes with `LoadCredential=checkpoint.key:/path` (in $CREDENTIALS_DIRECTORY); else
`<storage.path>/checkpoint.key`, which the daemon creates (mode 0600) with the store.
The file is an Ed25519 private key in PKCS#8 PEM.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from auditd.errors import AuditdError

KEY_NAME = "checkpoint.key"


class KeyFileError(AuditdError):
    """The key cannot be read, parsed or written; the message names the file."""


def key_path(key_file: str, storage: Path) -> tuple[Path, bool]:
    """The key's path, and whether the daemon may create it (not a credential)."""
    if key_file:
        return Path(key_file), True
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / KEY_NAME).is_file():
        return Path(credentials) / KEY_NAME, False
    return storage / KEY_NAME, True


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"checkpoint key {path}: {exc.strerror or exc}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"checkpoint key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"checkpoint key {path}: not an Ed25519 key")
    return key


def write_key(path: Path) -> Ed25519PrivateKey:
    """A new key at `path`, mode 0600, written whole (temp file, fsync, rename)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        raise KeyFileError(f"checkpoint key {path}: {exc.strerror or exc}") from None
    return key


def load_or_create(path: Path, may_create: bool) -> tuple[Ed25519PrivateKey, bool]:
    """The key, made first when absent and allowed; (key, created)."""
    if not path.exists() and may_create:
        return write_key(path), True
    return load_key(path), False


def rotate(path: Path) -> Path | None:
    """Write a new key at `path`; the old one, if any, is kept beside it; its new name."""
    kept = None
    if path.exists():
        kept = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(path, kept)
    write_key(path)
    return kept
