"""The budgets of text characters tokenized (server-wide) or held as tokens (per model version) at once
(core/text_budget.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from onnxserve.core.pipeline import MAX_REQUEST_CHARACTERS, TextBatch
from onnxserve.core.text_budget import (
    SMALL_CHARACTERS_AT_ONCE,
    SMALL_REQUEST_CHARACTERS,
    TEXT_CHARACTERS,
    CharacterBudget,
    TextBudget,
    charged,
    model_room,
)
from onnxserve.errors import UnavailableError


async def _hold(
    budget: CharacterBudget, characters: int, log: list[str], name: str, release: asyncio.Event, client: str = ""
) -> None:
    async with budget.held(characters, client):
        log.append(f"{name} in")
        assert budget.used <= budget.limit
        await release.wait()
    log.append(f"{name} out")


def test_requests_that_do_not_fit_wait_in_arrival_order() -> None:
    async def scenario() -> list[str]:
        budget = CharacterBudget(100)
        log: list[str] = []
        gates = {name: asyncio.Event() for name in "abc"}
        a = asyncio.create_task(_hold(budget, 70, log, "a", gates["a"]))
        await asyncio.sleep(0)
        b = asyncio.create_task(_hold(budget, 60, log, "b", gates["b"]))  # does not fit beside a
        await asyncio.sleep(0)
        c = asyncio.create_task(_hold(budget, 10, log, "c", gates["c"]))  # would fit, but b waits first
        await asyncio.sleep(0.01)
        assert log == ["a in"]
        assert budget.used == 70
        gates["a"].set()
        await asyncio.sleep(0.01)
        assert log == ["a in", "a out", "b in", "c in"]
        assert budget.used == 70
        gates["b"].set()
        gates["c"].set()
        await asyncio.gather(a, b, c)
        assert budget.used == 0
        return log

    assert asyncio.run(scenario())[-2:] == ["b out", "c out"]


def test_a_waiting_request_that_goes_away_leaves_no_room_taken_and_lets_the_next_in() -> None:
    async def scenario() -> None:
        budget = CharacterBudget(100)
        log: list[str] = []
        gate = asyncio.Event()
        a = asyncio.create_task(_hold(budget, 90, log, "a", gate))
        await asyncio.sleep(0)
        b = asyncio.create_task(_hold(budget, 50, log, "b", gate))
        await asyncio.sleep(0)
        c = asyncio.create_task(_hold(budget, 10, log, "c", gate))
        await asyncio.sleep(0.01)
        assert log == ["a in"]
        b.cancel()  # the head of the line leaves: c fits beside a now
        with pytest.raises(asyncio.CancelledError):
            await b
        await asyncio.sleep(0.01)
        assert log == ["a in", "c in"]
        assert budget.used == 100
        gate.set()
        await asyncio.gather(a, c)
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_request_larger_than_the_budget_runs_alone_rather_than_never() -> None:
    async def scenario() -> None:
        budget = CharacterBudget(100)
        async with budget.held(500):
            assert budget.used == 100
        assert budget.used == 0

    asyncio.run(scenario())


def test_waiting_clients_are_served_in_turn() -> None:
    """Outside attack: one client's many large requests made another's wait for all of them (57 s)."""

    async def scenario() -> list[str]:
        budget = CharacterBudget(100)
        log: list[str] = []
        gate = asyncio.Event()
        first = asyncio.create_task(_hold(budget, 100, log, "x0", gate, "x"))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(_hold(budget, 100, log, f"x{i}", gate, "x")) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(_hold(budget, 100, log, "y", gate, "y")))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *tasks)
        return [entry for entry in log if entry.endswith(" in")]

    assert asyncio.run(scenario()) == ["x0 in", "x1 in", "y in", "x2 in", "x3 in"]


def test_a_small_request_does_not_wait_behind_large_ones() -> None:
    async def scenario() -> None:
        budget = TextBudget(large=100_000, small=SMALL_REQUEST_CHARACTERS)
        async with budget.held(100_000, "x"):
            waiting = asyncio.create_task(_enter(budget, 100_000, "x"))
            await asyncio.sleep(0.01)
            assert not waiting.done()  # the large pool is full
            await asyncio.wait_for(_enter(budget, 600, "y"), 1)  # the small pool has room
        await asyncio.wait_for(waiting, 1)

    asyncio.run(scenario())


async def _enter(budget: TextBudget, characters: int, client: str) -> None:
    async with budget.held(characters, client):
        pass


def test_a_cancelled_tokenization_keeps_its_room_until_its_thread_returns() -> None:
    """Outside attack: callers that left mid-tokenization gave their room back while their tokenizer
    threads went on, so more tokenizations ran at once than the budget allows."""
    from onnxserve.core.service import _until_returned

    async def scenario() -> tuple[bool, int]:
        budget = CharacterBudget(100)
        released = threading.Event()

        def tokenize() -> None:
            released.wait(5)

        with ThreadPoolExecutor(max_workers=1) as executor:

            async def request() -> None:
                async with budget.held(100):
                    await _until_returned(executor, tokenize)

            task = asyncio.create_task(request())
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.sleep(0.05)
            held_while_running = budget.used
            released.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return task.cancelled(), held_while_running

    assert asyncio.run(scenario()) == (True, 100)


def test_a_model_room_holds_one_largest_request_beside_small_ones() -> None:
    async def scenario() -> None:
        room = model_room()
        async with room.held(MAX_REQUEST_CHARACTERS, "x"):
            assert room.large.used == MAX_REQUEST_CHARACTERS
            waiting = asyncio.create_task(_enter(room, SMALL_REQUEST_CHARACTERS + 1, "y"))
            await asyncio.sleep(0.01)
            assert not waiting.done()  # one largest request at a time
            for _ in range(SMALL_CHARACTERS_AT_ONCE // SMALL_REQUEST_CHARACTERS):
                await asyncio.wait_for(_enter(room, SMALL_REQUEST_CHARACTERS, "z"), 1)  # small ones go beside it
        await asyncio.wait_for(waiting, 1)
        assert room.large.used == room.small.used == 0

    asyncio.run(scenario())


def test_a_model_rooms_waiting_clients_are_served_in_turn_and_one_that_leaves_takes_nothing() -> None:
    async def scenario() -> list[str]:
        room = model_room()
        pool = room.small
        log: list[str] = []
        gate = asyncio.Event()
        first = asyncio.create_task(_hold(pool, pool.limit, log, "x0", gate, "x"))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(_hold(pool, pool.limit, log, f"x{i}", gate, "x")) for i in (1, 2)]
        await asyncio.sleep(0)
        leaving = asyncio.create_task(_hold(pool, pool.limit, log, "w", gate, "w"))
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(_hold(pool, pool.limit, log, "y", gate, "y")))
        await asyncio.sleep(0.01)
        assert pool.waiting() == 4
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert pool.waiting() == 3
        assert pool.used == pool.limit  # only x0's
        gate.set()
        await asyncio.gather(first, *tasks)
        assert pool.used == 0
        return [entry for entry in log if entry.endswith(" in")]

    assert asyncio.run(scenario()) == ["x0 in", "x1 in", "y in", "x2 in"]


def test_a_closed_room_fails_its_waiting_and_later_requests_and_keeps_what_is_held_until_it_ends() -> None:
    """Unloading a version closes its room: requests still waiting for it get the unload's error."""

    def unloaded() -> UnavailableError:
        return UnavailableError("model 'm' version 1 was unloaded before this request could run; send it again")

    async def scenario() -> None:
        room = model_room()
        room.check_open()  # open: nothing raised
        gate = asyncio.Event()
        log: list[str] = []
        holder = asyncio.create_task(_hold(room.small, room.small.limit, log, "held", gate))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(_enter(room, 1000, client)) for client in "ab"]
        await asyncio.sleep(0.01)
        assert room.small.waiting() == 2
        room.close(unloaded)
        for waiter in waiters:
            with pytest.raises(UnavailableError, match="was unloaded"):
                await waiter
        with pytest.raises(UnavailableError, match="was unloaded"):
            await _enter(room, SMALL_REQUEST_CHARACTERS + 1, "c")
        assert room.small.used == room.small.limit  # the request that held room still runs
        with pytest.raises(UnavailableError, match="was unloaded"):
            room.check_open()  # ... and one that works in steps (a sliced tokenization) stops at its next one
        gate.set()
        await holder
        assert room.small.used == room.large.used == 0
        assert room.small.waiting() == 0

    asyncio.run(scenario())


def test_each_text_counts_some_characters_however_short() -> None:
    """A request of a million one-character texts is counted like one of 33 million characters: it takes a
    whole pool alone (its kept tokens cost about 60 bytes per text, where a character of long text keeps a
    few)."""
    assert charged(TextBatch(["!"] * 1_000_000)) == 1_000_000 * (1 + TEXT_CHARACTERS)
    assert charged(TextBatch(["", ""], ["ab", "c"])) == 3 + 4 * TEXT_CHARACTERS  # pairs are texts too
    room = model_room()
    assert min(charged(TextBatch(["!"] * 1_000_000)), room.large.limit) == room.large.limit
