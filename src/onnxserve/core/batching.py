"""Scheduling a model version's work onto its instances, with or without dynamic batching.

Each model version has ``instance_count`` instances (ONNX Runtime sessions), each run by one
thread. ``DirectScheduler`` hands each request to the least busy instance. ``DynamicBatcher``
queues requests and, whenever an instance is free, forms one batch from the queue: requests with the
same batch key (same inner dimensions and outputs; or text) in arrival order, up to
``max_batch_size`` rows and ``max_batch_tokens``, waiting up to ``max_queue_delay_us`` for a fuller
batch unless a preferred size is reached. A full queue refuses new requests at once; a failed batch
fails exactly the requests in it; a request whose caller went away is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from onnxserve.config import DynamicBatching
from onnxserve.core.execution import Outcome, Work
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ResourceExhaustedError

log = logging.getLogger(__name__)

RunBatch = Callable[[ModelSession, Sequence[Work]], list[Outcome]]
"""Runs works as one execution on one instance (on a worker thread)."""

OnExecution = Callable[[int, Outcome], None]
"""Told of every execution once: its batch size (rows) and its timings."""


@dataclass(frozen=True)
class Scheduled:
    outcome: Outcome
    queue_ns: int  # from submission until its execution started
    batch_size: int  # rows in the execution it was part of


class InstancePool:
    """A model version's sessions; each runs on its own thread, one execution at a time."""

    def __init__(self, sessions: Sequence[ModelSession], name: str) -> None:
        self.sessions = list(sessions)
        self.busy = [0] * len(self.sessions)
        self._executor = ThreadPoolExecutor(max_workers=len(self.sessions), thread_name_prefix=f"onnxserve-{name}")
        self._free: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._free is None:
            self._free = asyncio.Semaphore(len(self.sessions))
        return self._free

    async def reserve(self) -> None:
        """Wait until an instance is free (then ``take`` it, or ``cancel`` the reservation)."""
        await self._semaphore().acquire()

    def cancel(self) -> None:
        self._semaphore().release()

    def take(self) -> int:
        """The least busy instance, for a reservation; ``release`` it when its execution ends."""
        index = min(range(len(self.busy)), key=self.busy.__getitem__)
        self.busy[index] += 1
        return index

    async def acquire(self) -> int:
        await self.reserve()
        return self.take()

    def release(self, index: int) -> None:
        self.busy[index] -= 1
        self._semaphore().release()

    async def run(self, index: int, run_batch: RunBatch, works: Sequence[Work]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, run_batch, self.sessions[index], works)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class DirectScheduler:
    """No batching: each request runs alone on the least busy instance."""

    def __init__(self, pool: InstancePool, run_batch: RunBatch, on_execution: OnExecution) -> None:
        self.pool = pool
        self._run_batch = run_batch
        self._on_execution = on_execution
        self._waiting = 0

    async def submit(self, work: Work) -> Scheduled:
        submitted = time.perf_counter_ns()
        self._waiting += 1
        try:
            index = await self.pool.acquire()
        finally:
            self._waiting -= 1
        try:
            started = time.perf_counter_ns()
            (outcome,) = await self.pool.run(index, self._run_batch, [work])
        finally:
            self.pool.release(index)
        self._on_execution(work.rows, outcome)
        return Scheduled(outcome, started - submitted, work.rows)

    def queued(self) -> int:
        """Requests waiting for a free instance."""
        return self._waiting

    async def stop(self) -> None:
        """Nothing runs on the event loop between requests."""

    def close(self) -> None:
        self.pool.close()


@dataclass(eq=False)  # compared by identity: the queue removes exactly this request
class _Pending:
    work: Work
    submitted_ns: int
    future: asyncio.Future[Scheduled] = field(repr=False)


class DynamicBatcher:
    """Merges queued requests into batches; one batch per free instance."""

    def __init__(
        self,
        pool: InstancePool,
        run_batch: RunBatch,
        on_execution: OnExecution,
        max_batch_size: int,
        settings: DynamicBatching,
        name: str,
    ) -> None:
        self.pool = pool
        self._run_batch = run_batch
        self._on_execution = on_execution
        self.max_batch_size = max_batch_size
        self.settings = settings
        self.name = name
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, work: Work) -> Scheduled:
        limit = self.settings.max_queue_size
        if limit and len(self._queue) >= limit:
            raise ResourceExhaustedError(
                f"model {self.name!r} has {len(self._queue)} requests queued (max_queue_size {limit}); retry later"
            )
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._dispatch(), name=f"batcher-{self.name}")
        pending = _Pending(work, time.perf_counter_ns(), loop.create_future())
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    async def _dispatch(self) -> None:
        assert self._arrived is not None
        while True:
            await self.pool.reserve()
            try:
                batch = await self._next_batch()
            except asyncio.CancelledError:
                self.pool.cancel()
                raise
            except Exception as e:  # a bug here must not leave callers waiting forever
                log.exception("model %s: the batcher failed", self.name)
                self.pool.cancel()
                for pending in list(self._queue):
                    _fail(pending, e)
                self._queue.clear()
                continue
            index = self.pool.take()
            task = asyncio.get_running_loop().create_task(self._execute(index, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        """Wait for work, then for a batch worth sending; take it off the queue."""
        assert self._arrived is not None
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = self._select()
            rows = sum(p.work.rows for p in batch)
            waited_us = (time.perf_counter_ns() - self._queue[0].submitted_ns) / 1000
            remaining_us = self.settings.max_queue_delay_us - waited_us
            full = rows >= self.max_batch_size or rows in self.settings.preferred_batch_sizes
            if full or remaining_us <= 0 or len(batch) < sum(1 for p in self._queue if p.work.key == batch[0].work.key):
                for pending in batch:
                    self._queue.remove(pending)
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining_us / 1e6)

    def _select(self) -> list[_Pending]:
        """The oldest request and the compatible ones that fit with it (closest lengths first, for text)."""
        first = self._queue[0]
        key = first.work.key
        candidates = [p for p in list(self._queue)[1:] if p.work.key == key]
        budget = self.settings.max_batch_tokens
        if budget and first.work.text is not None:
            candidates.sort(key=lambda p: abs(p.work.longest - first.work.longest))
        batch = [first]
        rows, longest = first.work.rows, first.work.longest
        for pending in candidates:
            new_rows = rows + pending.work.rows
            new_longest = max(longest, pending.work.longest)
            if new_rows > self.max_batch_size:
                continue
            if budget and first.work.text is not None and new_rows * new_longest > budget:
                continue
            batch.append(pending)
            rows, longest = new_rows, new_longest
        return batch

    def _drop_abandoned(self) -> None:
        for pending in [p for p in self._queue if p.future.done()]:
            self._queue.remove(pending)

    async def _execute(self, index: int, batch: list[_Pending]) -> None:
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            started = time.perf_counter_ns()
            size = sum(p.work.rows for p in live)
            try:
                outcomes = await self.pool.run(index, self._run_batch, [p.work for p in live])
            except Exception as e:
                if len(live) == 1:
                    _fail(live[0], e)
                    return
                # One request's values can fail a whole batch (an index out of range): run each alone
                # on this instance, so that exactly the requests that fail get the error.
                log.info("model %s: a batch of %d failed (%s); running its requests one by one", self.name, size, e)
                for pending in live:
                    await self._execute_alone(index, pending)
                return
            self._on_execution(size, outcomes[0])
            for pending, outcome in zip(live, outcomes, strict=True):
                if not pending.future.done():
                    pending.future.set_result(Scheduled(outcome, started - pending.submitted_ns, size))
        finally:
            self.pool.release(index)

    async def _execute_alone(self, index: int, pending: _Pending) -> None:
        if pending.future.done():
            return
        started = time.perf_counter_ns()
        try:
            (outcome,) = await self.pool.run(index, self._run_batch, [pending.work])
        except Exception as e:
            _fail(pending, e)
            return
        self._on_execution(pending.work.rows, outcome)
        if not pending.future.done():
            pending.future.set_result(Scheduled(outcome, started - pending.submitted_ns, pending.work.rows))

    async def stop(self) -> None:
        """Stop forming batches (on the event loop, before it closes); running batches finish."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def close(self) -> None:
        self.pool.close()


def _fail(pending: _Pending, error: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


Scheduler = DirectScheduler | DynamicBatcher
