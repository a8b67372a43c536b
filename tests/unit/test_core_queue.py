"""grpc-core's queue as the gRPC front counts it (server.core_queue): calls named as they are handed on,
taken by name, held past the bounds and let go on as calls are taken."""

from __future__ import annotations

import asyncio
import time

import hpack

from onnxserve.server.core_queue import (
    BEAT_SECONDS,
    CALL_FIELD,
    FEW,
    FORGET_SECONDS,
    IDLE_GAPS,
    IDLE_SECONDS,
    MIN_BOUND,
    ORDER_SLACK_SECONDS,
    PROBE_ROOM,
    QUEUE_SECONDS,
    CoreQueue,
    call_field,
    call_name,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bounded(bound: int) -> CoreQueue:
    """A queue whose bound for calls other than probes is ``bound`` (its limit less the probes' room)."""
    return CoreQueue(bound + PROBE_ROOM if bound >= PROBE_ROOM else 2 * bound, clock=Clock())


class Waiting:
    """A connection whose next calls wait for room: each ``room()`` hands ``calls`` on if admitted."""

    def __init__(self, queue: CoreQueue, host: str, calls: int = 1) -> None:
        self.queue = queue
        self.host = host
        self.calls = calls
        self.went: list[int] = []

    def room(self) -> None:
        while self.calls:
            if not self.queue.admits(self.host, self):
                self.queue.wait(self)
                return
            self.went.append(self.queue.handed_on(self.host))
            self.calls -= 1


def test_the_field_decodes_to_the_name_and_leaves_the_table_as_it_was() -> None:
    decoder = hpack.Decoder()
    assert decoder.decode(call_field(12345), raw=True) == [(CALL_FIELD, b"12345")]
    assert len(decoder.header_table.dynamic_entries) == 0


def test_the_last_name_in_the_metadata_counts() -> None:
    field = CALL_FIELD.decode()
    assert call_name([("a", "1"), (field, "7"), (field, "9")]) == 9
    assert call_name([("a", "1")]) is None
    assert call_name(None) is None
    assert call_name([(field, "x1")]) is None
    assert call_name([(field, "9" * 30)]) is None


def test_calls_are_counted_until_taken_or_never_queued() -> None:
    queue = CoreQueue(10, clock=Clock())
    names = [queue.handed_on("a") for _ in range(3)]
    assert len(queue) == 3
    assert queue.by_address == {"a": 3}
    queue.taken(names[1])
    queue.never_queued(names[0])
    queue.taken(names[1])  # taken twice, or a name no longer counted: nothing
    uncounted = queue.handed_on("b", counted=False)
    queue.taken(uncounted)
    assert len(queue) == 1
    assert queue.by_address == {"a": 1}
    assert queue.queued(names[2])
    assert not queue.queued(names[0])


def test_a_call_taken_without_its_name_is_taken_for_the_oldest_counted() -> None:
    """grpc-core drops the front's field in some header blocks it partly refuses, and still queues the call:
    such a call, taken, takes the oldest counted call off the count (the queue is first in, first out)."""
    queue = CoreQueue(10, clock=Clock())
    first = queue.handed_on("a")
    second = queue.handed_on("b")
    queue.taken(None)
    assert not queue.queued(first)
    assert queue.queued(second)
    assert queue.by_address == {"b": 1}
    queue.taken(None)
    queue.taken(None)  # nothing counted: nothing to take
    assert len(queue) == 0


def test_past_half_the_bound_only_light_addresses_pass_and_past_it_none() -> None:
    queue = bounded(20)
    for _ in range(10):
        queue.handed_on("heavy")
    assert not queue.admits("heavy")
    assert queue.admits("light")
    for _ in range(FEW):
        queue.handed_on("light")
    assert not queue.admits("light")
    for index in range(20 - 10 - FEW):
        queue.handed_on(f"other-{index}")
    assert len(queue) == queue.bound == 20
    assert not queue.admits("new")


def test_a_limit_of_zero_admits_everything_and_counts_nothing() -> None:
    queue = CoreQueue(0)
    for _ in range(5000):
        assert queue.admits("a")
        queue.handed_on("a")
    assert len(queue) == 0


def test_calls_never_taken_are_forgotten() -> None:
    clock = Clock()
    queue = CoreQueue(8, clock=clock)
    names = [queue.handed_on("a") for _ in range(5)]
    other = queue.handed_on("b", counted=False)
    queue.taken(names[0])  # grpc.aio takes calls: the others wait their turn
    clock.now += FORGET_SECONDS / 2
    queue.taken(other)
    assert not queue.admits("a")
    assert len(queue) == 4
    clock.now += FORGET_SECONDS / 2
    queue.taken(other)
    assert queue.admits("a")
    assert len(queue) == 0


def test_when_nothing_was_taken_for_a_while_the_older_calls_are_not_counted() -> None:
    """grpc.aio takes a call as soon as grpc-core has one: calls handed on before a pause with none taken
    were not queued (refused by grpc-core in a way the front did not see)."""
    clock = Clock()
    queue = CoreQueue(10, clock=clock)
    for _ in range(5):
        queue.handed_on("a")
    clock.now += IDLE_SECONDS / 2
    recent = queue.handed_on("a")
    clock.now += IDLE_SECONDS * 0.6  # the first five are past IDLE_SECONDS, with nothing taken since
    assert queue.admits("a")
    assert len(queue) == 1
    assert queue.queued(recent)


def test_waiting_calls_go_on_as_calls_are_taken_light_addresses_first() -> None:
    async def scenario() -> None:
        queue = bounded(8)
        names = [queue.handed_on("heavy") for _ in range(8)]
        heavy = Waiting(queue, "heavy", calls=3)
        light = Waiting(queue, "light")
        heavy.room()
        light.room()
        assert queue.waiting == 2
        assert not heavy.went
        assert not light.went
        queue.taken(names[0])  # 7 counted: between the bounds, the light address goes first
        await asyncio.sleep(0)
        assert len(light.went) == 1
        assert not heavy.went
        for name in names[1:5]:  # 4 counted, 3 of them heavy's: it is light again, and its turn comes
            queue.taken(name)
        await asyncio.sleep(0)
        assert len(heavy.went) == 3  # FEW a turn: all three
        assert queue.waiting == 0
        assert len(queue) == 7

    asyncio.run(scenario())


def test_a_waiter_that_left_is_not_woken() -> None:
    async def scenario() -> None:
        queue = CoreQueue(2, clock=Clock())
        names = [queue.handed_on("a") for _ in range(2)]
        gone = Waiting(queue, "b")
        gone.room()
        assert queue.waiting == 1
        queue.discard(gone)
        queue.taken(names[0])
        await asyncio.sleep(0)
        assert not gone.went

    asyncio.run(scenario())


def full_with_one_waiting() -> tuple[CoreQueue, Waiting]:
    """A queue of 2 calls counted at its limit of 2 (on the clock), a call of another address waiting."""
    queue = CoreQueue(2)
    queue.handed_on("a")
    queue.handed_on("a")
    waiting = Waiting(queue, "b")
    waiting.room()
    return queue, waiting


def test_waiting_calls_go_on_when_old_calls_are_forgotten_on_time() -> None:
    """Nothing taken, nothing handed on: the timer forgets the calls never taken and lets the waiting go on."""

    async def scenario() -> None:
        queue, waiting = full_with_one_waiting()
        assert queue.waiting == 1
        await asyncio.sleep(IDLE_SECONDS * 1.6)
        assert waiting.went
        assert queue.waiting == 0

    asyncio.run(scenario())


def test_calls_handed_on_well_before_one_taken_are_no_longer_counted() -> None:
    """grpc-core's queue is first in, first out: once a call is taken, those handed on more than
    ``ORDER_SLACK_SECONDS`` before it and still counted never reached the queue; those handed on within the
    slack still count."""
    clock = Clock()
    queue = CoreQueue(100, clock=clock)
    never = [queue.handed_on("a") for _ in range(3)]
    clock.now += ORDER_SLACK_SECONDS * 0.8
    close = queue.handed_on("b")
    clock.now += ORDER_SLACK_SECONDS * 0.4
    taken = queue.handed_on("c")
    queue.taken(taken)
    assert not any(queue.queued(name) for name in never)
    assert queue.queued(close)
    assert len(queue) == 1
    assert queue.by_address == {"b": 1}


def test_a_connection_holding_many_calls_gets_a_few_a_turn_while_others_wait() -> None:
    """Calls wait: a new call of a busy address waits its turn behind them, and the connection whose turn
    it is hands on ``FEW`` calls, then waits again behind the others (a connection with a backlog of held
    calls took hundreds of places at once)."""

    async def scenario() -> None:
        queue = bounded(20)
        early = [queue.handed_on("x") for _ in range(2)]
        names = {host: [queue.handed_on(host) for _ in range(FEW)] for host in ("a", "b")}
        a, b = Waiting(queue, "a", calls=10), Waiting(queue, "b", calls=10)
        a.room()
        b.room()
        assert queue.waiting == 2
        assert not a.went
        assert not b.went
        for name in early:
            queue.taken(name)
        await asyncio.sleep(0)
        assert len(a.went) == FEW
        assert not b.went
        assert not queue.admits("a")  # a new call of an address past FEW waits its turn behind them
        for name in names["a"] + a.went:
            queue.taken(name)
        await asyncio.sleep(0)
        assert len(b.went) == FEW  # b's turn came first, then a's again
        assert len(a.went) > FEW
        assert min(a.went[FEW:]) > max(b.went)

    asyncio.run(scenario())


def test_the_idle_wait_grows_with_the_longest_wait_between_takes() -> None:
    """Under load grpc.aio may take nothing for a while with calls queued (outside attack rt52: 0.27 s, with
    800 queued, which a fixed 0.2 s took for an empty queue): the wait that means an empty queue is at least
    ``IDLE_GAPS`` times the longest wait seen lately between two takes with calls counted."""
    clock = Clock()
    queue = CoreQueue(100, clock=clock)
    names = [queue.handed_on("a") for _ in range(3)]
    clock.now += 0.6  # a slow take, calls counted all along
    queue.taken(names[0])
    clock.now += IDLE_SECONDS * 1.5  # past IDLE_SECONDS, within IDLE_GAPS x 0.6
    assert IDLE_GAPS * 0.6 > IDLE_SECONDS * 1.5
    queue.admits("b")
    assert len(queue) == 2
    clock.now += IDLE_GAPS * 0.6
    queue.admits("b")
    assert len(queue) == 0


def test_the_ages_of_calls_leave_out_the_event_loops_stalls() -> None:
    """Nothing can be taken while the event loop stands still (a decode holding the interpreter lock): the
    calls counted are not taken off the count for a stall, only for the loop's running time without takes
    (outside attack rt53: a 7 s stall took every queued call off the count)."""

    async def scenario() -> None:
        queue, waiting = full_with_one_waiting()
        await asyncio.sleep(0.05)
        time.sleep(IDLE_SECONDS * 1.5)  # the loop stands still
        await asyncio.sleep(BEAT_SECONDS * 3)
        assert len(queue) == 2
        assert not waiting.went
        await asyncio.sleep(IDLE_SECONDS * 1.2)  # the loop runs, nothing taken: the queue is idle
        assert waiting.went

    asyncio.run(scenario())


def paced(queue: CoreQueue, clock: Clock, seconds: float, takes: int = 400) -> None:
    """grpc.aio takes ``takes`` calls, one every ``seconds``, with a call counted all along."""
    names = [queue.handed_on("paced")]
    for _ in range(takes):
        names.append(queue.handed_on("paced"))
        clock.now += seconds
        queue.taken(names.pop(0))
    clock.now += seconds
    queue.taken(names.pop())


def test_the_pace_is_seen_only_with_calls_counted_between_takes() -> None:
    """A call that came to an empty queue, taken, says how long it took to come, not how fast grpc.aio takes
    calls: it leaves the bound as it was."""
    clock = Clock()
    queue = CoreQueue(800, clock=clock)
    for _ in range(400):
        name = queue.handed_on("a")
        clock.now += QUEUE_SECONDS
        queue.taken(name)
    assert queue.bound == 800 - PROBE_ROOM


def test_the_bound_is_what_grpc_aio_takes_in_a_short_while_at_its_pace() -> None:
    """A call waits in grpc-core's queue behind every call there: the bound on them is what grpc.aio takes in
    ``QUEUE_SECONDS`` at its recent pace, between ``MIN_BOUND`` and the limit (outside attacks rt51, rt52: with
    800 queued and grpc.aio slowed by a flood, a health probe waited seconds there)."""
    clock = Clock()
    queue = CoreQueue(800, clock=clock)
    assert queue.bound == 800 - PROBE_ROOM
    paced(queue, clock, QUEUE_SECONDS / 100)
    assert 90 <= queue.bound <= 110
    for _ in range(queue.bound):
        queue.handed_on("x")
    assert not queue.admits("light")  # past the bound, even an address with no call counted waits
    paced(queue, clock, QUEUE_SECONDS / 4)
    assert queue.bound == MIN_BOUND
    paced(queue, clock, QUEUE_SECONDS / 10_000)
    assert queue.bound == 800 - PROBE_ROOM


def test_health_probes_pass_the_bound_within_their_room_and_the_limit() -> None:
    """Past the bound, a health call (ServerLive, ServerReady) still goes on, ``PROBE_ROOM`` of them counted at
    most; past the limit, none."""
    clock = Clock()
    queue = CoreQueue(200, clock=clock)
    paced(queue, clock, QUEUE_SECONDS / 10)
    assert queue.bound == MIN_BOUND
    for _ in range(MIN_BOUND):
        queue.handed_on("x")
    assert not queue.admits("p")
    assert queue.admits("p", probe=True)
    probes = [queue.handed_on(f"p{k}", probe=True) for k in range(PROBE_ROOM)]
    assert not queue.admits("p", probe=True)
    queue.taken(probes[0])
    assert queue.admits("p", probe=True)
    while len(queue) < 200:
        queue.handed_on("x")
    assert not queue.admits("p", probe=True)
