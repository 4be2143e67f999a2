"""The config loader (config.load_config) on arbitrary TOML text and bytes.

Property: a Config comes back, or a ConfigError with a message; never another
exception.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import fuzz_settings  # noqa: F401  (the hypothesis profile)
from hypothesis import example, given
from hypothesis import strategies as st

from auditd.config import Config, load_config
from auditd.errors import ConfigError

SECTIONS = {
    "ingest": ["socket", "socket_mode", "max_frame_bytes", "max_batch_events",
               "max_event_bytes", "max_connections", "durability", "rate_limit"],
    "buffer": ["capacity", "overflow", "max_bytes"],
    "writer": ["batch_max", "batch_delay_ms", "retry_max_delay"],
    "storage": ["path", "journal_segment_bytes", "reserve_bytes", "dlq_max_bytes"],
    "retention": ["max_age", "max_bytes"],
    "status": ["socket", "socket_mode", "admin_uids", "reader_gids", "metrics_listen"],
    "log": ["level", "format"],
    "bogus": ["x"],
}
_DIR = Path(tempfile.mkdtemp(prefix="adfuzzcfg"))
atexit.register(shutil.rmtree, _DIR, True)  # one dir for every example, gone at exit


def load(content: bytes) -> None:
    path = _DIR / "auditd.toml"
    path.write_bytes(content)
    try:
        config = load_config(str(path))
    except ConfigError as exc:
        assert str(exc).strip(), "a ConfigError without a message"
        assert "\n" not in str(exc).strip() or "TOML" in str(exc)
        return
    assert isinstance(config, Config)


toml_strings = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["512KB", "5GB", "1.5MB", "9" * 400 + "KB", "1e9", "-1KB", "0",
                     "250ms", "30d", "9" * 400 + "s", "0660", "0o777", "99999999999",
                     "127.0.0.1:9477", "[::1]:1", "host:²", "host:٣", "a:0", "block",
                     "reject", "fsync", "json", "5000/s burst 20000"]),
    st.builds(lambda d, u: f"{d}{u}", st.integers(0, 10**30),
              st.sampled_from(["", "KB", "kib", "ms", "s", "m", "h", "d", "w", "XB"])))
scalars = st.one_of(
    toml_strings.map(json.dumps), st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["inf", "-inf", "nan", "1e400", "true", "false", "1979-05-27T07:32:00Z",
                     "07:32:00", "0x7f", "0o777", "[]", "{}", "[[[]]]"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr))
values = st.one_of(scalars, st.lists(scalars, max_size=4).map(lambda v: f"[{', '.join(v)}]"),
                   st.integers(1, 3000).map(lambda n: "[" * n + "]" * n))


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        lines.append(f"[{section}]")
        keys = draw(st.lists(st.sampled_from(SECTIONS[section]) | st.text(
            alphabet="abc_", min_size=1, max_size=5), max_size=4, unique=True))
        lines += [f"{key} = {draw(values)}" for key in keys]
    return "\n".join(lines).encode()


@given(documents())
@example(b'[ingest]\nmax_frame_bytes = "' + b"9" * 400 + b'KB"')
@example(b'[status]\nmetrics_listen = "host:\xc2\xb2"')
@example(b"[ingest]\nsocket = " + b"[" * 3000 + b"]" * 3000)
@example(b'[writer]\nretry_max_delay = "' + b"9" * 400 + b's"')
def test_structured_documents(content: bytes) -> None:
    load(content)


@given(st.text(max_size=300))
def test_any_text(text: str) -> None:
    load(text.encode("utf-8", "surrogatepass"))


@given(st.binary(max_size=300))
@example(b"\xff\xfe[ingest]")
def test_any_bytes(content: bytes) -> None:
    load(content)
