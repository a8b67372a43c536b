"""Work: one validated request ready to run, and how a batch of them runs as one model execution.

Tensor requests merge along dimension 0 and only when every other dimension agrees (the batch key
says so). Text requests are tokenized before they queue; a batch of them is padded once to its own
longest sequence, run, post-processed, and split back so that each caller receives exactly its rows
(token-level outputs cut back to the caller's own longest sequence).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.pace import Parts
from onnxserve.core.pipeline import TOKEN_COUNT_OUTPUT, TextBatch, TextPipeline, truncated_count
from onnxserve.core.progress import Progress
from onnxserve.core.runtime import ModelSession, RunControl
from onnxserve.core.tokens import TokenizedText, token_counts
from onnxserve.core.types import TensorSpec
from onnxserve.core.wire import MAX_BYTES_ELEMENTS, response_too_large, too_many_bytes_elements
from onnxserve.log_throttle import LogThrottles

Arrays = dict[str, npt.NDArray[Any]]

log = logging.getLogger(__name__)

_UNSPLIT = LogThrottles()
"""Each model's line about merged requests run again one by one: every merged batch of such a model
writes it, as often as its clients send requests at once."""


@dataclass(eq=False)
class Work:
    """One request, validated: token tensors, or texts already tokenized."""

    fetch: list[str]  # graph outputs to compute
    rows: int  # rows along dimension 0 (texts, for text)
    feeds: Arrays | None = None
    text: TextBatch | None = None
    encodings: Sequence[TokenizedText] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)  # text: the outputs to answer with, in order
    max_output_bytes: int = 0  # the most its outputs may take (0: no limit), checked before they are converted
    client: str = ""  # who sent it, opaque (``core.fairness``): schedulers serve clients round-robin
    progress: Progress = field(default_factory=Progress)  # its request's: waiting or started (``core.progress``)
    inline: bool = True  # may run on the event loop (``core.inline_runs``); False: its time limit is near
    deadline: float | None = None  # when its time limit passes (the event loop's clock), None: no limit
    parts: Parts | None = None  # the request it is a part of, when answered in several (``core.pace``)
    tokens: int = 0  # token tensors sent to a text model: their tokens per row (its pipeline's token inputs)

    @property
    def key(self) -> Hashable:
        """Works with equal keys may share a batch (token counts are computed for any work that asks)."""
        if self.text is not None:
            return ("text", tuple(self.fetch), tuple(a for a in self.answer if a != TOKEN_COUNT_OUTPUT))
        assert self.feeds is not None
        shapes = tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in self.feeds.items()))
        return ("tensors", shapes, tuple(self.fetch))

    @property
    def longest(self) -> int:
        """The longest token sequence (text, or token tensors: ``tokens``, else ``input_ids``), for token
        budgets and grouping by length; 0 for other tensors."""
        if self.feeds is not None:
            if self.tokens:
                return self.tokens
            ids = self.feeds.get("input_ids")
            return int(ids.shape[1]) if ids is not None and ids.ndim == 2 else 0
        return max(token_counts(self.encodings), default=0)


@dataclass(frozen=True)
class Outcome:
    outputs: Arrays
    input_ns: int  # merging and padding (tokenization happened before queueing)
    infer_ns: int
    output_ns: int  # splitting and task post-processing
    truncated: int = 0
    cpu_ns: int = 0  # tensor runs: CPU time of the thread that ran the execution (``core.inline_runs``)


def run_batch(
    session: ModelSession,
    works: Sequence[Work],
    control: RunControl,
    pipeline: TextPipeline | None,
    output_specs: Sequence[TensorSpec],
) -> list[Outcome]:
    """Run ``works`` (all with the same key) as one execution; one outcome per work, in order.

    ``control`` lets the scheduler stop the execution once no caller waits for it."""
    start = time.perf_counter_ns()
    first = works[0]
    if first.text is not None:
        assert pipeline is not None
        return _run_text(session, pipeline, output_specs, works, start, control)
    cpu_start = time.thread_time_ns()
    feeds = (
        first.feeds
        if len(works) == 1
        else {name: np.concatenate([w.feeds[name] for w in works if w.feeds is not None]) for name in first.feeds or {}}
    )
    assert feeds is not None
    merged_at = time.perf_counter_ns()
    outputs = session.run(feeds, first.fetch, control, *_limits(works))
    ran_at = time.perf_counter_ns()
    rows = sum(w.rows for w in works)
    if len(works) > 1 and any(array.ndim == 0 or array.shape[0] != rows for array in outputs.values()):
        # The graph's outputs do not follow its input rows (its batch dimension's name promised they would):
        # a merged answer cannot be split between the callers, so each runs alone, as it would have unmerged.
        throttle = _UNSPLIT.of(session.name)
        if count := throttle.due():
            log.warning(
                "model %s: outputs of %d merged requests do not have their %d rows; ran them one by one%s",
                session.name,
                len(works),
                rows,
                throttle.note(count),
            )
        return [run_batch(session, [work], control, pipeline, output_specs)[0] for work in works]
    parts = _split(outputs, [w.rows for w in works])
    done = time.perf_counter_ns()
    cpu = time.thread_time_ns() - cpu_start
    return [Outcome(part, merged_at - start, ran_at - merged_at, done - ran_at, cpu_ns=cpu) for part in parts]


def _run_text(
    session: ModelSession,
    pipeline: TextPipeline,
    output_specs: Sequence[TensorSpec],
    works: Sequence[Work],
    start: int,
    control: RunControl,
) -> list[Outcome]:
    encodings = [e for w in works for e in w.encodings]
    texts = [t for w in works if w.text is not None for t in w.text.texts]
    pairs = [p for w in works if w.text is not None and w.text.pairs is not None for p in w.text.pairs]
    batch = TextBatch(texts, pairs if pipeline.takes_pairs else None)
    encoded = pipeline.tensors(encodings)
    merged_at = time.perf_counter_ns()
    if pipeline.fixed_batch == 1 and len(encodings) > 1:  # the graph takes one text at a time
        runs = [
            session.run(
                {name: array[row : row + 1] for name, array in encoded.feeds.items()},
                works[0].fetch,
                control,
                *_limits(works),
            )
            for row in range(len(encodings))
        ]
        outputs = {name: np.concatenate([run[name] for run in runs]) for name in runs[0]}
    else:
        outputs = session.run(encoded.feeds, works[0].fetch, control, *_limits(works))
    ran_at = time.perf_counter_ns()
    answer = [a for a in works[0].answer if a != TOKEN_COUNT_OUTPUT]
    if any(TOKEN_COUNT_OUTPUT in w.answer for w in works):
        answer.append(TOKEN_COUNT_OUTPUT)
    _check_made(session.name, pipeline, outputs, answer, *_limits(works))
    answered = pipeline.postprocess(outputs, encoded, batch, answer)
    padded = encoded.feeds["input_ids"].shape[1]
    sequence_outputs = {s.name for s in output_specs if len(s.shape) >= 2 and s.shape[1] < 0}
    results = []
    for work, part in zip(works, _split(answered, [w.rows for w in works]), strict=True):
        own = work.longest
        for name in sequence_outputs & set(part):
            if part[name].shape[1] == padded:
                part[name] = part[name][:, :own]
        results.append({name: part[name] for name in work.answer})
    done = time.perf_counter_ns()
    return [
        Outcome(
            part,
            merged_at - start,
            ran_at - merged_at,
            done - ran_at,
            truncated_count(w.encodings, w.text.cut if w.text is not None else frozenset()),
        )
        for w, part in zip(works, results, strict=True)
    ]


def _check_made(
    model: str,
    pipeline: TextPipeline,
    outputs: Arrays,
    answer: Sequence[str],
    max_output_bytes: int,
    max_bytes_elements: int,
) -> None:
    """Refuse, before it is made, a post-processed result that takes the answer past its limits: the graph
    bounded its own outputs (``ModelSession.run``), but ``class_labels`` (one name per text and class) is
    made here after the run: 170 texts to a 20,000-class model made 3.4 M of them (outside attack rt27)."""
    made = pipeline.made_size(outputs, answer)
    if not made.elements:
        return
    if made.elements > max_bytes_elements:
        advice = "fewer texts, or the top class ('label', 'score') or 'probabilities' without 'class_labels'"
        raise too_many_bytes_elements(model, made.what, made.elements, max_bytes_elements, advice)
    size = made.size + sum(int(array.nbytes) for array in outputs.values())
    if 0 < max_output_bytes < size:
        raise response_too_large(model, size, max_output_bytes)


def _limits(works: Sequence[Work]) -> tuple[int, int]:
    """The most bytes, and BYTES elements per output, that one execution for ``works`` may answer."""
    size = 0 if any(w.max_output_bytes == 0 for w in works) else sum(w.max_output_bytes for w in works)
    return size, MAX_BYTES_ELEMENTS * len(works)


def _split(outputs: Arrays, rows: Sequence[int]) -> list[Arrays]:
    if len(rows) == 1:
        return [dict(outputs)]
    bounds = np.cumsum(rows)[:-1]
    parts: list[Arrays] = [{} for _ in rows]
    for name, array in outputs.items():
        for part, piece in zip(parts, np.split(array, bounds), strict=True):
            part[name] = piece
    return parts
