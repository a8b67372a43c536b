"""The server-wide budget of text characters tokenized or held as tokens at once (core/text_budget.py)."""

from __future__ import annotations

import asyncio

import pytest

from onnxserve.core.text_budget import CharacterBudget


async def _hold(budget: CharacterBudget, characters: int, log: list[str], name: str, release: asyncio.Event) -> None:
    async with budget.held(characters):
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
