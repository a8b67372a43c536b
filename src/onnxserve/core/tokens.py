"""The tokens a request keeps of each text once it is tokenized, without the tokenizer's overflow.

A tokenizer makes every token of a text before truncation keeps the first ``max_length``; the rest stays
with its ``Encoding`` as overflow (with the demo model's tokenizer about 165 bytes per character of
punctuation) for as long as the encoding lives. A request tokenized off the event loop waits for its model
and runs holding its encodings, so ``compact`` turns them, on the tokenizer's thread, into ``KeptTokens``:
the kept tokens only, one int32 table per text, with the attributes that the pipeline, the task post-
processing, chunking and execution read (``ids``, ``type_ids``, ``attention_mask``, and ``overflowing``,
which only says whether the text lost tokens; ``special_tokens_mask``, ``offsets``, ``sequence_ids`` and
``tokens`` for the tasks that map tokens back to the text, token strings shared between texts). They read as
an ``Encoding``'s do (Python lists on each read), so a batch may mix both (short requests are tokenized on
the loop and keep their encodings).

Measured with the demo model's tokenizer (max length 256): a request of a million '!' in texts of 2,000
characters held 173 MB as encodings and holds about 3 MB as kept tokens; 200,000 texts of one character held
193 MB and hold 108 MB (85 MB without positions).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tokenizers import Encoding

NO_SEQUENCE = -1
"""``sequence_ids`` of a special token (None in an ``Encoding``), as kept."""

LOST: tuple[bool, ...] = (True,)
"""``overflowing`` of kept tokens whose text lost tokens (the overflow itself is dropped); else ``()``."""

IDS, TYPE_IDS, ATTENTION, SPECIAL, START, END, SEQUENCE = range(7)
"""The rows of a ``KeptTokens`` table: the token tensors' values, then (with positions) the rest."""


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
    """One text's kept tokens (see the module); read like an ``Encoding``. Without ``positions`` only the
    token tensors' values are kept (``ids``, ``type_ids``, ``attention_mask``): what maps tokens back to the
    text (``offsets``, ``sequence_ids``, ``special_tokens_mask``, ``tokens``) is kept for the tasks that
    read it (``TextPipeline.reads_positions``). One int32 table per text (a row per attribute) and token
    strings shared between texts keep a short text's cost below its encoding's."""

    __slots__ = ("_table", "_tokens", "overflowing")

    def __init__(self, encoding: Encoding, positions: bool = True) -> None:
        rows = [encoding.ids, encoding.type_ids, encoding.attention_mask]
        self._tokens: tuple[str, ...] | None = None
        if positions:
            offsets = encoding.offsets
            rows.append(encoding.special_tokens_mask)
            rows.append([start for start, _ in offsets])
            rows.append([end for _, end in offsets])
            rows.append([NO_SEQUENCE if s is None else s for s in encoding.sequence_ids])
            self._tokens = tuple(map(sys.intern, encoding.tokens))
        self._table = np.array(rows, dtype=np.int32).reshape(len(rows), len(encoding))
        self.overflowing = LOST if encoding.overflowing else ()  # only whether it lost any

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


def compact(encodings: Sequence[Encoding], positions: bool = True) -> list[TokenizedText]:
    """The kept tokens of each encoding, its overflow dropped (the encodings may be dropped then); with
    ``positions``, also what maps them back to the text (see ``KeptTokens``)."""
    return [KeptTokens(e, positions) for e in encodings]
