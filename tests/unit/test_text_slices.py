"""Larger text requests are tokenized in slices bounded in texts and characters (core/text_slices.py), so that
stopping one waits for a slice, not the whole request; small ones stay on the event loop, bounded in texts
too (a million empty texts hold no characters)."""

from __future__ import annotations

from onnxserve.core.pipeline import TextBatch
from onnxserve.core.service import INLINE_TOKENIZE_CHARACTERS, INLINE_TOKENIZE_TEXTS, _tokenizes_inline
from onnxserve.core.text_slices import SLICE_CHARACTERS, SLICE_TEXTS, slice_end


def _slices(text: TextBatch) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < len(text.texts):
        stop = slice_end(text, start)
        bounds.append((start, stop))
        start = stop
    return bounds


def test_slices_are_bounded_in_texts_and_characters_and_cover_every_row_in_order() -> None:
    short = TextBatch(["!"] * (2 * SLICE_TEXTS + 5))
    assert _slices(short) == [(0, SLICE_TEXTS), (SLICE_TEXTS, 2 * SLICE_TEXTS), (2 * SLICE_TEXTS, 2 * SLICE_TEXTS + 5)]
    long = TextBatch(["a" * 20_000] * 7)  # three fit 64 Ki characters, a fourth does not
    assert _slices(long) == [(0, 3), (3, 6), (6, 7)]
    huge = TextBatch(["a" * (SLICE_CHARACTERS + 1), "b", "c"])  # a text above the bound is a slice of its own
    assert _slices(huge) == [(0, 1), (1, 3)]
    pairs = TextBatch(["q"] * 4, ["c" * 30_000] * 4)  # the pairs' characters count with their rows
    assert _slices(pairs) == [(0, 2), (2, 4)]


def test_a_request_of_many_short_texts_is_not_tokenized_on_the_event_loop() -> None:
    assert _tokenizes_inline(TextBatch(["a sentence of a few words"] * 8))
    assert not _tokenizes_inline(TextBatch(["a" * (INLINE_TOKENIZE_CHARACTERS + 1)]))
    assert not _tokenizes_inline(TextBatch([""] * (INLINE_TOKENIZE_TEXTS + 1)))  # no characters, many texts
    assert not _tokenizes_inline(
        TextBatch([""] * (INLINE_TOKENIZE_TEXTS // 2 + 1), [""] * (INLINE_TOKENIZE_TEXTS // 2 + 1))
    )
