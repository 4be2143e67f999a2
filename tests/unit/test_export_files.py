"""Export files on disk: written whole or not at all, zstd by name, and read back
value by value across chunk boundaries; a cut stream is refused as truncated."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from auditd.lifecycle.files import Output, json_lines, msgpack_values, open_input
from auditd.lifecycle.manifest import ManifestError, decode


def _values(count: int) -> list[bytes]:
    rng = random.Random(7)
    return [msgspec.msgpack.encode({"seq": i, "pad": "x" * rng.randrange(0, 3000),
                                    "nested": [[i]] * rng.randrange(0, 5)})
            for i in range(count)]


@pytest.mark.parametrize("name", ["out.msgpack", "out.msgpack.zst"])
def test_values_come_back_whole_across_chunks(tmp_path: Path, name: str) -> None:
    values = _values(3000)  # ~4.5 MB: several 1 MiB read chunks
    path = tmp_path / name
    output = Output(str(path))
    for value in values:
        output.write(value)
    assert not path.exists()  # under a temporary name until complete
    output.commit()
    assert path.exists() and not list(tmp_path.glob(".*partial*"))
    stream, compressed = open_input(str(path))
    with stream:
        assert compressed == name.endswith(".zst")
        assert list(msgpack_values(stream)) == values


def test_an_abandoned_export_leaves_no_file(tmp_path: Path) -> None:
    output = Output(str(tmp_path / "x.zst"))
    output.write(b"\x01")
    output.abandon()
    assert list(tmp_path.iterdir()) == []


def test_a_stream_cut_inside_a_value_is_truncated(tmp_path: Path) -> None:
    data = b"".join(_values(50))
    path = tmp_path / "cut.msgpack"
    path.write_bytes(data[:-3])
    with path.open("rb") as stream, pytest.raises(ManifestError, match="truncated"):
        list(msgpack_values(stream))


def test_json_lines_keep_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}')
    with path.open("rb") as stream:
        assert list(json_lines(stream)) == [b'{"a": 1}', b'{"b": 2}']


def _manifest(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "format": "auditd-export", "version": 1, "host": "h", "first_seq": 1,
        "last_seq": 0, "count": 0, "filters": {}, "checkpoint": "x"}
    fields.update(changes)
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize(("changes", "words"), [
    ({"format": "tar"}, "manifest format 'tar'"),
    ({"version": 2}, "manifest version 2"),
    ({"first_seq": 5, "last_seq": 2}, "seq range 5..2"),
    ({"count": -1}, "count -1"),
    ({"host": 7}, "host"),
])
def test_a_bad_manifest_is_named(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        decode(_manifest(**changes), "msgpack")
    assert decode(_manifest(), "msgpack").complete
