"""A request's progress (``core.progress``) as the schedulers and text budgets mark it: it only waits while
it is queued at its model or waits for room for its text, and counts as started for good once an
execution of it begins. A front end withdraws only requests that only wait (``InferenceCall.withdraw``
cancels their task, as below), so they must leave their queue and never run.

The model is ``paced`` (y = x after max(x) chained 64x64 products) on one instance; a blocker with a huge
value holds it while the queue is built, then its caller goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import models
from onnxserve.config import DynamicBatching
from onnxserve.core import chunking
from onnxserve.core.batching import DirectScheduler, DynamicBatcher, InstancePool
from onnxserve.core.execution import Outcome, Work, run_batch
from onnxserve.core.progress import Progress
from onnxserve.core.runtime import ModelSession, RunControl
from onnxserve.core.text_budget import CharacterBudget
from waiting import until

FOREVER = 1e9


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ModelSession:
    repo: Path = tmp_path_factory.mktemp("waiting_progress")
    models.write_version(repo, "paced", 1, models.value_paced_model("paced", 64))
    return ModelSession(repo / "paced" / "1" / "model.onnx", name="paced")


@pytest.fixture
def pool(session: ModelSession) -> Iterator[InstancePool]:
    pool = InstancePool([session], "paced")
    yield pool
    pool.close()


def work(value: float, client: str = "a") -> Work:
    return Work(["y"], 1, feeds={"x": np.array([[value]], dtype=np.float32)}, client=client)


@pytest.mark.parametrize("batching", [False, True])
def test_a_request_only_waits_until_its_execution_begins(
    session: ModelSession, pool: InstancePool, batching: bool
) -> None:
    ran: list[float] = []
    real_run = partial(run_batch, pipeline=None, output_specs=session.outputs)

    def recorded(session: ModelSession, works: Sequence[Work], control: RunControl) -> list[Outcome]:
        ran.extend(float(v) for w in works for v in (w.feeds or {})["x"][:, 0])
        return real_run(session, works, control)

    scheduler: DirectScheduler | DynamicBatcher
    if batching:
        scheduler = DynamicBatcher(pool, recorded, lambda size, outcome: None, 1, DynamicBatching(), "paced")
    else:
        scheduler = DirectScheduler(pool, recorded, lambda size, outcome: None, 0, "paced")

    async def scenario() -> None:
        blocking = work(FOREVER, "blocker")
        blocker = asyncio.create_task(scheduler.submit(blocking))
        await until(lambda: pool.busy == [1])
        assert blocking.progress.started
        assert not blocking.progress.only_waiting
        first, second = work(1.0), work(2.0)
        tasks = [asyncio.create_task(scheduler.submit(w)) for w in (first, second)]
        await until(lambda: scheduler.queued() == 2)
        assert first.progress.only_waiting
        assert second.progress.only_waiting
        assert not first.progress.started
        tasks[1].cancel()  # withdrawn while it only waits
        await until(lambda: scheduler.queued() == 1)
        assert not second.progress.only_waiting
        blocker.cancel()
        await tasks[0]
        assert first.progress.started
        assert not first.progress.only_waiting
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        await scheduler.stop()
        assert not second.progress.started

    asyncio.run(scenario())
    assert ran == [FOREVER, 1.0]  # the second request never ran


def test_a_request_waiting_for_text_room_only_waits_until_it_has_room() -> None:
    budget = CharacterBudget(10)

    async def scenario() -> None:
        holding = asyncio.Event()
        release = asyncio.Event()
        holder_progress = Progress()

        async def holder() -> None:
            async with budget.held(10, "a", holder_progress):
                holding.set()
                await release.wait()

        held = asyncio.create_task(holder())
        await holding.wait()
        assert not holder_progress.only_waiting  # it has its room: it does not wait
        waiter_progress = Progress()

        async def waiter() -> None:
            async with budget.held(5, "b", waiter_progress):
                pass

        withdrawn = asyncio.create_task(waiter())
        await until(lambda: budget.waiting() == 1)
        assert waiter_progress.only_waiting
        withdrawn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await withdrawn
        assert budget.waiting() == 0
        assert budget.used == 10
        assert not waiter_progress.only_waiting
        release.set()
        await held
        assert budget.used == 0

    asyncio.run(scenario())


def test_the_chunks_of_a_request_share_its_progress() -> None:
    """A large request runs in chunks (``core.chunking``): once its first chunk has begun, the rest of it
    is never withdrawn (its first chunk's work would be lost)."""
    whole = Work(["y"], 4, feeds={"x": np.zeros((4, 1), dtype=np.float32)})
    first = chunking._part(whole, 0, 2)
    with first.progress.waiting():
        assert whole.progress.only_waiting
        first.progress.start()
        assert not whole.progress.only_waiting
    assert whole.progress.started
