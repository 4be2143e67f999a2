"""How deep outside MessagePack and JSON nest, found without recursion.

protocol.md's depth rule: an event's `data` nests arrays and maps at most `MAX_DEPTH`
levels (`1` has none, `[[1]]` two). msgspec's decoders recurse once per level, so a
frame of a thousand nested arrays used to end in a RecursionError on the transport.
Nothing from outside reaches a recursive decoder before this module has bounded how
deep it can go:

- `container_bound`: every array or map starts with one of 36 byte values, so a value
  cannot nest deeper than the count of those bytes in it. One C-speed pass
  (`bytes.translate`) proves an ordinary event or batch shallow.
- `value_depth`, `items`: an iterative walk of the MessagePack format, the open
  containers on a list rather than the call stack, for what the bound cannot clear. It
  finds each top-level item's extent and depth exactly and checks the bytes are
  well-formed; its cost is per token, and no input makes it recurse.
- `array_items`: a long batch split by msgspec after all, in windows that hold too few
  container bytes for it to recurse far, the walker taking only what no window holds.
- `flatten`: a value with everything below a level replaced by empty arrays and maps,
  so a recursive decoder can still name the first bad field of a very deep event.
- `json_within`: the same bound for JSON text (the status API's bodies, `--data-json`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgspec

from auditd.errors import AuditdError

MAX_DEPTH = 64  # levels of arrays and maps an event's `data` may nest (protocol.md)

# The first bytes of an array or a map: fixmap, fixarray, array16/32, map16/32.
_CONTAINER_BYTES = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])

# Per first byte: what the token is, how many header bytes it has, and where its length
# or count is. Scalars of a fixed size (fixint, nil, bool, fixstr, numbers, fixext) are
# one step of `_SIZE[b]` bytes.
_SCALAR, _SIZED, _ARRAY, _MAP, _INVALID = range(5)
_KIND = [_SCALAR] * 256
_SIZE = [1] * 256  # a scalar's whole size, or a header's size
_LENGTH = [0] * 256  # bytes of the big-endian length or count after the first byte
_FIXED = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
          0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
# str8/16/32 and bin8/16/32: first byte, length; ext8/16/32 also carry a type byte.
_VARIABLE = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}
for _b in range(0xA0, 0xC0):
    _SIZE[_b] = 1 + (_b & 0x1F)
for _b, _n in _FIXED.items():
    _SIZE[_b] = _n
for _b, _n in (*_VARIABLE.items(), *_EXT.items()):
    _KIND[_b], _LENGTH[_b], _SIZE[_b] = _SIZED, _n, 1 + _n + (_b in _EXT)
for _b in range(0x80, 0xA0):
    _KIND[_b] = _MAP if _b < 0x90 else _ARRAY
for _b, _n in ((0xDC, 2), (0xDD, 4), (0xDE, 2), (0xDF, 4)):
    _KIND[_b], _LENGTH[_b], _SIZE[_b] = (_ARRAY if _b < 0xDE else _MAP), _n, 1 + _n
_KIND[0xC1] = _INVALID
_STEP = [size if kind == _SCALAR else 0 for kind, size in zip(_KIND, _SIZE, strict=True)]
_EMPTY = {_ARRAY: b"\x90", _MAP: b"\x80"}


def _chain_pattern() -> re.Pattern[bytes]:
    """One link repeated: a container whose items before its last are one-byte scalars
    or fixstrs, its last the next link ([[[...]]], [nil, [nil, ...]], {"k": {"k": ...}}).
    The shape a deep nest is built in; the walker skips a run of it in one C call."""
    fixstr = b"|".join(bytes([0xA0 + n]) + b".{%d}" % n for n in range(32))
    scalar = b"(?:[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]|" + fixstr + b")"
    arrays = [bytes([0x90 + n]) + b"%s{%d}" % (scalar, n - 1) for n in range(1, 16)]
    maps = [bytes([0x80 + n]) + b"%s{%d}" % (scalar, 2 * n - 1) for n in range(1, 16)]
    links = [re.escape(link[:1]) + link[1:] for link in (*arrays, *maps)]
    links += [re.escape(b"\xdc\x00\x01"), re.escape(b"\xdd\x00\x00\x00\x01")]
    return re.compile(b"(" + b"|".join(links) + b")\\1+", re.DOTALL)


_CHAIN = _chain_pattern()
_SINGLETONS = re.compile(b"(\x91)\x91*")  # [[[...]]], the commonest chain, faster alone


class MalformedError(AuditdError):
    """The bytes are not one well-formed MessagePack value; str() says where, in
    msgspec's words, so a frame gets the same message whichever checked it."""


def _truncated() -> MalformedError:
    return MalformedError("Input data was truncated")


def container_bound(buf: bytes) -> int:
    """An upper bound on how many levels `buf` nests: its bytes that could open one."""
    return len(buf) - len(buf.translate(None, _CONTAINER_BYTES))


def _head(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The token at `pos` as (kind, where what follows its header starts, n): n is a
    sized token's payload length, a container's count of items, 0 for a scalar (whose
    whole token the second field then ends)."""
    if pos >= end:
        raise _truncated()
    first = buf[pos]
    kind, size, length = _KIND[first], _SIZE[first], _LENGTH[first]
    if kind == _INVALID:
        raise MalformedError(f"MessagePack data is malformed: invalid opcode "
                             f"'\\x{first:02x}' (byte {pos})")
    if pos + size > end:
        raise _truncated()
    if kind == _SCALAR:
        return kind, pos + size, 0
    count = int.from_bytes(buf[pos + 1 : pos + 1 + length], "big") if length else first & 0xF
    return kind, pos + size, count * 2 if kind == _MAP else count


def skip(buf: bytes, pos: int) -> tuple[int, int]:
    """Where the value at `pos` ends, and how many levels of arrays and maps it nests
    (0 for a scalar). Raises MalformedError if it does not end within `buf`.

    Iterative: `stack` holds (items left, depth) of each enclosing container that still
    has items after the one being read, so a chain of last items (the shape of a deep
    nest) takes no room at all. Every step consumes at least one byte.
    """
    steps, kinds, sizes, lengths = _STEP, _KIND, _SIZE, _LENGTH
    stack: list[int] = []
    left, depth, deepest = 1, 0, 0
    try:
        while True:
            if not left:
                if not stack:
                    break
                depth = stack.pop()
                left = stack.pop()
                continue
            left -= 1
            first = buf[pos]
            step = steps[first]
            if step:  # a scalar of a fixed size: the common case, one lookup
                pos += step
                continue
            kind = kinds[first]
            if kind == _INVALID:
                raise MalformedError(f"MessagePack data is malformed: invalid opcode "
                                     f"'\\x{first:02x}' (byte {pos})")
            length = lengths[first]
            header = buf[pos + 1 : pos + 1 + length]
            if len(header) < length:
                raise _truncated()
            if kind == _SIZED:
                pos += sizes[first] + int.from_bytes(header, "big")
                continue
            if not left:  # a last item: perhaps a chain of links, skipped in one step
                chain = (_SINGLETONS if first == 0x91 else _CHAIN).match(buf, pos)
                if chain is not None:
                    depth += (chain.end() - pos) // len(chain.group(1))
                    deepest = max(deepest, depth)
                    pos, left = chain.end(), 1  # the last link's last item is next
                    continue
            count = int.from_bytes(header, "big") if length else first & 0x0F
            pos += sizes[first]
            if kind == _MAP:
                count *= 2
            if depth + 1 > deepest:
                deepest = depth + 1
            if count:
                if left:
                    stack.append(left)
                    stack.append(depth)
                left, depth = count, depth + 1
    except IndexError:  # read past the end of buf
        raise _truncated() from None
    if pos > len(buf):
        raise _truncated()
    return pos, deepest


def _check_end(stop: int, end: int) -> None:
    if stop != end:
        raise MalformedError(f"MessagePack data is malformed: trailing characters "
                             f"(byte {stop})")


def value_depth(buf: bytes) -> int:
    """How many levels the one value that is all of `buf` nests."""
    stop, deepest = skip(buf, 0)
    _check_end(stop, len(buf))
    return deepest


class Extent(NamedTuple):
    """One item of a container: `buf[start:end]`, nesting `depth` levels of its own.
    A tuple: a long batch makes one per event."""

    start: int
    end: int
    depth: int


def items(buf: bytes) -> list[Extent]:
    """The items of the array or map that is all of `buf` (a map's keys and values
    alternate), each with its extent and depth."""
    end = len(buf)
    kind, pos, count = _head(buf, 0, end)
    if kind not in (_ARRAY, _MAP):
        raise MalformedError("expected an array or a map")
    found: list[Extent] = []
    for _ in range(count):
        stop, deepest = skip(buf, pos)
        found.append(Extent(pos, stop, deepest))
        pos = stop
    _check_end(pos, end)
    return found


_SPLITTER = msgspec.msgpack.Decoder(list[msgspec.Raw])
_TRAILING = re.compile(r"trailing characters \(byte (\d+)\)")
_WINDOW = 1 << 16


def array_items(buf: bytes, levels: int) -> list[tuple[bytes, int]]:
    """The items of the array that is all of `buf`, each with how deep it nests, fast
    for a long batch of shallow events: msgspec splits windows of the array that hold
    at most `levels` bytes that could open a container (so it cannot recurse deeper),
    and the walker takes only the items no such window holds. An item msgspec split
    carries `levels` (meaning at most that); the walker's carry their exact depth.
    """
    end = len(buf)
    kind, pos, count = _head(buf, 0, end)
    if kind != _ARRAY:
        raise MalformedError("expected an array")
    found: list[tuple[bytes, int]] = []
    window, walk_only = _WINDOW, False
    while len(found) < count:
        split: list[bytes] = []
        if not walk_only:
            chunk = buf[pos : pos + window]
            bound = container_bound(chunk)
            if bound > levels:  # cut to hold `levels` at most, from the density seen
                chunk = chunk[: max(64, len(chunk) * levels // bound * 9 // 10)]
                bound = container_bound(chunk)
            window = max(4096, min(_WINDOW, len(chunk) * levels // max(bound, 1)))
            guess = count - len(found)
            if found:
                guess = min(guess, max(1, int(len(chunk) * len(found) / (pos - 1) * 0.9)))
            if bound <= levels:
                split, walk_only = _split_prefix(chunk, guess)
        if split:
            found += [(item, levels) for item in split]
            pos += sum(map(len, split))
            continue
        stop, deepest = skip(buf, pos)  # an item no window could hold, or malformed bytes
        found.append((buf[pos:stop], deepest))
        pos = stop
    _check_end(pos, end)
    return found


def _split_prefix(chunk: bytes, guess: int) -> tuple[list[bytes], bool]:
    """The whole items at the start of `chunk` (at most `guess`), found by msgspec from
    where its error says the last of them ended; and whether the bytes are malformed
    (then the walker takes the rest: it says where, in the same words)."""
    while guess:
        header = b"\xdd" + guess.to_bytes(4, "big")
        try:
            return [bytes(item) for item in _SPLITTER.decode(header + chunk)], False
        except msgspec.DecodeError as exc:
            message = str(exc)
        trailing = _TRAILING.search(message)
        if trailing is not None:
            used = int(trailing.group(1)) - len(header)
            try:
                items = _SPLITTER.decode(header + chunk[:used])
            except msgspec.DecodeError:  # not msgspec's usual message after all
                return [], True
            return [bytes(item) for item in items], False
        if "truncated" not in message:
            return [], True
        guess //= 4  # fewer items than guessed fit in the window
    return [], False


def within(value: bytes, levels: int) -> bool:
    """Whether the well-formed value nests at most `levels` deep; cheap when it does
    by a wide margin, as ordinary payloads do."""
    if len(value) <= levels:
        return True
    raw = bytes(value)
    return container_bound(raw) <= levels or value_depth(raw) <= levels


def flatten(buf: bytes, levels: int) -> bytes:
    """The well-formed value `buf` cut to nest at most `levels` (>= 1) deep: an array
    or map at that level keeps its kind but loses its items. Above it the shape is the
    same, so a recursive decoder meets the same types at every level it looks at."""
    out = bytearray()
    end = len(buf)
    pos = 0
    stack: list[int] = []  # items left in each open container
    left = 1
    while left or stack:
        if not left:
            left = stack.pop()
            continue
        left -= 1
        kind, start, length = _head(buf, pos, end)
        if kind in (_SCALAR, _SIZED):
            stop = start + length  # a sized token's length is its payload's
            if stop > end:
                raise _truncated()
            out += buf[pos:stop]
            pos = stop
        elif len(stack) + 1 >= levels:
            out += _EMPTY[kind]
            pos = skip(buf, pos)[0]
        else:
            out += buf[pos:start]
            pos = start
            stack.append(left)
            left = length
    _check_end(pos, end)
    return bytes(out)


# JSON: a string (escapes included, or unterminated to the end) or a bracket.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


def json_within(text: bytes | str, levels: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects at most `levels` deep. Brackets in
    strings do not count; the text need not be valid (its decoder says what is wrong)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if raw.count(b"[") + raw.count(b"{") <= levels:
        return True
    depth = 0
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > levels:
                return False
        elif token in (b"]", b"}"):
            depth -= 1
    return True
