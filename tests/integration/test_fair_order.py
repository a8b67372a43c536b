"""Fair order between clients in both schedulers, on a real model: the order requests run in, the way
batches are filled, and which request a full queue refuses.

The model is ``paced`` (y = x after max(x) chained 64x64 products). A blocker request with a huge value
holds the only instance while the queue is built, then its caller goes away (the scheduler stops its
run), and the queue drains; each execution's rows (their x values) are recorded as it starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import models
from onnxserve.config import DynamicBatching
from onnxserve.core.batching import DirectScheduler, DynamicBatcher, InstancePool, Scheduled
from onnxserve.core.execution import Outcome, Work, run_batch
from onnxserve.core.fairness import FairQueue, should_displace
from onnxserve.core.runtime import ModelSession, RunControl
from onnxserve.errors import ResourceExhaustedError, UnavailableError
from waiting import until

FOREVER = 1e9
Scheduler = DirectScheduler | DynamicBatcher


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ModelSession:
    repo: Path = tmp_path_factory.mktemp("fair_order")
    models.write_version(repo, "paced", 1, models.value_paced_model("paced", 64))
    return ModelSession(repo / "paced" / "1" / "model.onnx", name="paced")


class Recorder:
    """Runs executions with the real ``run_batch``; keeps each one's x values, in the order they ran."""

    def __init__(self, session: ModelSession) -> None:
        self.executions: list[list[float]] = []
        self._run = partial(run_batch, pipeline=None, output_specs=session.outputs)

    def __call__(self, session: ModelSession, works: Sequence[Work], control: RunControl) -> list[Outcome]:
        values = [float(v) for w in works for v in (w.feeds or {})["x"][:, 0]]
        if FOREVER not in values:
            self.executions.append(values)
        return self._run(session, works, control)


@pytest.fixture
def pool(session: ModelSession) -> Iterator[InstancePool]:
    pool = InstancePool([session], "paced")
    yield pool
    pool.close()


def work(value: float, client: str) -> Work:
    return Work(["y"], 1, feeds={"x": np.array([[value]], dtype=np.float32)}, client=client)


async def behind_a_blocker(
    scheduler: Scheduler, queue: list[tuple[str, float]], after: Callable[[], None] = lambda: None
) -> list[Scheduled | BaseException]:
    """Hold the only instance, queue ``queue`` ((client, value) in arrival order), call ``after``, then let
    the blocker's caller go away; every queued request's answer or error."""
    blocker = asyncio.create_task(scheduler.submit(work(FOREVER, "blocker")))
    await until(lambda: scheduler.pool.busy == [1])
    tasks = []
    for client, value in queue:
        tasks.append(asyncio.create_task(scheduler.submit(work(value, client))))
        await until(lambda: scheduler.queued() + sum(t.done() for t in tasks) == len(tasks))
    after()
    assert scheduler.pool.busy == [1], "the blocker ended before the queue was built"
    blocker.cancel()
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    await scheduler.stop()
    return answers


def direct(pool: InstancePool, recorder: Recorder, max_queue_size: int = 0) -> DirectScheduler:
    return DirectScheduler(pool, recorder, lambda size, outcome: None, max_queue_size, "paced")


def batcher(pool: InstancePool, recorder: Recorder, max_batch_size: int, max_queue_size: int = 0) -> DynamicBatcher:
    settings = DynamicBatching(max_queue_size=max_queue_size)
    return DynamicBatcher(pool, recorder, lambda size, outcome: None, max_batch_size, settings, "paced")


FLOOD_THEN_TWO = [("a", 1.0), ("a", 2.0), ("a", 3.0), ("a", 4.0), ("b", 11.0), ("b", 12.0), ("c", 21.0)]


def test_a_free_instance_goes_round_robin_across_waiting_clients(session: ModelSession, pool: InstancePool) -> None:
    """Client a queued four requests before b queued two and c one: the instance goes a, b, c, a, b, a,
    a; each client's own requests in their order, and every answer is its caller's own."""
    recorder = Recorder(session)
    answers = asyncio.run(behind_a_blocker(direct(pool, recorder), FLOOD_THEN_TWO))
    assert recorder.executions == [[1.0], [11.0], [21.0], [2.0], [12.0], [3.0], [4.0]]
    for (_, value), answer in zip(FLOOD_THEN_TWO, answers, strict=True):
        assert isinstance(answer, Scheduled)
        assert float(answer.outcome.outputs["y"][0, 0]) == value


def test_one_client_alone_keeps_arrival_order(session: ModelSession, pool: InstancePool) -> None:
    recorder = Recorder(session)
    asyncio.run(behind_a_blocker(direct(pool, recorder), [("a", float(v)) for v in range(1, 6)]))
    assert recorder.executions == [[1.0], [2.0], [3.0], [4.0], [5.0]]


def test_a_batch_is_filled_round_robin_across_clients(session: ModelSession, pool: InstancePool) -> None:
    """max_batch_size 4: the first batch takes each client's first request, then a's second; the next
    starts with the client after the last one served (b), then a's; what is left goes last."""
    recorder = Recorder(session)
    queue = [("a", float(v)) for v in range(1, 7)] + [("b", 11.0), ("b", 12.0), ("c", 21.0)]
    answers = asyncio.run(behind_a_blocker(batcher(pool, recorder, 4), queue))
    assert recorder.executions == [[1.0, 11.0, 21.0, 2.0], [12.0, 3.0, 4.0, 5.0], [6.0]]
    for (_, value), answer in zip(queue, answers, strict=True):
        assert isinstance(answer, Scheduled)
        assert float(answer.outcome.outputs["y"][0, 0]) == value  # each caller got its own row


@pytest.mark.parametrize("batching", [False, True])
def test_a_full_queue_refuses_the_floods_newest_request_not_a_newcomer(
    session: ModelSession, pool: InstancePool, batching: bool
) -> None:
    """max_queue_size 4, all four places a's: b's request takes a's newest place (a's request is refused);
    a's next request is refused itself (a still holds the most); c's takes a's newest again; b's second,
    with b and a then holding two each, is refused."""
    recorder = Recorder(session)
    scheduler = batcher(pool, recorder, 1, max_queue_size=4) if batching else direct(pool, recorder, max_queue_size=4)
    queue = [("a", 1.0), ("a", 2.0), ("a", 3.0), ("a", 4.0), ("b", 11.0), ("a", 5.0), ("c", 21.0), ("b", 12.0)]
    answers = asyncio.run(behind_a_blocker(scheduler, queue))
    refused = [value for (_, value), a in zip(queue, answers, strict=True) if isinstance(a, ResourceExhaustedError)]
    assert sorted(refused) == [3.0, 4.0, 5.0, 12.0]
    assert "max_queue_size 4" in str(next(a for a in answers if isinstance(a, ResourceExhaustedError)))
    assert sorted(v for run in recorder.executions for v in run) == [1.0, 2.0, 11.0, 21.0]
    assert recorder.executions[:3] == [[1.0], [11.0], [21.0]]


@pytest.mark.parametrize("batching", [False, True])
def test_a_caller_that_leaves_the_queue_frees_its_turn(
    session: ModelSession, pool: InstancePool, batching: bool
) -> None:
    """b's only request is cancelled while it waits: it never runs, it is no longer counted as queued,
    and the others run in their fair order."""
    recorder = Recorder(session)
    scheduler = batcher(pool, recorder, 1) if batching else direct(pool, recorder)
    queued_after_cancel: list[int] = []

    async def scenario() -> None:
        blocker = asyncio.create_task(scheduler.submit(work(FOREVER, "blocker")))
        await until(lambda: pool.busy == [1])
        tasks = []
        for client, value in [("a", 1.0), ("a", 2.0), ("b", 11.0), ("c", 21.0)]:
            tasks.append(asyncio.create_task(scheduler.submit(work(value, client))))
            await until(lambda: scheduler.queued() == len(tasks))
        tasks[2].cancel()
        await until(lambda: scheduler.queued() == 3)
        queued_after_cancel.append(scheduler.queued())
        blocker.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await scheduler.stop()
        assert tasks[2].cancelled()

    asyncio.run(scenario())
    assert queued_after_cancel == [3]
    assert recorder.executions == [[1.0], [21.0], [2.0]]


def test_displacing_a_request_whose_caller_just_left_keeps_the_queue_count(
    session: ModelSession, pool: InstancePool
) -> None:
    """Outside attack: a full queue's newcomer took the newest place of a client whose caller had just gone
    away (its turn cancelled, its own clean-up not yet run): the newcomer got a 500 (InvalidStateError) and
    the place was never given back, so the queue shrank for good. Now the newcomer is queued, the count
    stays right, and the queue takes its full size again afterwards."""
    recorder = Recorder(session)
    scheduler = direct(pool, recorder, max_queue_size=4)

    async def scenario() -> list[object]:
        blocker = asyncio.create_task(scheduler.submit(work(FOREVER, "blocker")))
        await until(lambda: pool.busy == [1])
        floods = []
        for value in (1.0, 2.0, 3.0, 4.0):
            floods.append(asyncio.create_task(scheduler.submit(work(value, "a"))))
            await until(lambda: scheduler.queued() == len(floods))
        newcomer = asyncio.create_task(scheduler.submit(work(11.0, "b")))  # runs before a's clean-up below
        floods[3].cancel()
        await until(lambda: scheduler.queued() == 4)  # a's three and b's one
        blocker.cancel()
        answers = await asyncio.gather(*floods, newcomer, return_exceptions=True)
        assert scheduler.queued() == 0
        blocker = asyncio.create_task(scheduler.submit(work(FOREVER, "blocker")))
        await until(lambda: pool.busy == [1])
        again = [asyncio.create_task(scheduler.submit(work(float(v), "c"))) for v in (31, 32, 33, 34)]
        await until(lambda: scheduler.queued() == 4)  # all four places are there again
        blocker.cancel()
        answers += await asyncio.gather(*again, return_exceptions=True)
        await scheduler.stop()
        return answers

    answers = asyncio.run(scenario())
    assert not any(isinstance(a, asyncio.InvalidStateError) for a in answers), answers
    assert isinstance(answers[3], asyncio.CancelledError)
    assert all(isinstance(a, Scheduled) for i, a in enumerate(answers) if i != 3), answers
    assert sorted(v for run in recorder.executions for v in run) == [1.0, 2.0, 3.0, 11.0, 31.0, 32.0, 33.0, 34.0]


def test_fair_queue_round_robin_and_displacement() -> None:
    queue: FairQueue[str] = FairQueue()
    for client, item in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        queue.push(client, item)
    assert list(queue) == ["a1", "b1", "c1", "a2", "b2", "a3"]  # looked at, not taken
    assert len(queue) == 6
    assert should_displace(queue, "d") == "a"  # a holds 3, d none
    assert should_displace(queue, "b") is None  # a holds 3, b 2: places would only swap
    assert should_displace(queue, "a") is None
    assert queue.pop_newest("a") == "a3"
    assert queue.remove("c", "c1")
    assert not queue.remove("c", "c1")
    assert [queue.pop() for _ in range(len(queue))] == ["a1", "b1", "a2", "b2"]
    assert not queue


@pytest.mark.parametrize("batching", [False, True])
def test_stopping_refuses_queued_and_new_requests_with_its_error(
    session: ModelSession, pool: InstancePool, batching: bool
) -> None:
    """An unloaded version's scheduler stops: requests still queued behind its running execution, and any
    submitted later, get the unload's error (503 / UNAVAILABLE), not a hang or an executor's RuntimeError."""
    recorder = Recorder(session)
    scheduler = batcher(pool, recorder, 1) if batching else direct(pool, recorder)
    error = UnavailableError("model 'paced' version 1 was unloaded before this request could run")

    async def scenario() -> tuple[list[Scheduled | BaseException], BaseException | None]:
        running = asyncio.create_task(scheduler.submit(work(1.0, "a")))
        blocker = asyncio.create_task(scheduler.submit(work(FOREVER, "blocker")))
        queued = [asyncio.create_task(scheduler.submit(work(v, c))) for c, v in [("a", 2.0), ("b", 11.0)]]
        await until(lambda: scheduler.pool.busy == [1] and scheduler.queued() >= 2)
        stopping = asyncio.create_task(scheduler.stop(error))
        answers = await asyncio.gather(*queued, return_exceptions=True)
        blocker.cancel()  # the running execution ends; stop waits for it
        await stopping
        await asyncio.gather(running, blocker, return_exceptions=True)
        try:
            await scheduler.submit(work(3.0, "c"))
        except UnavailableError as late:
            return answers, late
        return answers, None

    answers, late = asyncio.run(scenario())
    # each request gets its own copy of the error (the one the scheduler keeps never holds a request's frames)
    assert [(type(a), str(a)) for a in answers] == [(UnavailableError, error.message)] * 2
    assert late is not None
    assert late is not error
    assert str(late) == error.message
    assert scheduler.queued() == 0
