"""One request of a text model run as several executions: its rows in chunks within a token budget.

A text model's executions are bounded by a token budget (``ModelVersion.chunk_tokens``: the model's
``dynamic_batching.max_batch_tokens``, else ``registry.ADAPTIVE_MAX_TOKENS``), counted as rows x the
longest row's tokens. A request above it (many long texts, or token tensors such as ``input_ids``
[64, 512] sent directly) is cut along dimension 0 into chunks within the budget, in order (a single row
is never cut), and its answer is the chunks' outputs joined back in order: the post-processed outputs
of texts, the graph's outputs of token tensors. So one request's attention never takes more than one
chunk's memory, whatever its size. Where the graph shows its attention (``core.attention_memory``), a
chunk also stays within the model's estimated memory of one execution (``ModelVersion.bound``): long rows
make smaller chunks, since attention grows with rows x tokens².

Only versions whose rows are independent are cut (``registry.rows_independent``, the rule that also
says which models merge rows): rows of an arbitrary tensor graph may depend on each other.

Fairness: a request keeps at most ``window`` of its chunks in its scheduler at once (one, or two where
the model has four or more slots, never more than half of them), and submits the next only when one
has finished; a request that arrived meanwhile is queued before that next chunk, so it waits about one
chunk rather than the whole request. A caller that goes away (its client left, its time limit passed)
cancels the chunk in flight the way the scheduler cancels any request, and the chunks not yet
submitted never run.

Time: a request of several chunks is refused before any of them runs when, by its model version's
measured time per token (``core.pace``), it cannot finish within its time limit with the requests in
flight before it (RESOURCE_EXHAUSTED; DEADLINE_EXCEEDED when its own work alone does not fit), and given
up between chunks (DEADLINE_EXCEEDED) once its remaining chunks no longer fit, or would keep an older
request from finishing in its time: under an overload of large requests some are answered and the rest
refused early, rather than all of them taking turns until their time-outs. Every execution that ran
alone is measured; nothing is refused before a measurement exists.

Limits hold over the whole request: the bytes (``max_output_bytes``) and BYTES elements of all its
chunks' outputs together are bounded as one answer's are, counted as each chunk comes back (a chunk's
run is bounded by them on its own), and the chunks not yet run never run once they are passed. A
token-level output is counted at the length it is joined at (the request's longest row), and the joined
answer's size is computed from the chunks' shapes before it is built.
Statistics count the request's rows once (the service does that) and each chunk's execution (the
scheduler does that).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.attention_memory import ExecutionBound
from onnxserve.core.batching import Scheduled
from onnxserve.core.execution import Outcome, Work
from onnxserve.core.pace import ADMISSION_MARGIN, Parts, Share
from onnxserve.core.pipeline import TextBatch
from onnxserve.core.registry import ModelVersion
from onnxserve.core.tokens import token_counts
from onnxserve.core.types import BYTES_ELEMENT_OVERHEAD, payload_bytes
from onnxserve.core.wire import MAX_BYTES_ELEMENTS, response_too_large, too_many_bytes_elements
from onnxserve.errors import DeadlineExceededError, ResourceExhaustedError, TooLargeError
from onnxserve.log_throttle import LogThrottles

log = logging.getLogger(__name__)

_UNJOINED = LogThrottles()
"""Each model's line about a request run whole because its chunks' answers could not be joined: every such
request writes it."""

Arrays = dict[str, npt.NDArray[Any]]

MAX_WINDOW = 2
"""The most chunks of one request in a model's scheduler at once."""


def row_lengths(model: ModelVersion, work: Work) -> list[int]:
    """Tokens each row of ``work`` takes in an execution (texts: as padded for the graph)."""
    pipeline = model.pipeline
    fixed = pipeline.fixed_length if pipeline is not None and pipeline.fixed_length > 0 else 0
    if work.text is not None:
        return [fixed or n for n in token_counts(work.encodings)]
    return [work.longest or 1] * work.rows


def chunk_bounds(lengths: Sequence[int], budget: int, bound: ExecutionBound | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges ``[start, stop)`` whose rows x longest row fit ``budget``, and whose
    execution's estimated memory fits ``bound`` (a row that alone exceeds them is a range of its own)."""
    bounds: list[tuple[int, int]] = []
    start, longest = 0, 0
    for row, length in enumerate(lengths):
        grown = max(longest, length)
        rows = row - start + 1
        if row > start and (rows * grown > budget or (bound is not None and not bound.fits(rows, grown))):
            bounds.append((start, row))
            start, grown = row, length
        longest = grown
    if lengths:
        bounds.append((start, len(lengths)))
    return bounds


def window(model: ModelVersion) -> int:
    """How many chunks of one request may be in the scheduler at once: at most half the model's
    slots (at least one), at most ``MAX_WINDOW``."""
    slots = len(model.scheduler.pool.sessions)
    return max(1, min(MAX_WINDOW, slots // 2))


def _part(work: Work, start: int, stop: int) -> Work:
    """Rows ``[start, stop)`` of ``work`` as a work of their own."""
    if work.text is None:
        assert work.feeds is not None
        feeds = {name: array[start:stop] for name, array in work.feeds.items()}
        return Work(
            work.fetch,
            stop - start,
            feeds=feeds,
            max_output_bytes=work.max_output_bytes,
            client=work.client,
            progress=work.progress,
            tokens=work.tokens,
        )
    text = work.text
    pairs = text.pairs[start:stop] if text.pairs is not None else None
    cut = frozenset(row - start for row in text.cut if start <= row < stop)
    return Work(
        work.fetch,
        stop - start,
        text=TextBatch(text.texts[start:stop], pairs, cut),
        encodings=work.encodings[start:stop],
        answer=work.answer,
        max_output_bytes=work.max_output_bytes,
        client=work.client,
        progress=work.progress,
    )


class _Limits:
    """One request's output limits, counted over its chunks as they come back (each chunk's run is
    bounded by the whole request's limits on its own, so the request holds at most about twice them)."""

    def __init__(self, model: str, max_output_bytes: int, rows: int, widest: int = 0) -> None:
        self.model = model
        self.max_bytes = max_output_bytes
        self.rows = rows  # the whole request's
        self.widest = widest  # the longest row's tokens, the length token-level outputs are joined at
        self.counted_rows = 0
        self.bytes = 0
        self.elements = 0

    def count(self, outputs: Arrays, rows: int, longest: int = 0) -> None:
        """Count a chunk's outputs (``rows`` of the request, ``longest``: its longest row's tokens); refuse the
        request once they pass a limit, or as soon as its rows so far show the whole answer will.

        A token-level output (dimension 1 the chunk's own longest row) is counted at the length it is
        joined at, the whole request's longest row: 10,000 empty texts then one long one take, joined,
        10,001 rows of the long one's length, which the first chunk already shows. Every later row takes
        at least as much as the rows counted so far, so the chunks still to run are not run for an answer
        that would be refused."""
        self.counted_rows += rows
        widened = [_joined_padding(array, longest, self.widest) for array in outputs.values()]
        self.elements += sum(
            int(array.size) + padding
            for array, padding in zip(outputs.values(), widened, strict=True)
            if array.dtype == object
        )
        if self.elements > MAX_BYTES_ELEMENTS:
            raise too_many_bytes_elements(
                self.model, "the outputs have at least", self.elements, MAX_BYTES_ELEMENTS, "fewer texts, fewer outputs"
            )
        if self.max_bytes > 0:
            self.bytes += sum(
                payload_bytes(array) + padding * _padded_element_bytes(array)
                for array, padding in zip(outputs.values(), widened, strict=True)
            )
            projected = self.bytes * self.rows // max(1, self.counted_rows)
            if projected > self.max_bytes:
                raise response_too_large(self.model, projected, self.max_bytes, at_least=True)


def _joined_padding(array: npt.NDArray[Any], longest: int, widest: int) -> int:
    """The elements a chunk's output gains once joined: a token-level one (dimension 1 the chunk's longest
    row's tokens) is padded to the request's longest row."""
    if array.ndim >= 2 and 0 < longest < widest and array.shape[1] == longest:
        return int(array.size) // longest * (widest - longest)
    return 0


def _padded_element_bytes(array: npt.NDArray[Any]) -> int:
    """The bytes one padding element takes: a zero, or an empty BYTES element."""
    return BYTES_ELEMENT_OVERHEAD if array.dtype == object else int(array.dtype.itemsize)


def joined_bytes(parts: Sequence[npt.NDArray[Any]]) -> int:
    """The bytes ``_concatenate(parts)`` takes, computed from the parts' shapes before anything is built
    (a BYTES element padded in counts as an empty one)."""
    first = parts[0]
    if first.ndim < 2 or len({p.shape[1] for p in parts}) == 1:
        return sum(payload_bytes(p) for p in parts)
    longest = max(int(p.shape[1]) for p in parts)
    rows = sum(int(p.shape[0]) for p in parts)
    inner = int(np.prod(first.shape[2:], dtype=np.int64))
    if first.dtype != object:
        return rows * longest * inner * int(first.dtype.itemsize)
    padding = sum(int(p.shape[0]) * (longest - int(p.shape[1])) * inner for p in parts)
    return sum(payload_bytes(p) for p in parts) + padding * BYTES_ELEMENT_OVERHEAD


async def submit(model: ModelVersion, work: Work) -> Scheduled:
    """Run ``work`` on the model's scheduler: as one execution when it fits the model's token budget
    (or the model's rows are not independent), else in chunks (see the module). A request of several chunks
    whose estimated work ahead cannot finish within its time limit is refused before it runs (``core.pace``)."""
    budget = model.chunk_tokens
    if budget <= 0 or work.rows <= 1:
        return await model.scheduler.submit(work)
    lengths = row_lengths(model, work)
    bounds = chunk_bounds(lengths, budget, model.bound)
    chunks = [(stop - start, max(lengths[start:stop])) for start, stop in bounds]
    parts = work.parts if work.parts is not None and work.parts.count > 1 else None
    if len(bounds) == 1 and parts is None:  # one execution: never refused for time (it would save little)
        scheduled = await model.scheduler.submit(work)
        _observe(model, scheduled, *chunks[0])
        return scheduled
    with _counted(model, work, chunks, parts) as share:
        if len(bounds) == 1:
            scheduled = await model.scheduler.submit(work)
            _observe(model, scheduled, *chunks[0])
            share.add(*chunks[0], -1)
            return scheduled
        outcome, queue_ns = await _run_chunks(model, work, bounds, lengths, share)
    if any(array.ndim == 0 or array.shape[0] != work.rows for array in outcome.outputs.values()):
        # The graph's outputs do not follow its input rows (its batch dimension's name promised they would):
        # the chunks' answers cannot be joined, so the request runs whole, as it would have unchunked.
        throttle = _UNJOINED.of(model.name)
        if count := throttle.due():
            log.warning(
                "model %s: outputs of a request's chunks do not have its rows; ran it whole%s",
                model.name,
                throttle.note(count),
            )
        del outcome
        return await model.scheduler.submit(work)
    return Scheduled(outcome, queue_ns, work.rows)


@contextmanager
def _counted(
    model: ModelVersion, work: Work, chunks: Sequence[tuple[int, int]], parts: Parts | None
) -> Iterator[Share]:
    """``work``'s share of its version's work in flight (``core.pace``), checked: its own, counted for the
    block (``_admit``); or, for a part of a request answered in several, the request's, grown by this part's
    chunks (admitted with its first part, checked at each later one as at a chunk boundary)."""
    if parts is None:
        share = model.pace.admit(chunks, work.deadline, work.client)
        try:
            _admit(model, share)
            yield share
        finally:
            model.pace.leave(share)
        return
    if parts.share is None:
        parts.pace, parts.share = model.pace, model.pace.admit(chunks, work.deadline, work.client)
        _admit(model, parts.share)
    else:
        for chunk in chunks:
            parts.share.add(*chunk, 1)
        if work.progress.started:
            _give_up_late(model, parts.share)
        else:  # nothing of the request has run yet: refused as at admission
            _admit(model, parts.share)
    yield parts.share


def _admit(model: ModelVersion, share: Share) -> None:
    """Refuse a request whose work, with that of the requests in flight before it, cannot finish within its
    time limit by the version's measured time per token (``core.pace``; never without a measurement), before
    any of its chunks runs: RESOURCE_EXHAUSTED (retry later), or DEADLINE_EXCEEDED when its own work alone
    does not fit (a retry would not help)."""
    now = asyncio.get_running_loop().time()
    fits, estimate = model.pace.fits(share, now, ADMISSION_MARGIN)
    if not fits:
        assert share.deadline is not None
        alone = model.pace.seconds(share)
        if alone > share.deadline - now:  # too large for its time limit even alone: retrying would not help
            raise DeadlineExceededError(
                f"model {model.name!r}: this request alone would take about {alone:.1f} s, more than the "
                f"{max(share.deadline - now, 0.0):.1f} s left of its time limit; it was refused before it ran "
                "(send fewer rows, or a longer timeout)"
            )
        raise ResourceExhaustedError(
            f"model {model.name!r} is busy: {_why_late(model, share, estimate, now)}; retry later, with fewer rows "
            "or a longer timeout"
        )


def _give_up_late(model: ModelVersion, share: Share) -> None:
    """Give a request up (DEADLINE_EXCEEDED) at a chunk boundary when its remaining chunks, sharing the version
    with the older requests that keep their place, cannot finish within the time it has left, or keep an
    older one from finishing in its own: the 504 it would get anyway, early, and its turns go to the others."""
    now = asyncio.get_running_loop().time()
    fits, estimate = model.pace.fits(share, now)
    if not fits:
        assert share.deadline is not None
        raise DeadlineExceededError(
            f"model {model.name!r}: {_why_late(model, share, estimate, now)}; the rest of this request was given "
            "up early"
        )


def _why_late(model: ModelVersion, share: Share, estimate: float, now: float) -> str:
    """Why ``share`` does not keep its place (``Pace.fits``): it would finish late, or make an older one late."""
    assert share.deadline is not None
    left = max(share.deadline - now, 0.0)
    shares = model.pace.shares()
    ahead = shares.index(share) if share in shares else len(shares)
    if estimate > left * ADMISSION_MARGIN:
        return (
            f"with the {ahead} requests in flight before it, this one would take about {estimate:.1f} s of the "
            f"{left:.1f} s left of its time limit"
        )
    return f"this request would make one of the {ahead} requests in flight before it miss its time limit"


def _observe(model: ModelVersion, scheduled: Scheduled, rows: int, longest: int) -> None:
    """Measure an execution of ``rows`` rows of up to ``longest`` tokens that ran alone (``core.pace``)."""
    if scheduled.batch_size != rows:
        return  # merged with other requests: its time is not this work's
    outcome = scheduled.outcome
    seconds = (outcome.input_ns + outcome.infer_ns + outcome.output_ns) / 1e9
    pool = model.scheduler.pool
    beside = min(len(pool.sessions), 1 + sum(pool.busy))  # itself (its instance is released) and those still running
    model.pace.observed(rows, longest, seconds, beside)


async def _run_chunks(
    model: ModelVersion, work: Work, bounds: list[tuple[int, int]], lengths: Sequence[int], share: Share
) -> tuple[Outcome, int]:
    """The chunks' joined outcome and the time they waited in the queue, in all. Between chunks, a request
    that can no longer finish within its time limit is given up (``_give_up_late``)."""
    limits = _Limits(model.name, work.max_output_bytes, work.rows, max(lengths, default=0))
    outcomes: list[Outcome] = []
    queue_ns = 0
    pending = list(bounds)
    running: list[asyncio.Task[Scheduled]] = []
    rows: list[tuple[int, int]] = []  # rows and longest row's tokens of each running chunk
    allowed = window(model)
    loop = asyncio.get_running_loop()
    try:
        while pending or running:
            while pending and len(running) < allowed:
                start, stop = pending.pop(0)
                part = _part(work, start, stop)
                running.append(loop.create_task(model.scheduler.submit(part)))
                rows.append((stop - start, max(lengths[start:stop])))
            scheduled = await running.pop(0)  # in order: the answers join in the request's row order
            queue_ns += scheduled.queue_ns
            done = rows.pop(0)
            _observe(model, scheduled, *done)
            share.add(*done, -1)
            limits.count(scheduled.outcome.outputs, *done)
            outcomes.append(scheduled.outcome)
            del scheduled
            if pending:
                _give_up_late(model, share)
    except BaseException:
        outcomes.clear()  # the error's traceback keeps this frame: it must not keep the outputs
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        raise
    try:
        return _joined(outcomes, limits), queue_ns
    finally:
        outcomes.clear()


def _joined(outcomes: Sequence[Outcome], limits: _Limits) -> Outcome:
    """The chunks' outcomes as one: outputs joined along dimension 0 in order, times and counts added.

    The joined size is computed from the chunks' shapes and refused over the limit before anything is
    built; memory that cannot be had for it refuses the request (400), not the server (500)."""
    names = list(outcomes[0].outputs)
    size = sum(joined_bytes([o.outputs[name] for o in outcomes]) for name in names)
    if 0 < limits.max_bytes < size:
        raise response_too_large(limits.model, size, limits.max_bytes)
    try:
        outputs = {name: _concatenate([o.outputs[name] for o in outcomes]) for name in names}
    except MemoryError as e:
        raise TooLargeError(
            f"model {limits.model}: could not allocate the {size} bytes its joined answer takes; ask for less "
            "(fewer texts, fewer outputs)"
        ) from e
    return Outcome(
        outputs,
        sum(o.input_ns for o in outcomes),
        sum(o.infer_ns for o in outcomes),
        sum(o.output_ns for o in outcomes),
        sum(o.truncated for o in outcomes),
    )


def _concatenate(parts: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """Join per-row outputs; token-level ones (each chunk cut to its own longest row) are padded to the
    longest chunk's sequence (zeros; the positions past a row's tokens carry nothing)."""
    if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
        longest = max(p.shape[1] for p in parts)
        padded = []
        for part in parts:
            widths = [(0, 0)] * part.ndim
            widths[1] = (0, longest - part.shape[1])
            fill: Any = b"" if part.dtype == object else 0
            padded.append(np.pad(part, widths, constant_values=fill))
        parts = padded
    return np.concatenate(parts)
