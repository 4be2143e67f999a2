"""`auditd verify`, `prove`, `verify-proof`, `keygen` and `export-vkey` (proofs.md).

verify and prove read the database file directly, in read-only snapshots, with the
daemon running or stopped; verify-proof needs nothing but the proof and the key.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.proofs import keys
from auditd.proofs.checkpointer import host_id_of
from auditd.proofs.notes import NoteError, VerifierKey, origin, parse_vkey, verifier_of

EXIT_OK, EXIT_TAMPERED, EXIT_UNVERIFIABLE = 0, 1, 2


def _storage(config: Config) -> Path:
    return Path(config.storage.path)


def _db(config: Config) -> sqlite3.Connection:
    path = _storage(config) / "auditd.db"
    if not path.is_file():
        raise AuditdError(f"no database at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def store_vkey(config: Config) -> VerifierKey:
    """The verifier key of the store's own signing key."""
    path, _ = keys.key_path(config.proofs.key_file, _storage(config))
    key = keys.load_key(path)
    db = _db(config)
    try:
        host = host_id_of(db)
    finally:
        db.close()
    return verifier_of(origin(host), key)


def read_vkey(text_or_file: str) -> VerifierKey:
    """A verifier key given as its text or as a file holding it."""
    text = text_or_file
    if "+" not in text_or_file or Path(text_or_file).is_file():
        try:
            text = Path(text_or_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise AuditdError(f"--vkey {text_or_file}: {exc.strerror or exc}") from None
    try:
        return parse_vkey(text)
    except NoteError as exc:
        raise AuditdError(f"--vkey: {exc}") from None


def cmd_keygen(args: Any, config: Config) -> int:
    path, may_create = keys.key_path(config.proofs.key_file, _storage(config))
    if not may_create:
        print(f"auditd: the key is the systemd credential {path}; make a new one with "
              "`auditd keygen --config` pointing key_file elsewhere, or replace the "
              "credential's source file", file=sys.stderr)
        return 1
    kept = keys.rotate(path)
    print(f"wrote a new checkpoint key to {path} (mode 0600)")
    if kept is not None:
        print(f"the previous key is kept as {kept}; restart the daemon to sign with the "
              "new one, and give verifiers the new `auditd export-vkey`")
    return 0


def cmd_export_vkey(args: Any, config: Config) -> int:
    print(store_vkey(config).text())
    return 0


def _load_state(path: str | None) -> dict[str, Any]:
    if path is None or not Path(path).exists():
        return {}
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditdError(f"--state {path}: cannot read it: {exc}") from None
    if not isinstance(state, dict):
        raise AuditdError(f"--state {path}: expected a JSON object")
    return state


def _save_state(path: str, vkey: VerifierKey, checkpoint: str,
                compact: tuple[bytes, ...]) -> None:
    target = Path(path)
    fd, temp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"vkey": vkey.text(), "checkpoint": checkpoint,
                   "compact": [base64.b64encode(h).decode() for h in compact],
                   "verified_at": int(time.time())}, handle)
        handle.write("\n")
    os.replace(temp, target)


def _resume(state: dict[str, Any]) -> tuple[str, list[bytes]] | None:
    """The remembered checkpoint and compact range, when the state holds both."""
    compact, checkpoint = state.get("compact"), state.get("checkpoint")
    if not isinstance(compact, list) or not isinstance(checkpoint, str):
        return None
    try:
        return checkpoint, [base64.b64decode(h, validate=True) for h in compact]
    except (TypeError, ValueError):
        return None


def _progress() -> Any:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\rverifying: {done:,}/{total:,} seqs", end="", file=sys.stderr, flush=True)
    return show


def cmd_verify(args: Any, config: Config) -> int:
    from auditd.proofs.verify import verify_store

    state = _load_state(args.state)
    try:
        if args.vkey:
            vkey = read_vkey(args.vkey)
        elif state.get("vkey"):
            vkey = parse_vkey(str(state["vkey"]))
        else:
            vkey = store_vkey(config)
    except (AuditdError, NoteError) as exc:
        print(f"auditd: cannot verify: no verifier key ({exc})", file=sys.stderr)
        return EXIT_UNVERIFIABLE
    given = None
    if args.checkpoint:
        try:
            given = Path(args.checkpoint).read_text(encoding="utf-8")
        except OSError as exc:
            print(f"auditd: --checkpoint {args.checkpoint}: {exc.strerror or exc}",
                  file=sys.stderr)
            return EXIT_UNVERIFIABLE
    elif state.get("checkpoint"):
        given = str(state["checkpoint"])
    progress = _progress()
    report = verify_store(_storage(config), vkey, given=given, workers=args.workers,
                          progress=progress, resume=None if args.full else _resume(state))
    if progress is not None:
        print(file=sys.stderr)
    if report.status == "verified" and args.state and report.checkpoint is not None:
        _save_state(args.state, vkey, report.checkpoint.text, report.compact)
    doc = report.document()
    if args.json:
        print(json.dumps(doc))
    else:
        _print_report(doc)
    return report.exit_code


def _print_report(doc: dict[str, Any]) -> None:
    problem, checkpoint = doc["problem"], doc["checkpoint"]
    if doc["status"] == "verified":
        size = checkpoint["size"] if checkpoint else 0
        print(f"verified: {doc['verified_events']:,} records against the signed "
              f"checkpoint of size {size:,} ({doc['checkpoints_checked']} checkpoints, "
              f"{doc['seconds']:.1f} s, {doc['events_per_s'] or 0:,.0f} events/s)")
        if doc["not_yet_checkpointed"]:
            print(f"not yet checkpointed: {doc['not_yet_checkpointed']:,} newer events")
    elif doc["status"] == "tampered":
        where = f"seq {problem['seq']}: " if problem["seq"] is not None else ""
        print(f"TAMPERED: {where}{problem['kind']}: {problem['detail']}")
    else:
        print(f"cannot verify: {problem['detail']}")
    for note in doc["notes"]:
        print(f"note: {note}")


def cmd_prove(args: Any, config: Config) -> int:
    from auditd.proofs.prove import ProofError, consistency, inclusion

    db = _db(config)
    partitions = _storage(config) / "partitions"
    try:
        if args.consistency:
            old, new = args.consistency
            doc = consistency(db, partitions, old, new)
        else:
            if args.seq is None:
                print("auditd: prove: give SEQ or --consistency OLD NEW", file=sys.stderr)
                return 2
            doc = inclusion(db, partitions, args.seq, args.size)
    except ProofError as exc:
        print(f"auditd: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(json.dumps(doc, indent=None if args.json else 1))
    return 0


def cmd_verify_proof(args: Any, config: Config) -> int:
    from auditd.proofs.offline import ProofInvalid, check_proof

    try:
        vkey = read_vkey(args.vkey)
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except (AuditdError, OSError, UnicodeDecodeError) as exc:
        print(f"auditd: verify-proof: {exc}", file=sys.stderr)
        return 1
    try:
        said = check_proof(text, vkey)
    except ProofInvalid as exc:
        print(f"proof FAILED: {exc}")
        return 1
    print(f"proof holds: {said}")
    return 0
