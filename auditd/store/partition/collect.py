"""Collecting the postings of a partition being sealed, in bounded memory.

Postings are gathered per *run* of RUN_RECORDS records, in dicts from a value to the
arrays its occurrence appends to (its own term's and its words'), because a dict
lookup and array appends are the cheapest per-occurrence work Python has: at ~35
postings an event this loop is most of the sealing CPU. Ids and causation ids are
near-unique, so they skip the dicts and go straight to *singles* (one integer
`key << 24 | offset` per posting). At the end of a run, terms with at most
SINGLE_POSTINGS postings in it join the singles too and the others are spilled with
their text; everything goes to one of 2**STRIPE_BITS unlinked temporary files chosen
by the key's top bits. `assemble` then reads one stripe at a time (1/32 of the terms),
so a term's postings from every run meet without a sort of the whole partition.
"""

from __future__ import annotations

import tempfile
import zlib
from array import array
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, TypeAlias

import msgspec

from auditd.store.partition.fields import BuildFields, data_strings, decode_data, decode_tags
from auditd.store.partition.layout import (
    ACTOR,
    CAUSATION,
    COMM,
    CORRELATION,
    DEAD_LETTER,
    ID,
    SEED,
    SINGLE_CORRELATION_POSTINGS,
    SINGLE_POSTINGS,
    STREAM,
    STRIPE_BITS,
    TAG,
    TAG_SEPARATOR,
    TARGET,
    TYPE,
    UID,
    WORD,
    array_bytes,
    array_from,
    word_bytes,
)

# A grouped term of one run: key, term text, run, offsets in the run ('H' array
# bytes), and for a stream term the stream_seq of each ('q' array bytes).
GroupedTerm = tuple[int, str, int, bytes, bytes | None]
# One run's share of a stripe: its singles ('Q' array bytes, sorted) and grouped terms.
RunStripe = tuple[bytes, list[GroupedTerm]]
_spill_encoder = msgspec.msgpack.Encoder()
_spill_decoder = msgspec.msgpack.Decoder(tuple[bytes, list[GroupedTerm]])
_ID_SEED, _CAUSATION_SEED = SEED[ID], SEED[CAUSATION]
_crc32 = zlib.crc32
_SINGLE_SHIFT = 24 + 32 - STRIPE_BITS  # a single's stripe
PERSISTENT_VALUES = 250_000  # ~135 MB peak at 1M soak events (~235k values)
Postings: TypeAlias = "array[int]"  # array("H") of offsets within the run
_new_postings = partial(array, "H")


class _WordsOf(dict[Any, tuple[Postings, ...]]):
    """value -> the postings its occurrence appends to: its own term's (with `own`),
    then its words'. Filled on first sight; a hit is a plain dict lookup in C."""

    def __init__(self, words: defaultdict[bytes, Postings], own: bool,
                 text: Callable[[Any], str] = str) -> None:
        super().__init__()
        self.words, self.own, self.text = words, own, text

    def __missing__(self, value: Any) -> tuple[Postings, ...]:
        words = self.words
        found = tuple(words[word] for word in word_bytes(self.text(value)))
        if self.own:
            found = (array("H"), *found)
        self[value] = found
        return found


class _TagMaps(dict[bytes, tuple[Postings, ...]]):
    """A record's tags (the map's MessagePack) -> the postings of all its tags."""

    def __init__(self, tags: _WordsOf) -> None:
        super().__init__()
        self.tags = tags

    def __missing__(self, raw: bytes) -> tuple[Postings, ...]:
        found = tuple(postings for pair in decode_tags(raw).items()
                      for postings in self.tags[pair])
        self[raw] = found
        return found


def _new_stream() -> tuple[Postings, array[int]]:
    return array("H"), array("q")


class RunCollector:
    """The postings of the current run; `add` is the per-record hot path.

    The dicts outlive a run: `spill` empties their arrays in place, so a value seen in
    an earlier run costs no tokenizing and no new arrays (at 1M soak events, most
    targets recur run after run), until they hold PERSISTENT_VALUES values and are
    dropped to bound memory. Correlation ids are dropped every run: they recur only
    within seconds.
    """

    def __init__(self) -> None:
        self.base = 0  # partition offset of the run's first record
        self._fresh()
        self.correlations: defaultdict[str, Postings] = defaultdict(_new_postings)
        self.singles = array("Q")
        self.dead = array("H")
        self.ts = array("q")
        self._last_ts = 0
        self.singles_by_field: Counter[str] = Counter()
        # Every filter field's term keys, each run's (repeats across runs): the term
        # filter's input (term_filter.py). ~12 bytes an event at the soak's cardinalities.
        self.filter_keys = array("I")

    def _fresh(self) -> None:
        self.words: defaultdict[bytes, Postings] = defaultdict(_new_postings)
        self.types = _WordsOf(self.words, True)
        self.actors = _WordsOf(self.words, True)
        self.targets = _WordsOf(self.words, True)
        self.tags = _WordsOf(self.words, True, itemgetter(1))  # (key, value) -> ...
        self.tag_maps = _TagMaps(self.tags)
        self.data_words = _WordsOf(self.words, False)  # a data string's words
        self.comms: defaultdict[str, Postings] = defaultdict(_new_postings)
        self.uids: defaultdict[int, Postings] = defaultdict(_new_postings)
        self.streams: defaultdict[str, tuple[Postings, array[int]]] = defaultdict(_new_stream)

    def start_run(self, base: int) -> None:
        self.base = base
        self.singles = array("Q")
        self.dead = array("H")
        self.ts = array("q")
        self.correlations = defaultdict(_new_postings)
        held = sum(len(values) for values in (
            self.types, self.actors, self.targets, self.tags, self.tag_maps, self.data_words,
            self.comms, self.uids, self.streams, self.words))
        if held > PERSISTENT_VALUES:
            self._fresh()

    def add(self, offset: int, fields: BuildFields) -> None:
        if fields.dead_letter:
            self.dead.append(offset)
            self.ts.append(self._last_ts)  # widens a zone's range, never narrows it
            return
        self.ts.append(fields.ts)
        self._last_ts = fields.ts
        single = self.base + offset
        self.singles.append(_crc32(fields.id.encode(), _ID_SEED) << 24 | single)
        value = fields.causation_id
        if value is not None:
            key = _crc32(value.encode(), _CAUSATION_SEED)
            self.singles.append(key << 24 | single)
            self.filter_keys.append(key)
        for postings in self.types[fields.type]:
            postings.append(offset)
        value = fields.actor
        if value is not None:
            for postings in self.actors[value]:
                postings.append(offset)
        value = fields.target
        if value is not None:
            for postings in self.targets[value]:
                postings.append(offset)
        if fields.tags:
            for postings in self.tag_maps[bytes(fields.tags)]:
                postings.append(offset)
        value = fields.correlation_id
        if value is not None:
            self.correlations[value].append(offset)
        self.comms[fields.comm].append(offset)
        self.uids[fields.uid].append(offset)
        value = fields.stream
        if value is not None:
            stream = self.streams[value]
            stream[0].append(offset)
            stream[1].append(fields.stream_seq or 0)
        data = decode_data(fields.data)
        if data is not None:
            data_words = self.data_words
            for text in data.values() if type(data) is dict else (data,):
                if type(text) is str:
                    for postings in data_words[text]:
                        postings.append(offset)
                elif type(text) in (dict, list):
                    for nested in data_strings(text):
                        for postings in data_words[nested]:
                            postings.append(offset)

    def spill(self, run: int) -> list[RunStripe]:
        """This run's terms by stripe. A word's offsets may repeat (one word in two
        strings of a record): readers take postings as sets."""
        grouped: list[list[GroupedTerm]] = [[] for _ in range(1 << STRIPE_BITS)]
        singles, base, crc32, counts = self.singles, self.base, zlib.crc32, self.singles_by_field
        events = len(self.ts) - len(self.dead)
        counts.update({ID: events, CAUSATION: len(singles) - events})
        shift = 32 - STRIPE_BITS
        tag_text = TAG_SEPARATOR.join
        sources: list[tuple[str, Iterable[tuple[bytes, Postings]]]] = [
            (TYPE, ((v.encode(), p[0]) for v, p in self.types.items() if p[0])),
            (ACTOR, ((v.encode(), p[0]) for v, p in self.actors.items() if p[0])),
            (TARGET, ((v.encode(), p[0]) for v, p in self.targets.items() if p[0])),
            (TAG, ((tag_text(v).encode(), p[0]) for v, p in self.tags.items() if p[0])),
            (CORRELATION, ((v.encode(), p) for v, p in self.correlations.items())),
            (COMM, ((v.encode(), p) for v, p in self.comms.items() if p)),
            (UID, ((str(v).encode(), p) for v, p in self.uids.items() if p)),
            (WORD, ((v, p) for v, p in self.words.items() if p)),
        ]
        keep_key = self.filter_keys.append
        for letter, entries in sources:
            seed, alone = SEED[letter], 0
            most = SINGLE_CORRELATION_POSTINGS if letter == CORRELATION else SINGLE_POSTINGS
            for raw, one in entries:
                key = crc32(raw, seed)
                keep_key(key)
                if len(one) == 1:
                    alone += 1
                    singles.append(key << 24 | base | one[0])
                elif len(one) <= most:
                    alone += len(one)
                    singles.extend([key << 24 | base | offset for offset in one])
                else:
                    grouped[key >> shift].append(
                        (key, letter + raw.decode(), run, array_bytes(one), None))
                del one[:]
            counts[letter] += alone
        seed = SEED[STREAM]
        for stream, (one, stream_seqs) in self.streams.items():
            if not one:
                continue
            key = crc32(stream.encode(), seed)
            keep_key(key)
            grouped[key >> shift].append(
                (key, STREAM + stream, run, array_bytes(one), array_bytes(stream_seqs)))
            del one[:], stream_seqs[:]
        if self.dead:
            key = crc32(b"", SEED[DEAD_LETTER])
            grouped[key >> shift].append((key, DEAD_LETTER, run, array_bytes(self.dead), None))
        ordered = sorted(singles)
        out: list[RunStripe] = []
        at = 0
        for stripe in range(1 << STRIPE_BITS):
            end = bisect_left(ordered, (stripe + 1) << _SINGLE_SHIFT, at)
            out.append((array_bytes(array("Q", ordered[at:end])), grouped[stripe]))
            at = end
        return out


class StripeFiles:
    """Unlinked temporary files, one per stripe: a SIGKILL leaves nothing behind."""

    def __init__(self, directory: Path) -> None:
        self.files: list[IO[bytes]] = [
            tempfile.TemporaryFile(dir=directory, prefix=".seal-")  # noqa: SIM115  # closed by close()
            for _ in range(1 << STRIPE_BITS)]
        self.entries = 0  # singles and grouped terms spilled: bounds the distinct count

    def write(self, stripes: list[RunStripe]) -> None:
        for file, (singles, grouped) in zip(self.files, stripes, strict=True):
            if singles or grouped:
                data = _spill_encoder.encode((singles, grouped))
                file.write(len(data).to_bytes(8, "little"))
                file.write(data)
                self.entries += len(singles) // 8 + len(grouped)

    def read(self, stripe: int) -> tuple[list[int], list[GroupedTerm]]:
        """A stripe's singles (sorted) and grouped terms (in run order), then forgets it."""
        file = self.files[stripe]
        file.seek(0)
        singles = array("Q")
        grouped: list[GroupedTerm] = []
        while header := file.read(8):
            run_singles, run_grouped = _spill_decoder.decode(
                file.read(int.from_bytes(header, "little")))
            singles.extend(array_from("Q", run_singles))
            grouped.extend(run_grouped)
        file.seek(0)
        file.truncate()
        return sorted(singles), grouped

    def close(self) -> None:
        for file in self.files:
            file.close()
