"""The codec threads serve clients by the time they have used (``offload.convert``, ``fairness.FairTurns``): a
client with one large request waits for the works running, not for the works queued before it by a client
that has used the threads more (outside attack rt56: a few addresses' heaviest messages, 0.7 s each, held
every other large request)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from onnxserve.protocols import context, offload

LARGE = offload.INLINE_BYTES  # converted in the codec threads
T = TypeVar("T")


def _work(started: list[str], release: threading.Event, name: str) -> str:
    started.append(name)
    if not release.wait(timeout=30):
        raise TimeoutError(f"{name} was never released")
    return name


async def _as(client: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` in a task of its own, made for a request from the address ``client``."""
    token = context.set_peer_host(client)
    try:
        return await asyncio.ensure_future(call())  # the task copies the context with the peer in it
    finally:
        context.reset_peer_host(token)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def test_a_client_with_one_work_goes_ahead_of_the_queue_of_a_client_that_used_the_threads() -> None:
    async def scenario() -> list[str]:
        started: list[str] = []
        releases = {name: threading.Event() for name in ("a1", "a2", "a3", "a4", "a5", "b1")}

        def convert(name: str) -> Callable[[], Awaitable[str]]:
            return lambda: offload.convert(LARGE, _work, started, releases[name], name)

        heavy = [asyncio.ensure_future(_as("10.0.0.1", convert(f"a{i}"))) for i in range(1, 6)]
        await _until(lambda: len(started) == offload.WORKERS)
        light = asyncio.ensure_future(_as("10.0.0.2", convert("b1")))
        await asyncio.sleep(0.05)
        assert started == ["a1", "a2"]  # both threads busy: everything else waits
        for count in range(3, 7):  # one work ends at a time, the oldest running first
            releases[started[count - 3]].set()
            await _until(lambda count=count: len(started) == count)  # type: ignore[misc]
        for release in releases.values():
            release.set()
        assert await light == "b1"
        assert [await task for task in heavy] == ["a1", "a2", "a3", "a4", "a5"]
        return started

    # First come first served would run b1 last, after every work of 10.0.0.1; round-robin by count, after a3.
    assert asyncio.run(scenario()) == ["a1", "a2", "b1", "a3", "a4", "a5"]


def test_a_work_whose_request_went_away_keeps_its_thread_until_it_ends() -> None:
    """The turn is the thread's: cancelling the request does not hand its thread to another work while the
    cancelled one still runs in it, and a work cancelled while it waits takes no turn at all."""

    async def scenario() -> None:
        started: list[str] = []
        releases = {name: threading.Event() for name in ("a1", "a2", "a3", "b1")}

        def convert(name: str) -> Callable[[], Awaitable[str]]:
            return lambda: offload.convert(LARGE, _work, started, releases[name], name)

        running = [asyncio.ensure_future(_as("10.0.0.1", convert(name))) for name in ("a1", "a2")]
        await _until(lambda: len(started) == 2)
        waiting = asyncio.ensure_future(_as("10.0.0.1", convert("a3")))
        late = asyncio.ensure_future(_as("10.0.0.2", convert("b1")))
        await asyncio.sleep(0.05)
        waiting.cancel()
        running[0].cancel()
        await asyncio.sleep(0.1)
        assert started == ["a1", "a2"]  # a1 still runs in its thread: b1 waits for its turn
        assert offload._codec_turns(asyncio.get_running_loop()).waiting() == 1
        releases["a1"].set()
        await _until(lambda: len(started) == 3)
        assert started == ["a1", "a2", "b1"]  # a3 went away while waiting: never run
        releases["a2"].set()
        releases["b1"].set()
        assert await late == "b1"
        assert await running[1] == "a2"
        await asyncio.sleep(0.05)
        assert started == ["a1", "a2", "b1"]

    asyncio.run(scenario())


def test_small_works_run_inline_whoever_asks() -> None:
    async def scenario() -> str:
        return await offload.convert(LARGE - 1, lambda: threading.current_thread().name)

    assert asyncio.run(scenario()) == threading.current_thread().name
