"""The tokens a request keeps of each text once it is tokenized, without the tokenizer's overflow.

A tokenizer makes every token of a text before truncation keeps the first ``max_length``; the rest stays
with its ``Encoding`` as overflow (with the demo model's tokenizer about 165 bytes per character of
punctuation) for as long as the encoding lives, and an ``Encoding`` costs about 1 KB however short its
text. A request tokenized off the event loop waits for its model and runs holding its tokens, so
``KeptBuilder`` turns its encodings, slice by slice on the tokenizer's thread (``core.service``), into a
``KeptBatch``: the kept tokens only, in one int32 table per slice (a row per attribute, the texts' tokens
one after another), with each text's first token and whether it lost tokens. It reads as a sequence of
``KeptTokens``, one text's view of the table made when it is read, with the attributes that the
pipeline, the task post-processing, chunking and execution read (``ids``, ``type_ids``,
``attention_mask``, and ``overflowing``, which only says whether the text lost tokens;
``special_tokens_mask``, ``offsets``, ``sequence_ids`` and ``tokens`` for the tasks that map tokens back to
the text, token strings shared between texts). They read as an ``Encoding``'s do (Python lists on each
read), so a batch may mix both (short requests are tokenized on the loop and keep their encodings).

Measured with the demo model's tokenizer (max length 256): a request of a million '!' in texts of 2,000
characters held 173 MB as encodings and holds about 3 MB as kept tokens; a million texts of one character
held about 1 GB as encodings and 416 MB as one table per text, and hold 62 MB now (three tokens of 12 bytes
and 9 bytes of the text's place each, and the allocator's share); with positions 528 MB before, 137 MB now.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, overload

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding

NO_SEQUENCE = -1
"""``sequence_ids`` of a special token (None in an ``Encoding``), as kept."""

LOST: tuple[bool, ...] = (True,)
"""``overflowing`` of kept tokens whose text lost tokens (the overflow itself is dropped); else ``()``."""

IDS, TYPE_IDS, ATTENTION, SPECIAL, START, END, SEQUENCE = range(7)
"""The rows of a kept table: the token tensors' values, then (with positions) the rest."""

Table = npt.NDArray[np.int32]


class TokenizedText(Protocol):
    """What is read of one text's tokens: an ``Encoding``, or the ``KeptTokens`` of one."""

    @property
    def ids(self) -> list[int]: ...
    @property
    def type_ids(self) -> list[int]: ...
    @property
    def attention_mask(self) -> list[int]: ...
    @property
    def special_tokens_mask(self) -> list[int]: ...
    @property
    def offsets(self) -> list[tuple[int, int]]: ...
    @property
    def sequence_ids(self) -> list[int | None]: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def overflowing(self) -> Sequence[object]: ...


class KeptTokens:
    """One text's kept tokens (see the module); read like an ``Encoding``. Without positions only the token
    tensors' values are kept (``ids``, ``type_ids``, ``attention_mask``): what maps tokens back to the text
    (``offsets``, ``sequence_ids``, ``special_tokens_mask``, ``tokens``) is kept for the tasks that read it
    (``TextPipeline.reads_positions``)."""

    __slots__ = ("_table", "_tokens", "overflowing")

    def __init__(self, table: Table, tokens: Sequence[str] | None, lost: bool) -> None:
        self._table = table  # a row per attribute, a column per token
        self._tokens = tokens
        self.overflowing = LOST if lost else ()  # only whether it lost any

    def __len__(self) -> int:
        return int(self._table.shape[1])

    def _row(self, row: int) -> list[int]:
        if row >= len(self._table):
            raise AttributeError("these tokens were kept without their positions (tokens, offsets)")
        return list(self._table[row].tolist())

    @property
    def ids(self) -> list[int]:
        return self._row(IDS)

    @property
    def type_ids(self) -> list[int]:
        return self._row(TYPE_IDS)

    @property
    def attention_mask(self) -> list[int]:
        return self._row(ATTENTION)

    @property
    def special_tokens_mask(self) -> list[int]:
        return self._row(SPECIAL)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        return list(zip(self._row(START), self._row(END), strict=True))

    @property
    def sequence_ids(self) -> list[int | None]:
        return [None if s == NO_SEQUENCE else s for s in self._row(SEQUENCE)]

    @property
    def tokens(self) -> list[str]:
        if self._tokens is None:
            raise AttributeError("these tokens were kept without their positions (tokens, offsets)")
        return list(self._tokens)


class KeptBatch(Sequence[TokenizedText]):
    """The kept tokens of a request's texts (see the module): slices of it share the tables."""

    def __init__(
        self,
        parts: Sequence[tuple[Table, Sequence[str] | None]],
        part_starts: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        lost: npt.NDArray[np.bool_],
    ) -> None:
        self._parts = parts  # per slice of texts: its table and, with positions, its token strings
        self._part_starts = part_starts  # the first token of each part, counted over all parts
        self._starts = starts  # the first token of each text, and after the last: one more than the texts
        self._lost = lost  # whether each text lost tokens

    def __len__(self) -> int:
        return len(self._lost)

    @overload
    def __getitem__(self, index: int) -> TokenizedText: ...
    @overload
    def __getitem__(self, index: slice) -> KeptBatch: ...
    def __getitem__(self, index: int | slice) -> TokenizedText | KeptBatch:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("kept tokens are sliced in order")
            stop = max(start, stop)
            return KeptBatch(self._parts, self._part_starts, self._starts[start : stop + 1], self._lost[start:stop])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("text index out of range")
        first, last = int(self._starts[index]), int(self._starts[index + 1])
        part = max(0, int(np.searchsorted(self._part_starts, first, side="right")) - 1)
        if first == last:  # no tokens (an empty text without special tokens): any part's empty view
            part = 0
        table, tokens = self._parts[part]
        base = int(self._part_starts[part])
        kept = None if tokens is None else tokens[first - base : last - base]
        return KeptTokens(table[:, first - base : last - base], kept, bool(self._lost[index]))

    def __iter__(self) -> Iterator[TokenizedText]:
        for index in range(len(self)):
            yield self[index]

    def lengths(self) -> npt.NDArray[np.int64]:
        """Each text's kept tokens."""
        return np.diff(self._starts)


class KeptBuilder:
    """Kept tokens made slice by slice (``add`` each slice's encodings, then drop them), then ``build``."""

    def __init__(self, positions: bool = True) -> None:
        self.positions = positions
        self._parts: list[tuple[Table, Sequence[str] | None]] = []
        self._lengths: list[npt.NDArray[np.int64]] = []
        self._lost: list[npt.NDArray[np.bool_]] = []

    def add(self, encodings: Sequence[Encoding]) -> None:
        """Keep the tokens of the next slice of texts, in order."""
        count = len(encodings)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=count)
        total = int(lengths.sum())
        table: Table = np.empty((7 if self.positions else 3, total), dtype=np.int32)

        def fill(row: int, values: Iterable[Any]) -> None:
            table[row] = np.fromiter(values, dtype=np.int32, count=total)

        chain = itertools.chain.from_iterable
        fill(IDS, chain(e.ids for e in encodings))
        fill(TYPE_IDS, chain(e.type_ids for e in encodings))
        fill(ATTENTION, chain(e.attention_mask for e in encodings))
        tokens: list[str] | None = None
        if self.positions:
            fill(SPECIAL, chain(e.special_tokens_mask for e in encodings))
            offsets = [o for e in encodings for o in e.offsets]
            fill(START, (start for start, _ in offsets))
            fill(END, (end for _, end in offsets))
            del offsets
            fill(SEQUENCE, (NO_SEQUENCE if s is None else s for e in encodings for s in e.sequence_ids))
            tokens = list(map(sys.intern, chain(e.tokens for e in encodings)))
        self._parts.append((table, tokens))
        self._lengths.append(lengths)
        self._lost.append(np.fromiter((bool(e.overflowing) for e in encodings), dtype=np.bool_, count=count))

    def build(self) -> KeptBatch:
        """The kept tokens of every slice added, in order."""
        if not self._parts:
            self.add([])
        lengths = np.concatenate(self._lengths)
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        part_starts = np.zeros(len(self._parts), dtype=np.int64)
        np.cumsum(np.array([table.shape[1] for table, _ in self._parts[:-1]], dtype=np.int64), out=part_starts[1:])
        return KeptBatch(self._parts, part_starts, starts, np.concatenate(self._lost))


def compact(encodings: Sequence[Encoding], positions: bool = True) -> KeptBatch:
    """The kept tokens of ``encodings``, their overflow dropped (the encodings may be dropped then); with
    ``positions``, also what maps them back to the text (see ``KeptTokens``)."""
    builder = KeptBuilder(positions)
    builder.add(encodings)
    return builder.build()


def token_counts(encodings: Sequence[TokenizedText]) -> list[int]:
    """The tokens of each text (of a ``KeptBatch`` without reading each text)."""
    if isinstance(encodings, KeptBatch):
        return [int(n) for n in encodings.lengths().tolist()]
    return [len(e.ids) for e in encodings]
