"""FairTurns: turns at a few workers go to the waiting client that has used them least (core/fairness.py)."""

from __future__ import annotations

import asyncio

from onnxserve.core.fairness import FairTurns


class Clock:
    """A clock the test moves by hand: each turn takes exactly the time the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_client_that_used_the_workers_least_goes_first() -> None:
    async def scenario() -> list[str]:
        clock = Clock()
        turns = FairTurns(1, clock)
        order: list[str] = []
        # heavy used 5 s, light 1 s, on the one worker
        for client, seconds in (("heavy", 5.0), ("light", 1.0)):
            turn = await turns.take(client)
            clock.now += seconds
            turns.end(turn)
        blocker = await turns.take("other")
        waiting = {
            name: asyncio.ensure_future(turns.take(client))
            for name, client in (("heavy-1", "heavy"), ("heavy-2", "heavy"), ("light-1", "light"))
        }
        await _settle()
        assert turns.waiting() == 3
        turns.end(blocker)
        for _ in range(3):
            await _settle()
            name, task = next((n, t) for n, t in waiting.items() if t.done() and n not in order)
            order.append(name)
            clock.now += 1.0
            turns.end(task.result())
        return order

    # light is behind by 4 s: both its work and, after it, heavy's in their own order
    assert asyncio.run(scenario()) == ["light-1", "heavy-1", "heavy-2"]


def test_a_newcomer_goes_ahead_of_clients_whose_works_took_the_workers() -> None:
    async def scenario() -> list[str]:
        clock = Clock()
        turns = FairTurns(2, clock)
        order: list[str] = []
        for i in range(2):  # each heavy client has had a work of 0.7 s
            turn = await turns.take(f"heavy{i}")
            clock.now += 0.7
            turns.end(turn)
        running = [await turns.take(f"heavy{i}") for i in range(2)]
        queued = [asyncio.ensure_future(turns.take(f"heavy{i % 2}")) for i in range(6)]
        await _settle()
        newcomer = asyncio.ensure_future(turns.take("newcomer"))
        await _settle()
        clock.now += 0.7
        turns.end(running.pop(0))
        await _settle()
        if newcomer.done():
            order.append("newcomer")
            turns.end(newcomer.result())
        await _settle()
        for task in queued:  # the heavy clients' works go away; one was given the newcomer's turn after it
            task.cancel()
        turns.end(running.pop(0))
        await _settle()
        given = [task.result() for task in queued if task.done() and not task.cancelled()]
        assert len(given) == 1
        turns.end(given[0])
        assert turns.busy == 0
        assert turns.waiting() == 0
        return order

    assert asyncio.run(scenario()) == ["newcomer"]


def test_a_work_that_goes_away_while_it_waits_takes_nothing() -> None:
    async def scenario() -> None:
        turns = FairTurns(1, Clock())
        held = await turns.take("a")
        gone = asyncio.ensure_future(turns.take("b"))
        after = asyncio.ensure_future(turns.take("c"))
        await _settle()
        gone.cancel()
        await _settle()
        assert turns.waiting() == 1
        turns.end(held)
        await _settle()
        assert after.done()
        assert turns.busy == 1
        turns.end(after.result())
        assert turns.busy == 0
        assert turns.waiting() == 0

    asyncio.run(scenario())


def test_idle_clients_are_forgotten_once_the_virtual_time_catches_up() -> None:
    async def scenario() -> tuple[int, int]:
        clock = Clock()
        turns = FairTurns(1, clock)
        for i in range(100):  # each used a little, and went
            turn = await turns.take(f"client{i}")
            clock.now += 0.01
            turns.end(turn)
        remembered = turns.clients()
        # a client that keeps using the worker moves the virtual time past all of theirs
        for _ in range(FairTurns.SWEEP_EVERY + 1):
            turn = await turns.take("busy")
            clock.now += 0.01
            turns.end(turn)
        return remembered, turns.clients()

    remembered, later = asyncio.run(scenario())
    assert remembered == 100  # each is ahead of the virtual time its turn started at: remembered
    assert later <= 1
