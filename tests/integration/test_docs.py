"""The project's own documents say what the daemon does: held to the daemon itself."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
from conftest import DaemonProcess
from structlog.testing import capture_logs

from auditd.journal.journal import Journal, encode_record

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
PROTOCOL = REPO / "docs" / "protocol.md"


def test_the_readme_links_the_projects_own_protocol_page() -> None:
    assert PROTOCOL.is_file()
    assert "(docs/protocol.md)" in README
    # A path users of the repository do not have is never cited as the contract.
    assert "shared/spec" not in README


def _documented_vector() -> tuple[bytes, dict[str, int]]:
    section = PROTOCOL.read_text().split("## Test vector", 1)[1]
    hex_block = re.search(r"\n\n((?:    [0-9a-f ]+\n)+)", section)
    assert hex_block is not None, "the test vector's hex block is missing"
    reply = re.search(r"`(\{\"ok\".*?\})`", section)
    assert reply is not None, "the test vector's reply is missing"
    return bytes.fromhex(hex_block.group(1)), msgspec.json.decode(reply.group(1))


def test_the_protocol_pages_test_vector_is_answered_as_documented(
        daemon: DaemonProcess) -> None:
    frame, expected = _documented_vector()
    assert frame[4:] == msgspec.msgpack.encode({"type": "user.login", "actor": "alice"})
    with daemon.connect() as conn:
        conn.send_raw(frame)
        assert conn.recv() == expected


def test_journal_tail_cut_logs_the_fields_the_readme_names(tmp_path: Path) -> None:
    named = re.search(r"`journal_tail_cut`: ([a-z_, ]+)\)", README)
    assert named is not None, "the README no longer describes journal_tail_cut"
    documented = {field.strip() for field in named.group(1).split(",")}

    journal = Journal(tmp_path, 1 << 20, fsync=False)
    journal.open_segment(1)
    journal.append(encode_record(1, b"one") + encode_record(2, b"two"), 1, 2)
    journal.close()
    (segment,) = tmp_path.glob("*")
    segment.write_bytes(segment.read_bytes()[:-2])  # a torn last record

    with capture_logs() as logs:
        replayed = list(Journal(tmp_path, 1 << 20, fsync=False).replay(0))
    assert len(replayed) == 1
    (cut,) = [entry for entry in logs if entry["event"] == "journal_tail_cut"]
    assert set(cut) - {"event", "log_level"} == documented
