"""Scheduling a model version's work onto its instances, with or without dynamic batching.

Each model version has ``instance_count`` instances (ONNX Runtime sessions), each run by one
thread. The default layout (``core.registry.layout``) gives one instance per CPU that all share one
session: runs side by side, one copy of the weights, and a lone run on the lowest instance.
``DirectScheduler`` hands each request to the least busy instance. ``DynamicBatcher`` queues requests
and, whenever an instance is free, forms one batch from the queue: requests with the same batch key
(same inner dimensions and outputs; or text) in fair order, up to ``max_batch_size`` rows and
``max_batch_tokens``. Which part of that selection goes, and when:

- preferred sizes first (Triton's rule): when a prefix of the selection adds up to one of
  ``preferred_batch_sizes``, the largest such prefix goes at once;
- otherwise the batch waits, up to ``max_queue_delay_us`` after its oldest request arrived, unless it
  cannot grow any more (``max_batch_size`` reached, or a compatible request does not fit); then the
  selection goes as it is;
- balance: when ``k`` instances are idle and ``N`` compatible rows are queued, a batch takes at most
  ``ceil(N / k)`` rows (raised to the smallest preferred size at or above it, never above
  ``max_batch_size``), so that the other idle instances get the rest; the requests left over by that
  cap are due and go to the next free instance without waiting.

Fair order (``core.fairness``): both schedulers queue requests per client (``Work.client``, given by
the protocol front ends) and serve the clients round-robin. Without batching a freed instance goes to
the next waiting client in turn; with batching a batch starts with the client whose turn it is and is
filled round by round across the clients (each one's first compatible request, then each one's second,
...), and the clients it served go to the end of the rotation. A client's own requests keep their
arrival order. So a client with one request waits about one execution, however many requests another
client has queued.

A full queue (``max_queue_size``) refuses a new request at once, unless its client holds at least two
places fewer than the client holding the most: then that client's newest queued request is refused
instead, so that a flood cannot keep other clients out. A failed batch fails exactly the requests in it.

A request whose caller went away (it disconnected, or its timeout passed) leaves the queue at once and
never runs; an execution whose callers have all gone away is stopped (ONNX Runtime's terminate flag),
so its instance is free again within one graph node. The instance is released only when its thread
has actually finished, never while a stopped run is still unwinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from onnxserve.config import DynamicBatching
from onnxserve.core.attention_memory import ExecutionBound
from onnxserve.core.execution import Outcome, Work
from onnxserve.core.fairness import FairQueue, interleave, should_displace
from onnxserve.core.inline_runs import InlineRuns, shape_key
from onnxserve.core.runtime import ModelSession, RunControl
from onnxserve.errors import OnnxServeError, ResourceExhaustedError, UnavailableError
from onnxserve.log_throttle import LogThrottle

log = logging.getLogger(__name__)

RunBatch = Callable[[ModelSession, Sequence[Work], RunControl], list[Outcome]]
"""Runs works as one execution on one instance (on a worker thread); the control can stop it."""

OnExecution = Callable[[int, Outcome], None]
"""Told of every execution once: its batch size (rows) and its timings."""


@dataclass(frozen=True)
class Scheduled:
    outcome: Outcome
    queue_ns: int  # from submission until its execution started
    batch_size: int  # rows in the execution it was part of


class InstancePool:
    """A model version's instances; each runs on its own thread, one execution at a time.

    An instance is a session and the thread that runs it. The adaptive layout gives several instances
    the same session (``sticky``): runs side by side share its weights and thread pool, and a free
    instance is chosen lowest index first, so that under light load every run comes from the same
    thread (ONNX Runtime runs a model measurably slower when its calling thread changes from run to
    run). Otherwise the least busy instance goes first, and of those the one that has run least."""

    def __init__(self, sessions: Sequence[ModelSession], name: str, sticky: bool = False) -> None:
        self.sessions = list(sessions)
        self.sticky = sticky
        self.busy = [0] * len(self.sessions)
        self.executions = [0] * len(self.sessions)  # executions started on each instance
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnxserve-{name}-{i}")
            for i in range(len(self.sessions))
        ]
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
        """The least busy instance (of those, the one that has run least), for a reservation;
        ``release`` it when its execution ends."""
        if self.sticky:
            index = min(range(len(self.busy)), key=lambda i: (self.busy[i], i))
        else:
            index = min(range(len(self.busy)), key=lambda i: (self.busy[i], self.executions[i]))
        self.busy[index] += 1
        self.executions[index] += 1
        return index

    def idle(self) -> int:
        """Instances running nothing (a reserved but not yet taken one counts as idle)."""
        return sum(1 for b in self.busy if b == 0)

    def full(self) -> bool:
        """Every instance reserved: ``reserve`` would wait."""
        return self._semaphore().locked()

    def unused(self) -> bool:
        """No instance reserved (nothing running, nothing handed a reservation and about to run)."""
        return self._free is None or self._free._value == len(self.sessions)

    def finish(self, index: int) -> None:
        """The execution on ``index`` has ended; its reservation stays held (pass it on, or ``cancel`` it)."""
        self.busy[index] -= 1

    def release(self, index: int) -> None:
        self.finish(index)
        self._semaphore().release()

    async def run(
        self, index: int, run_batch: RunBatch, works: Sequence[Work], control: RunControl | None = None
    ) -> list[Outcome]:
        return await self.start(index, run_batch, works, control)

    def start(
        self, index: int, run_batch: RunBatch, works: Sequence[Work], control: RunControl | None = None
    ) -> asyncio.Future[list[Outcome]]:
        """The execution on instance ``index``'s thread, started: its future (``run_in_executor`` without
        its checks of the callable, which cost more than a tiny model's run)."""
        submitted = self._executors[index].submit(run_batch, self.sessions[index], works, control or RunControl())
        return asyncio.wrap_future(submitted, loop=asyncio.get_running_loop())

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)


class DirectScheduler:
    """No batching: each request runs alone on the least busy instance.

    Requests that find every instance busy wait per client (``core.fairness``): a freed instance goes
    to the next waiting client in turn, round-robin, and each client's own requests keep their order.
    With ``max_queue_size`` > 0, at most that many requests wait; when the queue is full, a request of
    a client holding at least two places fewer than the client holding the most takes the newest place
    of that client, which is refused; any other request is refused at once.

    With ``inline`` (``core.inline_runs``), a request whose input shapes have run fast, when nothing else
    of the model is running or waiting, runs on the event loop at once, on the first instance's session:
    no thread hand-off. Its outcome, its error and its statistics are those of a run on the thread."""

    def __init__(
        self,
        pool: InstancePool,
        run_batch: RunBatch,
        on_execution: OnExecution,
        max_queue_size: int = 0,
        name: str = "",
        bound: ExecutionBound | None = None,
        inline: InlineRuns | None = None,
    ) -> None:
        self.pool = pool
        self.bound = bound
        self._run_batch = run_batch
        self._on_execution = on_execution
        self.max_queue_size = max_queue_size
        self.name = name
        self.inline = inline
        self._inline_control = RunControl()  # inline runs are never stopped: one set of run options for all
        self._waiting: FairQueue[asyncio.Future[None]] = FairQueue()
        self._queued = 0
        # Executions on their threads, with their run options and the future their caller awaits.
        self._running: dict[asyncio.Future[list[Outcome]], tuple[RunControl, asyncio.Future[list[Outcome]]]] = {}
        self.incoming = 0  # requests on their way to ``submit`` (being tokenized): unused without batching
        self._stopped: OnnxServeError | None = None  # what a request gets once the scheduler has stopped

    async def submit(self, work: Work) -> Scheduled:
        submitted = time.perf_counter_ns()
        if self._stopped is not None:
            raise _own(self._stopped)
        key: Hashable = None
        if self.inline is not None and work.feeds is not None:
            key = shape_key(work)
            idle = not self._waiting and not self._running and self.pool.unused()
            if idle and work.inline and self.inline.allows(key):
                return self._run_inline(work, key, submitted)
        if self._waiting or self.pool.full():
            with work.progress.waiting():
                await self._wait_turn(work.client)
        else:
            await self.pool.reserve()  # an instance is free and nobody waits: returns at once
        size = _size(self.bound, [work])
        if size and self.bound is not None:
            try:
                await self.bound.room.take(size)
            except asyncio.CancelledError:
                self._pass_on()
                raise
        index = self.pool.take()
        work.progress.start()
        started = time.perf_counter_ns()
        control = RunControl()
        # A caller that goes away stops the execution, but the instance is released only once its thread
        # has returned: by a callback of the execution's future (no task of its own), which runs before
        # the caller resumes, so the execution is counted before the answer goes out. The caller awaits a
        # future of its own, which that callback completes (or ``stop`` does, for a run it cuts).
        execution = self.pool.start(index, self._run_batch, [work], control)
        answer: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._running[execution] = (control, answer)
        execution.add_done_callback(functools.partial(self._finished, index, work.rows, size, key, answer))
        try:
            (outcome,) = await answer
        except asyncio.CancelledError:
            control.terminate()
            raise
        return Scheduled(outcome, started - submitted, work.rows)

    def _run_inline(self, work: Work, key: Hashable, submitted: int) -> Scheduled:
        """Run ``work`` on the event loop (the caller checked the rule); its time is recorded, failed or not
        (a failed run's by the wall clock: it made no outcome to carry its CPU time)."""
        assert self.inline is not None
        started = time.perf_counter_ns()
        try:
            (outcome,) = self._run_batch(self.pool.sessions[0], [work], self._inline_control)
        except BaseException:
            self.inline.ran_inline(key, time.perf_counter_ns() - started)
            raise
        self.inline.ran_inline(key, outcome.cpu_ns)
        self._on_execution(work.rows, outcome)
        return Scheduled(outcome, started - submitted, work.rows)

    async def _wait_turn(self, client: str) -> None:
        """Queue behind the other waiting requests until a finished execution hands this one its instance
        reservation (``_pass_on``)."""
        limit = self.max_queue_size
        if limit and self._queued >= limit:
            displaced = should_displace(self._waiting, client)
            if displaced is None:
                raise queue_full(self.name, self._queued, limit)
            error = queue_full(self.name, self._queued, limit)
            displaced_turn = self._waiting.pop_newest(displaced)
            self._queued -= 1  # counted here, once: its own handler finds it gone from the queue
            if not displaced_turn.done():  # its caller may have just gone away (a cancelled turn)
                displaced_turn.set_exception(error)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.push(client, turn)
        self._queued += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._pass_on()  # it was handed a reservation just as its caller went away
            elif self._waiting.remove(client, turn):
                self._queued -= 1
            raise

    def _pass_on(self) -> None:
        """Hand a reservation to the next waiting request in fair order, or give it back to the pool."""
        while self._waiting:
            turn = self._waiting.pop()
            self._queued -= 1
            if not turn.done():
                turn.set_result(None)
                return
        self.pool.cancel()

    def _finished(
        self,
        index: int,
        rows: int,
        size: int,
        key: Hashable,
        answer: asyncio.Future[list[Outcome]],
        execution: asyncio.Future[list[Outcome]],
    ) -> None:
        """The execution on ``index`` has returned: its instance goes to the next waiting request in fair
        order (or back to the pool), its memory back to the room, a successful run is counted (and its
        time kept for the inline rule, under its shapes' ``key``), and its caller's ``answer`` completed
        (unless the caller went away, or ``stop`` answered it)."""
        self._running.pop(execution, None)
        if size and self.bound is not None:
            self.bound.room.give(size)
        self.pool.finish(index)
        self._pass_on()
        if execution.cancelled():
            answer.cancel()
            return
        error = execution.exception()
        if error is not None:
            if not answer.done():
                answer.set_exception(error)
            return
        outcomes = execution.result()
        self._on_execution(rows, outcomes[0])
        if self.inline is not None and key is not None:
            self.inline.observed(key, outcomes[0].cpu_ns)
        if not answer.done():
            answer.set_result(outcomes)

    def queued(self) -> int:
        """Requests waiting for a free instance."""
        return self._queued

    async def stop(self, error: OnnxServeError | None = None, running: OnnxServeError | None = None) -> None:
        """Refuse new requests and those still waiting for an instance with ``error``; let running
        executions finish (on the event loop, before it closes), or, given ``running``, stop them (ONNX
        Runtime's terminate flag) and answer their callers with it at once."""
        self._stopped = error or stopped(self.name)
        while self._waiting:
            turn = self._waiting.pop()
            self._queued -= 1
            if not turn.done():
                turn.set_exception(_own(self._stopped))
        if running is not None:
            for control, answer in self._running.values():
                control.terminate()
                if not answer.done():
                    answer.set_exception(_own(running))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def close(self) -> None:
        self.pool.close()


@dataclass(eq=False)  # compared by identity: the queue removes exactly this request
class _Pending:
    work: Work
    submitted_ns: int
    future: asyncio.Future[Scheduled] = field(repr=False)
    due: bool = False  # left over by the balance cap: goes to the next free instance without waiting


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
        gather_us: int = 0,
        bound: ExecutionBound | None = None,
    ) -> None:
        self.pool = pool
        self.bound = bound
        self._run_batch = run_batch
        self._on_execution = on_execution
        self.max_batch_size = max_batch_size
        self.settings = settings
        self.name = name
        self.gather_us = gather_us
        self.incoming = 0  # requests on their way to ``submit`` (being tokenized), counted by the service
        self._queue: deque[_Pending] = deque()  # in arrival order
        self._turns: dict[str, None] = {}  # clients in the order their turn comes (``_fair_order``)
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._executions: dict[RunControl, list[_Pending]] = {}  # running executions and their requests
        self._stopped: OnnxServeError | None = None  # what a request gets once the batcher has stopped
        # a client whose values fail every batch they join had 323 lines written in 10 s (outside attack rt24)
        self._failed_batches = LogThrottle()

    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, work: Work) -> Scheduled:
        if self._stopped is not None:
            raise _own(self._stopped)
        limit = self.settings.max_queue_size
        if limit and len(self._queue) >= limit:
            self._make_room(work.client, limit)
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._dispatch(), name=f"batcher-{self.name}")
        pending = _Pending(work, time.perf_counter_ns(), loop.create_future())
        self._queue.append(pending)
        self._turns.setdefault(work.client)
        self._arrived.set()
        try:
            with work.progress.waiting():  # until its batch starts (``_execute`` marks it started)
                return await pending.future
        except asyncio.CancelledError:
            # The caller went away: its slot in the queue is free at once (a batch already formed
            # drops it, and stops when none of its requests is still awaited).
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
            raise

    def _make_room(self, client: str, limit: int) -> None:
        """A full queue: refuse ``client``'s request, or the newest request of the client holding the most
        places when that holds at least two more than ``client`` (``fairness.should_displace``)."""
        error = queue_full(self.name, len(self._queue), limit)
        places: FairQueue[_Pending] = FairQueue()
        for pending in self._queue:
            places.push(pending.work.client, pending)
        displaced = should_displace(places, client)
        if displaced is None:
            raise error
        victim = places.pop_newest(displaced)
        self._queue.remove(victim)
        _fail(victim, error)

    def _fair_order(self) -> list[_Pending]:
        """The queue in fair order: round by round across the clients with requests queued, starting with
        the client whose turn it is; each client's requests in arrival order."""
        first = self._queue[0].work.client
        if all(p.work.client == first for p in self._queue):
            return list(self._queue)
        by_client: dict[str, list[_Pending]] = {}
        for pending in self._queue:
            by_client.setdefault(pending.work.client, []).append(pending)
        for client in [c for c in self._turns if c not in by_client]:
            del self._turns[client]
        for client in by_client:
            self._turns.setdefault(client)
        return list(interleave([by_client[c] for c in self._turns]))

    def _served(self, batch: list[_Pending]) -> None:
        """The clients in ``batch`` have had their turn: they go to the end of the rotation, the one whose
        request was last in the batch's fair order last (so the next batch starts with the client after it)."""
        last: dict[str, int] = {}
        for position, pending in enumerate(batch):
            last[pending.work.client] = position
        for client in sorted(last, key=last.__getitem__):
            self._turns.pop(client, None)
            self._turns[client] = None
        queued = {p.work.client for p in self._queue}
        for client in [c for c in self._turns if c not in queued]:
            del self._turns[client]

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
            size = _size(self.bound, [p.work for p in batch])
            if size and self.bound is not None:
                try:
                    await self.bound.room.take(size)
                except asyncio.CancelledError:
                    self.pool.cancel()
                    for pending in batch:
                        _fail(pending, _own(self._stopped or stopped(self.name)))
                    raise
            index = self.pool.take()
            task = asyncio.get_running_loop().create_task(self._execute(index, batch, size))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        """Wait for work, then for a batch worth sending; take it off the queue."""
        assert self._arrived is not None
        gather_until: float | None = None
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            order = self._fair_order()
            head = next((p for p in order if p.due), order[0])
            compatible = [p for p in order if p.work.key == head.work.key]
            selection = self._select(head, compatible)
            rows = _rows(selection)
            oldest = min(p.submitted_ns for p in compatible)
            waited_us = (time.perf_counter_ns() - oldest) / 1000
            remaining_us = self.settings.max_queue_delay_us - waited_us
            preferred = _preferred_prefixes(selection, self.settings.preferred_batch_sizes)
            cannot_grow = rows >= self.max_batch_size or len(selection) < len(compatible)
            if remaining_us <= 0 and not (preferred or cannot_grow or head.due):
                remaining_us = self._gather_us(rows, gather_until)
                if remaining_us > 0 and gather_until is None:
                    gather_until = time.perf_counter() + remaining_us / 1e6
            if preferred or cannot_grow or head.due or remaining_us <= 0:
                batch, left_over = self._cut(selection, _rows(compatible), preferred)
                for pending in left_over:
                    pending.due = True
                for pending in batch:
                    self._queue.remove(pending)
                self._served(batch)
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining_us / 1e6)

    def _gather_us(self, rows: int, gather_until: float | None) -> float:
        """How long a batch that could go now waits for requests already on their way (``gather_us``):
        only while another instance is running (the cores are busy anyway), those requests would fit,
        and at most ``gather_us`` in all. Without requests on their way waiting cannot help: 0."""
        if not self.gather_us or not self.incoming or self.pool.idle() == len(self.pool.busy):
            return 0.0
        if rows + 1 > self.max_batch_size:
            return 0.0
        if gather_until is None:
            return float(self.gather_us)
        return (gather_until - time.perf_counter()) * 1e6

    def _select(self, first: _Pending, compatible: list[_Pending]) -> list[_Pending]:
        """``first`` and the compatible requests that fit with it, in fair order (closest lengths first,
        for text under a token budget)."""
        candidates = [p for p in compatible if p is not first]
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
            if budget and new_rows * new_longest > budget:
                continue
            if self.bound is not None and not self.bound.fits(new_rows, new_longest):
                continue
            batch.append(pending)
            rows, longest = new_rows, new_longest
        return batch

    def _balance_cap(self, queued_rows: int) -> int:
        """The most rows one batch may take so that every idle instance gets a share of the queue."""
        idle = max(1, self.pool.idle())
        cap = -(-queued_rows // idle)
        larger = [size for size in self.settings.preferred_batch_sizes if size >= cap]
        if larger:
            cap = min(larger)
        return min(cap, self.max_batch_size)

    def _cut(
        self, selection: list[_Pending], queued_rows: int, preferred: list[int]
    ) -> tuple[list[_Pending], list[_Pending]]:
        """The part of ``selection`` to send now, and the requests the balance cap left for another
        instance. ``preferred`` lists the prefix lengths whose rows are a preferred size."""
        cap = self._balance_cap(queued_rows)
        within, rows = 0, 0
        for pending in selection:
            if within and rows + pending.work.rows > cap:
                break
            within += 1
            rows += pending.work.rows
        fitting = [n for n in preferred if n <= within]
        if fitting:
            count = max(fitting)
        elif preferred:
            count = min(preferred)  # the balance cap gives way to a preferred size
        else:
            count = within
        return selection[:count], (selection[within:] if count <= within else [])

    def _drop_abandoned(self) -> None:
        for pending in [p for p in self._queue if p.future.done()]:
            self._queue.remove(pending)

    async def _execute(self, index: int, batch: list[_Pending], memory: int = 0) -> None:
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            started = time.perf_counter_ns()
            size = sum(p.work.rows for p in live)
            control = RunControl()
            for pending in live:
                pending.work.progress.start()  # before the run is handed to its thread: never withdrawn now

            def abandoned(_: object) -> None:
                if all(p.future.cancelled() for p in live):
                    control.terminate()

            for pending in live:
                pending.future.add_done_callback(abandoned)
            try:
                with self._cuttable(control, live):
                    outcomes = await self.pool.run(index, self._run_batch, [p.work for p in live], control)
            except Exception as e:
                if len(live) == 1 or control.terminated:
                    for pending in live:
                        _fail(pending, e)
                    return
                # One request's values can fail a whole batch (an index out of range): run each alone
                # on this instance, so that exactly the requests that fail get the error.
                if count := self._failed_batches.due():
                    log.info(
                        "model %s: a batch of %d failed (%s); running its requests one by one%s",
                        self.name,
                        size,
                        e,
                        self._failed_batches.note(count),
                    )
                for pending in live:
                    await self._execute_alone(index, pending)
                return
            self._on_execution(size, outcomes[0])
            for pending, outcome in zip(live, outcomes, strict=True):
                if not pending.future.done():
                    pending.future.set_result(Scheduled(outcome, started - pending.submitted_ns, size))
        finally:
            self.pool.release(index)
            if memory and self.bound is not None:
                self.bound.room.give(memory)

    @contextlib.contextmanager
    def _cuttable(self, control: RunControl, requests: list[_Pending]) -> Iterator[None]:
        """While the block runs ``requests`` under ``control``, ``stop`` can cut them (``running``)."""
        self._executions[control] = requests
        try:
            yield
        finally:
            del self._executions[control]

    async def _execute_alone(self, index: int, pending: _Pending) -> None:
        if pending.future.done():
            return
        started = time.perf_counter_ns()
        control = RunControl()
        try:
            with self._cuttable(control, [pending]):
                (outcome,) = await self.pool.run(index, self._run_batch, [pending.work], control)
        except Exception as e:
            _fail(pending, e)
            return
        self._on_execution(pending.work.rows, outcome)
        if not pending.future.done():
            pending.future.set_result(Scheduled(outcome, started - pending.submitted_ns, pending.work.rows))

    async def stop(self, error: OnnxServeError | None = None, running: OnnxServeError | None = None) -> None:
        """Stop forming batches (on the event loop, before it closes): new and queued requests get
        ``error``; running batches finish, or, given ``running``, are stopped (ONNX Runtime's terminate
        flag) and their requests answered with it at once."""
        self._stopped = error or stopped(self.name)
        if running is not None:
            for control, live in list(self._executions.items()):
                control.terminate()
                for pending in live:
                    _fail(pending, _own(running))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        while self._queue:
            _fail(self._queue.popleft(), _own(self._stopped))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def close(self) -> None:
        self.pool.close()


def _own(error: OnnxServeError) -> OnnxServeError:
    """A copy of a stopped scheduler's error for one request (same type, same message, no traceback yet).
    The scheduler keeps its error for later requests: raised itself, it would take the traceback of the
    request it failed, whose frames hold the model version, and the version holds the scheduler, a cycle
    that kept every version unloaded with requests waiting until a full garbage collection (outside
    attack rt25 F2)."""
    return copy.copy(error)


def stopped(name: str) -> UnavailableError:
    return UnavailableError(f"model {name!r} is no longer served; send the request again")


def queue_full(name: str, queued: int, limit: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(f"model {name!r} has {queued} requests queued (max_queue_size {limit}); retry later")


def _rows(requests: Sequence[_Pending]) -> int:
    return sum(p.work.rows for p in requests)


def _size(bound: ExecutionBound | None, works: Sequence[Work]) -> int:
    """The estimated memory of one execution of ``works`` (rows padded to the longest), 0 without a bound."""
    if bound is None:
        return 0
    return bound.size(sum(w.rows for w in works), max(w.longest for w in works))


def _preferred_prefixes(selection: Sequence[_Pending], sizes: Sequence[int]) -> list[int]:
    """The lengths of the prefixes of ``selection`` whose rows add up to a preferred size."""
    prefixes, rows = [], 0
    for length, pending in enumerate(selection, start=1):
        rows += pending.work.rows
        if rows in sizes:
            prefixes.append(length)
    return prefixes


def _fail(pending: _Pending, error: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


Scheduler = DirectScheduler | DynamicBatcher
