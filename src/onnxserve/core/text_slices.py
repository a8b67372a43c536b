"""Larger text requests are tokenized in slices: a few thousand texts, or about 64 Ki characters, per
tokenizer call, each on one of the service's threads (``InferenceService._tokenize_in_slices``).

A tokenizer call cannot be stopped once its thread runs it: a request of a million one-character texts
took about 14 s in one call, and a client that left, a passed time limit or a drain that ended had to wait
for all of it (an outside attack saw a shutdown take 20 s with ``--drain-timeout 5``). Between two slices
the service looks whether the request may go on (its caller still waits, the budgets it holds are still
open), so stopping waits for one slice at most, well under a second. Each slice's encodings are turned
into kept tokens (``core.tokens``) on its thread and dropped before the next slice starts, so a request
holds one slice's encodings (the tokenizer's overflow included) at a time, not all of them.

Slices are bounded in texts and in characters; the tokenizer still runs each slice's texts in parallel.
"""

from __future__ import annotations

import time

from onnxserve.core.pipeline import TextBatch, TextPipeline
from onnxserve.core.tokens import KeptBuilder

SLICE_TEXTS = 4096
"""The most texts of one tokenizer call of a sliced request (about 60 ms of one-character texts)."""

SLICE_CHARACTERS = 64 * 1024
"""The most characters of one tokenizer call of a sliced request (a text longer than that is a slice of its
own; texts are cut to ``TextPipeline.max_characters`` before)."""


def slice_end(text: TextBatch, start: int) -> int:
    """Where the slice of ``text``'s rows that begins at ``start`` ends (its pairs counted with them)."""
    stop = min(len(text.texts), start + SLICE_TEXTS)
    characters = 0
    for row in range(start, stop):
        characters += len(text.texts[row]) + (len(text.pairs[row]) if text.pairs is not None else 0)
        if characters > SLICE_CHARACTERS and row > start:
            return row
    return stop


def tokenize_slice(pipeline: TextPipeline, text: TextBatch, builder: KeptBuilder, start: int) -> tuple[int, int]:
    """Tokenize the slice of rows that begins at ``start`` into ``builder`` (on a worker thread); returns
    where the next slice begins and the time it took."""
    began = time.perf_counter_ns()
    stop = slice_end(text, start)
    pairs = text.pairs[start:stop] if text.pairs is not None else None
    encodings = pipeline.tokenize(TextBatch(text.texts[start:stop], pairs))
    builder.add(encodings)
    del encodings  # the overflow goes with the encodings
    return stop, time.perf_counter_ns() - began
