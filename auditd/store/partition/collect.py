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
from bisect import bisect_left
from collections import Counter
import zlib
from array import array
from pathlib import Path
from typing import IO, Any

import msgspec

from auditd.store.partition.fields import IndexedFields, data_strings
from auditd.store.partition.layout import (
    ACTOR,
    CAUSATION,
    COMM,
    CORRELATION,
    DEAD_LETTER,
    ID,
    SEED,
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
_SINGLE_SHIFT = 24 + 32 - STRIPE_BITS  # a single's stripe
PERSISTENT_VALUES = 300_000
Postings = array  # array("H") of offsets within the run


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
        self.singles = array("Q")
        self.dead = array("H")
        self.ts = array("q")
        self._last_ts = 0
        self.singles_by_field: Counter[str] = Counter()

    def _fresh(self) -> None:
        # value -> (its term's postings, *its words' postings)
        self.types: dict[str, tuple[Postings, ...]] = {}
        self.actors: dict[str, tuple[Postings, ...]] = {}
        self.targets: dict[str, tuple[Postings, ...]] = {}
        self.tags: dict[tuple[str, str], tuple[Postings, ...]] = {}
        self.data_words: dict[str, tuple[Postings, ...]] = {}  # a data string's words
        self.correlations: dict[str, Postings] = {}
        self.comms: dict[str, Postings] = {}
        self.uids: dict[int, Postings] = {}
        self.streams: dict[str, tuple[Postings, array[int]]] = {}
        self.words: dict[bytes, Postings] = {}

    def start_run(self, base: int) -> None:
        self.base = base
        self.singles = array("Q")
        self.dead = array("H")
        self.ts = array("q")
        self.correlations = {}
        held = sum(map(len, (self.types, self.actors, self.targets, self.tags,
                             self.data_words, self.comms, self.uids, self.streams, self.words)))
        if held > PERSISTENT_VALUES:
            self._fresh()

    def add(self, offset: int, fields: IndexedFields) -> None:
        if fields.dead_letter:
            self.dead.append(offset)
            self.ts.append(self._last_ts)  # widens a zone's range, never narrows it
            return
        self.ts.append(fields.ts)
        self._last_ts = fields.ts
        single = self.base + offset
        self.singles.append(zlib.crc32(fields.id.encode(), _ID_SEED) << 24 | single)
        value = fields.causation_id
        if value is not None:
            self.singles.append(zlib.crc32(value.encode(), _CAUSATION_SEED) << 24 | single)
        value = fields.type
        for postings in self.types.get(value) or self._with_words(self.types, value, value):
            postings.append(offset)
        value = fields.actor
        if value is not None:
            for postings in (self.actors.get(value)
                             or self._with_words(self.actors, value, value)):
                postings.append(offset)
        value = fields.target
        if value is not None:
            for postings in (self.targets.get(value)
                             or self._with_words(self.targets, value, value)):
                postings.append(offset)
        if fields.tags:
            tags = self.tags
            for pair in fields.tags.items():
                for postings in tags.get(pair) or self._with_words(tags, pair, pair[1]):
                    postings.append(offset)
        value = fields.correlation_id
        if value is not None:
            one = self.correlations.get(value)
            if one is None:
                one = self.correlations[value] = array("H")
            one.append(offset)
        one = self.comms.get(fields.comm)
        if one is None:
            one = self.comms[fields.comm] = array("H")
        one.append(offset)
        one = self.uids.get(fields.uid)
        if one is None:
            one = self.uids[fields.uid] = array("H")
        one.append(offset)
        value = fields.stream
        if value is not None:
            stream = self.streams.get(value)
            if stream is None:
                stream = self.streams[value] = (array("H"), array("q"))
            stream[0].append(offset)
            stream[1].append(fields.stream_seq or 0)
        data = fields.data
        if data is not None:
            cache = self.data_words
            for text in data.values() if type(data) is dict else (data,):
                if type(text) is str:
                    for postings in cache.get(text) or self._words_of(text):
                        postings.append(offset)
                elif type(text) in (dict, list):
                    for nested in data_strings(text):
                        for postings in cache.get(nested) or self._words_of(nested):
                            postings.append(offset)

    def _with_words(self, values: Any, value: Any, text: str) -> tuple[Postings, ...]:
        found: tuple[Postings, ...] = (array("H"), *self._word_postings(text))
        values[value] = found
        return found

    def _words_of(self, text: str) -> tuple[Postings, ...]:
        found = self.data_words[text] = self._word_postings(text)
        return found

    def _word_postings(self, text: str) -> tuple[Postings, ...]:
        found = []
        all_words = self.words
        for word in word_bytes(text):
            postings = all_words.get(word)
            if postings is None:
                postings = all_words[word] = array("H")
            found.append(postings)
        return tuple(found)

    def spill(self, run: int) -> list[RunStripe]:
        """This run's terms by stripe. A word's offsets may repeat (one word in two
        strings of a record): readers take postings as sets."""
        grouped: list[list[GroupedTerm]] = [[] for _ in range(1 << STRIPE_BITS)]
        singles, base, crc32, counts = self.singles, self.base, zlib.crc32, self.singles_by_field
        events = len(self.ts) - len(self.dead)
        counts.update({ID: events, CAUSATION: len(singles) - events})
        shift = 32 - STRIPE_BITS
        for letter, values in ((TYPE, self.types), (ACTOR, self.actors),
                               (TARGET, self.targets), (TAG, self.tags)):
            seed, alone = SEED[letter], 0
            for value, postings in values.items():
                one = postings[0]
                if not one:
                    continue
                text = value if letter != TAG else value[0] + TAG_SEPARATOR + value[1]
                key = crc32(text.encode(), seed)
                if len(one) == 1:
                    alone += 1
                    singles.append(key << 24 | base | one[0])
                elif len(one) <= SINGLE_POSTINGS:
                    alone += len(one)
                    singles.extend([key << 24 | base | offset for offset in one])
                else:
                    grouped[key >> shift].append((key, letter + text, run, array_bytes(one), None))
                del one[:]
            counts[letter] += alone
        for letter, plain in ((CORRELATION, self.correlations), (COMM, self.comms),
                              (WORD, self.words), (UID, self.uids)):
            seed, alone = SEED[letter], 0
            for value, one in plain.items():
                if not one:
                    continue
                raw = (value.encode() if letter != WORD and letter != UID
                       else str(value).encode() if letter == UID else value)
                key = crc32(raw, seed)
                if len(one) == 1:
                    alone += 1
                    singles.append(key << 24 | base | one[0])
                elif len(one) <= SINGLE_POSTINGS:
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
        self.files: list[IO[bytes]] = [tempfile.TemporaryFile(dir=directory, prefix=".seal-")
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
