"""How fast a text model version works, and whether a request can still finish within its time limit.

Under an overload of large text requests (many requests of thousands of rows at one model version),
the chunks of every admitted request take turns (``core.chunking``): each progresses at the rate of all
of them, so all of them end in their time-outs together, and the server spends its CPU on answers nobody
gets (an outside attack: 24 requests of 2,048 rows of 256 tokens, all answered 504 after 60 s, none
served). A request that cannot finish in its time is better refused early and cheaply, so the others
finish. This module holds what that decision needs, per model version (``ModelVersion.pace``):

- **The measured time per token** of its executions (rows x the longest row's tokens, what a chunk is
  cut by): of each execution that ran alone (no other request merged into it) and took at least
  :data:`MEASURED_TOKENS`, its wall time on its instance thread, divided by its tokens and multiplied by
  the executions estimated to run beside it (so the rate is the version's throughput, whatever the
  concurrency). The lower median of the last :data:`WINDOW` is kept per length bucket (rows of up to 16, 32,
  64, ... tokens: attention makes a long row's token dearer than a short one's); a length with no
  measurement of its own borrows the nearest shorter bucket's (a cheaper token: an under-estimate), and
  with none there its work counts as nothing. **So nothing is refused before measurements exist**
  (:data:`MEASURED_RUNS` of them), and a measurement counts for :data:`MEASUREMENT_SECONDS`.
- **The work in flight** (:class:`Share`): each request's chunks not yet finished, in tokens per length
  bucket, and its deadline. Taking turns, requests share the version like processors share a CPU: one of
  ``w`` seconds of work is done once every other has run min(its own, ``w``) beside it.

The rule (:meth:`Pace.fits`): the requests in flight are taken oldest first, client by client (each
client's oldest, then each one's second, ...), and each keeps its place when,
beside the ones kept before it, every one of them is estimated to finish within its time limit; the
newest give way first. ``core.chunking`` refuses a new request that does not keep its place before any of
its chunks runs (RESOURCE_EXHAUSTED: 503 + Retry-After, 429 on the OpenAI and TEI routes; DEADLINE_EXCEEDED
when its own work alone exceeds its time), admitting it only within :data:`ADMISSION_MARGIN` of the time
each has left, and gives a request up at a chunk boundary (DEADLINE_EXCEEDED, the 504 it would get anyway,
but early) when it no longer keeps its place, which frees its turns for the others. A request answered in
several parts (:class:`Parts`) is one share.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import count

WINDOW = 32
"""Executions remembered per length bucket: their median decides."""

MEASURED_TOKENS = 512
"""The fewest tokens (rows x longest row) of an execution that is measured: a small one's fixed cost
(the hand-off to its thread, the pooling) would make a token look dearer than it is."""

MEASURED_RUNS = 3
"""Executions a version must have measured (within :data:`MEASUREMENT_SECONDS`) before any request is
refused for time: one slow first run (a warm-up, a moment of load) must not refuse everything after it."""

MEASUREMENT_SECONDS = 30.0
"""How long a measurement counts. Requests refused for time run nothing, so they measure nothing: without
an age limit, measurements taken while the machine was loaded (by another model, another tenant, or an
attacker) refused for good requests that fit once the load had gone (outside attack rt14)."""

ADMISSION_MARGIN = 0.75
"""A new request is admitted when it (and every older one beside it) is estimated to finish within this
share of the time each has left; once admitted, it is given up only when it no longer fits all of its
time. The estimate is a median on a machine whose load changes: admitting right up to the limit would
make the requests admitted last finish just late."""

SHARED_TIME = 2.0
"""An older request keeps newer ones out (when they would make it late) only while its own time limit
leaves it at least this many times its remaining work: time to share the version with one other."""

SHORTEST_BUCKET = 16
"""Rows of up to this many tokens share the first length bucket; each next bucket doubles it."""


def bucket(longest: int) -> int:
    """The length bucket of rows of up to ``longest`` tokens: 0 for up to 16, 1 for up to 32, ..."""
    return max(0, (max(longest, 1) - 1).bit_length() - (SHORTEST_BUCKET - 1).bit_length())


class Share:
    """One request's chunks not yet finished at its model version (tokens per length bucket), when its time
    limit passes (the event loop's clock; None: no limit) and who sent it (``core.fairness``'s client)."""

    __slots__ = ("client", "deadline", "order", "remaining")

    def __init__(self, order: int, chunks: Iterable[tuple[int, int]], deadline: float | None, client: str = "") -> None:
        self.order = order  # admission order: older requests keep their place first
        self.deadline = deadline
        self.client = client
        self.remaining: dict[int, int] = {}
        for rows, longest in chunks:
            self.add(rows, longest, 1)

    def add(self, rows: int, longest: int, sign: int) -> None:
        key = bucket(longest)
        self.remaining[key] = self.remaining.get(key, 0) + sign * rows * longest


class Parts:
    """One request answered in several parts (an embeddings request cut into pieces of ``max_batch_size``, each
    its own inference request): one share for all of them, admitted with the first part that runs and
    grown by each later one, so that the request keeps its age among the requests in flight."""

    __slots__ = ("count", "pace", "share")

    def __init__(self, count: int) -> None:
        self.count = count  # parts in all
        self.pace: Pace | None = None
        self.share: Share | None = None

    def close(self) -> None:
        """The request is done (answered or failed): its share leaves its version's count."""
        if self.pace is not None and self.share is not None:
            self.pace.leave(self.share)
        self.share = None


class Pace:
    """One model version's measured time per token and the requests in flight there (event loop only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._runs: dict[int, deque[tuple[float, float]]] = {}  # (when, seconds per token), per length bucket
        self._shares: dict[int, Share] = {}  # in admission order
        self._order = count()
        self._clock = clock  # the event loop's (time.monotonic)

    def observed(self, rows: int, longest: int, seconds: float, beside: int = 1) -> None:
        """An execution of ``rows`` rows of up to ``longest`` tokens ran alone in ``seconds`` (wall time on its
        thread), with about ``beside`` executions of the version running at once (itself included)."""
        tokens = rows * longest
        if tokens < MEASURED_TOKENS or seconds <= 0:
            return
        runs = self._runs.setdefault(bucket(longest), deque(maxlen=WINDOW))
        runs.append((self._clock(), seconds / tokens / max(1, beside)))

    def _fresh(self, key: int) -> list[float]:
        """The measurements of bucket ``key`` taken within :data:`MEASUREMENT_SECONDS` (older ones leave)."""
        runs = self._runs.get(key)
        if not runs:
            return []
        since = self._clock() - MEASUREMENT_SECONDS
        while runs and runs[0][0] < since:
            runs.popleft()
        return [per_token for _, per_token in runs]

    def measured(self) -> int:
        """Executions measured within :data:`MEASUREMENT_SECONDS`, in all buckets."""
        return sum(len(self._fresh(key)) for key in list(self._runs))

    def per_token(self, key: int) -> float:
        """Seconds per token of rows in bucket ``key``: its median, else the nearest shorter bucket's, else 0."""
        for shorter in range(key, -1, -1):
            runs = self._fresh(shorter)
            if runs:
                ordered = sorted(runs)
                return ordered[(len(ordered) - 1) // 2]  # the lower median: never the dearer
        return 0.0

    def seconds(self, share: Share) -> float:
        """The estimated time of ``share``'s remaining work alone (0 with no measurement)."""
        return sum(tokens * self.per_token(key) for key, tokens in share.remaining.items() if tokens > 0)

    def admit(self, chunks: Sequence[tuple[int, int]], deadline: float | None, client: str = "") -> Share:
        """A new request's chunks (rows, longest row's tokens): its share, counted from now (``leave`` it)."""
        share = Share(next(self._order), chunks, deadline, client)
        self._shares[share.order] = share
        return share

    def leave(self, share: Share) -> None:
        self._shares.pop(share.order, None)

    def shares(self) -> list[Share]:
        """The requests counted (admitted and not yet done), in the order they keep their place: each client's
        oldest first, oldest first among those, then each client's second, and so on. A client that sends many
        requests at once (or retries each refusal at once) thus keeps its place for as many of them as others
        leave room for, not for all before another client's one (outside attack rt14)."""
        rank: dict[str, int] = {}
        ranked = []
        for share in self._shares.values():
            rank[share.client] = rank.get(share.client, -1) + 1
            ranked.append((rank[share.client], share.order, share))
        return [share for _, _, share in sorted(ranked, key=lambda entry: entry[:2])]

    def fits(self, share: Share, now: float, margin: float = 1.0) -> tuple[bool, float]:
        """Whether ``share`` keeps its place, and its estimated time to finish with the requests that do.

        The requests in flight are taken in the order of :meth:`shares` (oldest first, client by client); each
        keeps its place when, sharing the executions with
        the ones kept before it (each taking turns until its own work is done), every one of them still
        finishes within its time limit (``margin`` of the time each has left, all of it for one alone; an
        older one's only while it leaves :data:`SHARED_TIME` times its work). A request that does not keep
        its place will not finish in time unless it gives way: the newest give way first."""
        if share.deadline is None or self.measured() < MEASURED_RUNS:
            return True, 0.0
        kept: list[tuple[float, float | None]] = []  # (seconds of work left, deadline) of those kept
        for other in self.shares():
            work = self.seconds(other)
            # An older request whose own time limit is under SHARED_TIME times its work left cannot share
            # the version with anyone: its limit does not keep newer ones out (it is given up instead, at
            # its next chunk boundary, if they make it late). Else one client sending one request at a time
            # with a tight limit kept every other client's large requests out (outside attack rt14).
            tight = other is not share and other.deadline is not None and other.deadline - now < SHARED_TIME * work
            trial = [*kept, (work, None if tight else other.deadline)]
            finishes = _finishes([work for work, _ in trial])
            share_of = margin if len(trial) > 1 else 1.0  # alone, a request may use all its time
            if all(d is None or f <= (d - now) * share_of for (_, d), f in zip(trial, finishes, strict=True)):
                kept = trial
                if other is share:
                    return True, finishes[-1]
            elif other is share:
                return False, finishes[-1]
        return True, 0.0


def _finishes(work: Sequence[float]) -> list[float]:
    """When each of ``work`` (seconds) is done when all of them take turns (processor sharing): the one of
    ``w`` seconds is done once every other has run min(its own, ``w``) beside it."""
    order = sorted(range(len(work)), key=work.__getitem__)
    finishes = [0.0] * len(work)
    done = 0.0  # the work of the smaller ones, all done before
    for rank, index in enumerate(order):
        finishes[index] = done + work[index] * (len(work) - rank)
        done += work[index]
    return finishes
