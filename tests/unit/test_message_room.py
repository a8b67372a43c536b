"""``MessageRoom``: places of calls waiting for their gRPC messages, given way fairly (server.message_room).

Each "call" here is a task that takes a place and then awaits its message (a future the test completes
or leaves pending), as ``MessageReception._receive`` awaits ``ctx.read()``; the network behaviour is
tested end to end in ``tests/adversarial/test_grpc_message_room.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from onnxserve.server.message_room import MessageRoom, Place

SIZE = 10


@dataclass
class Call:
    """A call that takes a place, then waits for ``message``; what happened to it."""

    room: MessageRoom
    client: str
    message: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    place: Place | None = None
    outcome: str = "waiting"
    task: asyncio.Task[None] | None = None

    async def run(self, seconds: float) -> None:
        self.place = await self.room.enter(self.client, SIZE, seconds)
        if self.place is None:
            self.outcome = "refused"
            return
        try:
            await self.message
            self.outcome = "arrived"
        except asyncio.CancelledError:
            if not self.place.displaced:
                self.outcome = "cancelled"
                raise
            self.outcome = "gave way"
        finally:
            self.room.leave(self.place)


async def start(room: MessageRoom, client: str, seconds: float = 0.0) -> Call:
    call = Call(room, client)
    call.task = asyncio.create_task(call.run(seconds))
    await asyncio.sleep(0)  # it takes its place (or starts waiting for one)
    return call


async def until(done: Callable[[], bool], seconds: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_the_heaviest_client_gives_way_its_newest_call() -> None:
    async def scenario() -> None:
        room = MessageRoom(4 * SIZE, stale_after=60)
        flood = [await start(room, "a") for _ in range(4)]
        newcomer = await start(room, "b")
        await settle()
        assert [c.outcome for c in flood] == ["waiting"] * 3 + ["gave way"]
        assert newcomer.place is not None
        assert room.held == 4 * SIZE
        # 3 against 1: it gives way again; 2 against 2: no more (places do not merely swap)
        second = await start(room, "b")
        await settle()
        assert [c.outcome for c in flood] == ["waiting"] * 2 + ["gave way"] * 2
        third = await start(room, "b", seconds=0.05)
        assert third.task is not None
        await third.task
        assert third.outcome == "refused"
        assert second.place is not None
        for c in (*flood, newcomer, second):
            if not c.message.done():  # those that gave way had theirs cancelled
                c.message.set_result(b"")
        await settle()
        assert room.held == 0
        assert len(room) == 0

    asyncio.run(scenario())


def test_a_call_waiting_too_long_gives_way_oldest_first() -> None:
    async def scenario() -> None:
        room = MessageRoom(2 * SIZE, stale_after=0.2)
        first = await start(room, "a")
        second = await start(room, "b")
        early = await start(room, "c", seconds=0.05)  # neither has waited long enough yet
        assert early.task is not None
        await early.task
        assert early.outcome == "refused"
        started = asyncio.get_running_loop().time()
        late = await start(room, "c", seconds=5)  # waits until the first has waited 0.2 s
        assert late.task is not None
        await until(lambda: late.place is not None)
        assert asyncio.get_running_loop().time() - started >= 0.1
        await settle()
        assert (first.outcome, second.outcome) == ("gave way", "waiting")
        for c in (second, late):
            c.message.set_result(b"")
        await settle()
        assert room.held == 0

    asyncio.run(scenario())


def test_a_call_whose_message_arrived_is_never_displaced() -> None:
    async def scenario() -> None:
        room = MessageRoom(2 * SIZE, stale_after=60)
        flood = [await start(room, "a") for _ in range(2)]
        # the newest one's message has arrived, its task not yet resumed: the other one gives way instead
        flood[1].message.set_result(b"")
        place = await room.enter("b", SIZE, 0)  # taken at once, before that task resumes
        assert place is not None
        await settle()
        assert [c.outcome for c in flood] == ["gave way", "arrived"]
        room.leave(place)
        assert room.held == 0

    asyncio.run(scenario())


def test_a_call_ended_while_waiting_frees_its_place() -> None:
    async def scenario() -> None:
        room = MessageRoom(SIZE, stale_after=60)
        first = await start(room, "a")
        waiting = await start(room, "a", seconds=5)  # the same client: nobody gives way to it
        assert first.task is not None
        first.task.cancel()  # the client reset the call
        await until(lambda: waiting.place is not None)
        assert first.outcome == "cancelled"
        assert room.held == SIZE
        waiting.message.set_result(b"")
        await settle()
        assert room.held == 0

    asyncio.run(scenario())


def test_an_arrived_message_counted_at_its_size_lets_a_waiting_call_in() -> None:
    """A compressed message that has arrived is counted at its compressed bytes while it is inflated: the
    rest of its place goes to a call waiting for one (``MessageReception._inflated``)."""

    async def scenario() -> None:
        room = MessageRoom(SIZE, stale_after=60)
        arrived = await start(room, "a")
        waiting = await start(room, "a", seconds=5)  # the same client: nobody gives way to it
        await settle()
        assert waiting.place is None
        assert arrived.place is not None
        arrived.place.arrived = True
        room.shrink(arrived.place, SIZE // 2)  # still larger than the room has left: nothing yet
        await settle()
        assert waiting.place is None
        room.shrink(arrived.place, 0)
        await until(lambda: waiting.place is not None)
        assert room.held == SIZE
        room.shrink(arrived.place, SIZE)  # never grows back
        assert room.held == SIZE
        arrived.message.set_result(b"")
        waiting.message.set_result(b"")
        await settle()
        assert room.held == 0

    asyncio.run(scenario())
