"""`auditd restore SRC` and `auditd backup DEST --verify` (docs/design/retention.md,
"Backup and restore"): both verify a backup with `verify`'s machinery and print the
checkpoint it verified against, so a backup, its restore and a later `auditd verify`
can be seen to give the same root."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from auditd.cli.proofs import read_vkey, store_vkey
from auditd.cli.storage import daemon_in_the_way
from auditd.config import Config
from auditd.errors import AuditdError
from auditd.lifecycle.restore import DB_NAME, RestoreRefused, check_backup, restore
from auditd.proofs.notes import NoteError, VerifierKey

EXIT_OK, EXIT_FAILURE = 0, 1


def _fail(message: str) -> int:
    print(f"auditd: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _vkey(args: argparse.Namespace, config: Config) -> VerifierKey:
    return read_vkey(args.vkey) if args.vkey else store_vkey(config)


def _root_line(document: dict[str, Any]) -> str:
    checkpoint = document.get("checkpoint") or {}
    root = bytes.fromhex(checkpoint.get("root", ""))
    return (f"checkpoint size {checkpoint.get('size')} root "
            f"{base64.b64encode(root).decode()}")


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    storage = Path(config.storage.path)
    in_the_way = daemon_in_the_way(storage / DB_NAME, config, "restoring")
    if in_the_way:
        return _fail(in_the_way)
    source = Path(args.source).resolve()
    if source.parent == storage.resolve() and source.name == DB_NAME:
        return _fail(f"{source} is the live database itself")
    try:
        vkey = _vkey(args, config)
        given = Path(args.checkpoint).read_text(encoding="utf-8") if args.checkpoint \
            else None
        report = check_backup(source, vkey, given, args.force)
        done = restore(storage, source, report)
    except OSError as exc:
        return _fail(f"restore from {source} failed: {exc}")
    except (RestoreRefused, AuditdError, NoteError) as exc:
        return _fail(f"restore refused: {exc}")
    document = done.document()
    if args.json:
        print(json.dumps(document))
    else:
        print(f"restored {source} into {storage} ({done.files} files), "
              f"{report.verified_events:,} events verified; {_root_line(document)}")
        if done.replaced is not None:
            print(f"the store it replaced is in {done.replaced} (`auditd recover "
                  f"{done.replaced / DB_NAME}` brings back events newer than the backup)")
    return EXIT_OK


def verify_backup(dest: str, args: argparse.Namespace, config: Config) -> int:
    """After `auditd backup DEST --verify`: verify the copy where it was written."""
    source = Path(dest).resolve()
    try:
        report = check_backup(source, _vkey(args, config), None, False)
    except (RestoreRefused, AuditdError, NoteError) as exc:
        return _fail(f"the backup does not verify: {exc}")
    checkpoint = report.checkpoint
    document = {"verified": True, "verify": report.document(), "checkpoint": None
                if checkpoint is None else {"size": checkpoint.size,
                                            "root": checkpoint.root.hex()}}
    print(json.dumps(document) if args.json else
          f"backup verified: {report.verified_events:,} events; {_root_line(document)}")
    return EXIT_OK
