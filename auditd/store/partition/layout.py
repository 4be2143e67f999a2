"""The sealed partition's file layout: tables, constants and the small codecs both the
builder and the reader use.

An *offset* is `seq - first_seq`. A *term* is a field letter and a value (`a` + an
actor); its *key* is the CRC-32 of the term's UTF-8.

Tables (each written once, in key order, by the builder):

- `meta(key, value)`: format version, seq range, sizes, the zstd dictionary, the ts
  zone map (min and max ts of every ZONE_RECORDS records).
- `record_stream(row, data)`: the records, BLOCK_RECORDS consecutive ones to a zstd
  frame (the partition's dictionary, a checksum), the frames end to end and cut into
  rows of exactly STREAM_ROW bytes: each row fills its page, where a row per frame
  left ~7 % of every page empty. `blocks(block, start)` is where frame `block` starts.
- `terms(bucket, data)`: every term, hashed into buckets by the top bits of its key. A
  bucket holds three kinds of entry, told apart from the key's low 8 bits (`rem`):
  *singles*, one 32-bit `rem << 24 | offset` per posting of a term too rare in a run
  to be grouped (ids, causation ids, most targets: no per-value cost at all); *short*
  terms, at most LONG_POSTINGS offsets as LEB128 deltas; *long* terms, an id into
  `long_terms`. Singles and short terms keep no value: a reader rechecks their
  candidates against the records (a key matches another value's 1 time in ~2**24).
- `long_terms(term, text, count, start, chunks, first_ss, ss)`: a term with more
  postings: its exact text (a reader compares values, not records), its postings in
  CHUNK_POSTINGS chunks from byte `start` of `posting_stream`, `chunks` the last offset
  and end byte of each (a bisect finds the chunks of a seq range). For a stream,
  `first_ss` is the stream_seq of its first posting; `ss` all of them when not
  consecutive (the sequencer makes them consecutive).
- `posting_stream(row, data)`: the chunks end to end, in rows like `record_stream`.
"""

from __future__ import annotations

import operator
import re
import sys
import zlib
from array import array
from itertools import accumulate, pairwise
from typing import Final

import zstandard

FORMAT_VERSION: Final = 1
PAGE_SIZE: Final = 4096
STREAM_ROW: Final = PAGE_SIZE - 40  # the largest blob a table leaf keeps in its page
BLOCK_RECORDS: Final = 64  # 92 B/event against 98 at 32 (issue 12's data); ~40 us a read
ZONE_RECORDS: Final = 256  # ts min/max per this many records
RUN_RECORDS: Final = 65_536  # the builder collects postings per run: offsets fit 16 bits
MAX_RECORDS: Final = 1 << 24  # a single keeps its offset in 24 bits
SINGLE_POSTINGS: Final = 2  # a term with at most this many postings in a run: singles
# An operation's few events: as singles they cost 4 bytes each instead of ~2, but no
# grouping, which was half the terms the assembly handled (and they are rechecked
# against the records either way when short).
SINGLE_CORRELATION_POSTINGS: Final = 8
LONG_POSTINGS: Final = 16  # more postings than this: the value is stored, no recheck
CHUNK_POSTINGS: Final = 1_024
BUCKET_ENTRIES: Final = 48  # singles and terms per bucket on average
STRIPE_BITS: Final = 5  # the builder spills terms into 2**5 files by their top bits
MIN_DICTIONARY_RECORDS: Final = 1_000
DICTIONARY_SAMPLE: Final = 4_000  # records; 2,000-13,000 all gave the same ratio
DICTIONARY_BYTES: Final = 32_768
ZSTD_LEVEL: Final = 1  # with a dictionary, level 1 packed 64-record blocks best (3: 1 % more)

# Field letters of terms. The query filter names map onto them.
TYPE, ACTOR, TARGET, STREAM = "y", "a", "g", "s"
CORRELATION, CAUSATION, UID, COMM = "c", "k", "u", "m"
TAG, WORD, ID, DEAD_LETTER = "t", "w", "i", "d"
FILTER_FIELDS: Final = {
    "type": TYPE, "actor": ACTOR, "target": TARGET, "stream": STREAM,
    "correlation_id": CORRELATION, "causation_id": CAUSATION, "uid": UID, "comm": COMM,
    "tag": TAG, "q": WORD,
}
TAG_SEPARATOR: Final = "\x00"  # a tag term is key NUL value: keys may hold "="
# crc32(value, SEED[letter]) == crc32(letter + value): the key without concatenating.
SEED: Final = {letter: zlib.crc32(letter.encode()) for letter in "yagsckumtwid"}

SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE record_stream (row INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE blocks (block INTEGER PRIMARY KEY, start INTEGER NOT NULL)",
    "CREATE TABLE terms (bucket INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    """CREATE TABLE long_terms (term INTEGER PRIMARY KEY, text TEXT NOT NULL,
        count INTEGER NOT NULL, start INTEGER NOT NULL, chunks BLOB NOT NULL,
        first_ss INTEGER, ss BLOB)""",
    "CREATE TABLE posting_stream (row INTEGER PRIMARY KEY, data BLOB NOT NULL)",
)

_WORD_RE = re.compile(r"[^\W_]+")
# ASCII letters and digits to themselves lower-cased, every other ASCII byte to a space.
_ASCII_WORDS = bytes(ord(chr(c).lower()) if chr(c).isalnum() else 0x20
                     for c in range(128)) + bytes(range(128, 256))


def words(text: str) -> list[str]:
    """The words of a text: runs of letters and digits, lower-cased (as FTS5's
    unicode61 tokenizer splits, without its diacritics folding)."""
    return _WORD_RE.findall(text.lower())


def word_bytes(text: str) -> list[bytes]:
    """words(text) as UTF-8: the builder's form (a byte translate when ASCII, ~5
    times faster than the regex)."""
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).split()
    return [word.encode() for word in _WORD_RE.findall(text.lower())]


def term_key(term: str) -> int:
    return zlib.crc32(term[1:].encode(), SEED[term[0]])


def tag_term(key: str, value: str) -> str:
    return TAG + key + TAG_SEPARATOR + value


# --- LEB128 varints (short postings, bucket bodies) -------------------------------

def put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def get_varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, position after it)."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


# --- postings chunks ---------------------------------------------------------------
# A chunk is: a flags byte (width of the deltas 1/2/4, 0x80 if zstd), the first offset
# as a varint, then the deltas between consecutive offsets (0 where a word occurs twice
# in one record: readers take postings as sets). Arrays are little-endian on disk.

_WIDTH_CODE = {1: "B", 2: "H", 4: "I"}
_COMPRESSED = 0x80
_postings_compressor = zstandard.ZstdCompressor(level=3, write_content_size=True,
                                                write_checksum=False)
_postings_decompressor = zstandard.ZstdDecompressor()
LITTLE_ENDIAN: Final = sys.byteorder == "little"


def array_from(code: str, data: bytes) -> array[int]:
    values = array(code)
    values.frombytes(data)
    if not LITTLE_ENDIAN:
        values.byteswap()
    return values


def array_bytes(values: array[int]) -> bytes:
    if LITTLE_ENDIAN:
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def _chunk(first: int, width: int, body: bytes) -> bytes:
    flags = width
    if len(body) > 64:
        packed = _postings_compressor.compress(body)
        if len(packed) < len(body):
            body, flags = packed, width | _COMPRESSED
    head = bytearray((flags,))
    put_varint(head, first)
    return bytes(head) + body


def encode_chunk(offsets: list[int], base: int = 0) -> bytes:
    """Sorted offsets (each plus `base`) as one chunk."""
    deltas = list(map(operator.sub, offsets[1:], offsets))
    top = max(deltas, default=0)
    width = 1 if top < 0x100 else 2 if top < 0x10000 else 4
    return _chunk(base + offsets[0], width, array_bytes(array(_WIDTH_CODE[width], deltas)))


def encode_run_chunk(raw: bytes, base: int) -> bytes:
    """Sorted 16-bit offsets (little-endian bytes, each plus `base`) as one chunk.

    The deltas come from one big-integer subtraction: with the offsets as 16-bit lanes
    of an integer X, lane i of (X >> 16) - X is offset i+1 - offset i, never negative,
    so no borrow crosses lanes (the top lane is masked off). ~5 ns an offset, where a
    Python loop takes ~40: the densest terms hold most of a partition's postings.
    """
    count = len(raw) // 2
    first = base + int.from_bytes(raw[:2], "little")
    if count == 1:
        return _chunk(first, 1, b"")
    lanes = int.from_bytes(raw, "little")
    deltas = ((lanes >> 16) - (lanes & ((1 << (16 * (count - 1))) - 1))).to_bytes(
        2 * (count - 1), "little")
    high = deltas[1::2]
    if high.count(0) == len(high):
        return _chunk(first, 1, deltas[0::2])
    return _chunk(first, 2, deltas)


def decode_chunk(data: bytes) -> list[int]:
    flags = data[0]
    first, at = get_varint(data, 1)
    body = data[at:]
    if flags & _COMPRESSED:
        body = _postings_decompressor.decompress(body)
    width = flags & 0x7F
    deltas: bytes | array[int] = body if width == 1 else array_from(_WIDTH_CODE[width], body)
    return list(accumulate(deltas, operator.add, initial=first))


# --- record blocks -----------------------------------------------------------------
# Uncompressed, a block is: the width of its length table (2 or 4), the length of each
# record, then the records end to end.

def encode_block(records: list[bytes]) -> bytes:
    lengths = array("H" if max(map(len, records)) < 0x10000 else "I", map(len, records))
    return bytes((lengths.itemsize,)) + array_bytes(lengths) + b"".join(records)


def decode_block(raw: bytes, count: int) -> list[bytes]:
    width = raw[0]
    lengths = array_from("H" if width == 2 else "I", raw[1:1 + width * count])
    ends = accumulate(lengths, initial=1 + width * count)
    starts = list(ends)
    return [raw[a:b] for a, b in pairwise(starts)]
