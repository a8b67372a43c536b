"""Fair order between clients: the requests waiting for a model's instances, queued per client and served
round-robin.

A client is an opaque string the protocol front ends give each request (``Work.client``): the bearer
token's identity when tokens are configured, else the peer's address; "" for a peer nobody knows (a
Unix socket), which all such requests share. Core never looks inside it.

``FairQueue`` keeps each client's requests in arrival order and the clients in a rotation: the next
request is the oldest one of the client whose turn it is, and that client then goes to the end of the
rotation. A client that had nothing waiting joins at the end. So a client with one request waits for
at most one request of each other waiting client, however many the others have queued.

``FairTurns`` gives turns at a few workers (the codec threads, the JSON decoding processes) by the time
each client has used them, not by count: the waiting client that has used the least goes first.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items queued per client, taken round-robin across clients (each client's own in arrival order)."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}  # in rotation order: the first client's turn is next

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)

    def push(self, client: str, item: T) -> None:
        queue = self._queues.get(client)
        if queue is None:
            self._queues[client] = queue = deque()
        queue.append(item)

    def peek(self) -> T:
        """The next item in fair order, left where it is."""
        return next(iter(self._queues.values()))[0]

    def pop(self) -> T:
        """The next item in fair order; its client goes to the end of the rotation."""
        client = next(iter(self._queues))
        queue = self._queues.pop(client)
        item = queue.popleft()
        if queue:
            self._queues[client] = queue
        return item

    def remove(self, client: str, item: T) -> bool:
        """Take ``item`` out wherever it is (compared by identity); False when it is not queued."""
        queue = self._queues.get(client)
        if queue is None:
            return False
        for i, queued in enumerate(queue):
            if queued is item:
                del queue[i]
                if not queue:
                    del self._queues[client]
                return True
        return False

    def count(self, client: str) -> int:
        queue = self._queues.get(client)
        return len(queue) if queue is not None else 0

    def heaviest(self) -> str | None:
        """The client with the most items queued (of those, the one whose turn is latest); None when empty."""
        best: str | None = None
        most = 0
        for client, queue in self._queues.items():
            if len(queue) >= most:
                best, most = client, len(queue)
        return best

    def pop_newest(self, client: str) -> T:
        """The item ``client`` queued last, taken out (to refuse it in favour of a client with fewer)."""
        queue = self._queues[client]
        item = queue.pop()
        if not queue:
            del self._queues[client]
        return item

    def __iter__(self) -> Iterator[T]:
        """Every item in fair order (round by round: each client's first in rotation order, then each
        one's second, ...), without taking any."""
        return interleave(list(self._queues.values()))


def interleave(queues: list[deque[T]] | list[list[T]]) -> Iterator[T]:
    """The items of ``queues`` round by round: every queue's first, then every queue's second, ..."""
    depth = 0
    while True:
        any_left = False
        for queue in queues:
            if depth < len(queue):
                any_left = True
                yield queue[depth]
        if not any_left:
            return
        depth += 1


def should_displace(queue: FairQueue[T], client: str) -> str | None:
    """When a full queue must refuse one request: the client whose newest request gives way to one of
    ``client``'s, or None to refuse ``client``'s own. The client holding the most places gives way when it
    holds at least two more than ``client`` does (so that a newcomer is not refused because of a flood,
    and places do not merely swap between two clients)."""
    heaviest = queue.heaviest()
    if heaviest is None or heaviest == client:
        return None
    if gives_way(queue.count(heaviest), queue.count(client)):
        return heaviest
    return None


def gives_way(heaviest: int, client: int) -> bool:
    """Whether a client holding ``heaviest`` places gives one way to a client holding ``client``: when it
    holds at least two more, so that places do not merely swap between two clients."""
    return heaviest >= client + 2


@dataclass(eq=False)
class _Usage:
    """One client's use of a :class:`FairTurns`' workers."""

    client: str
    finish: float = 0.0
    """The virtual time its turns given so far reach (each counted at its estimate until it ends)."""
    estimate: float = 0.0
    """What its next turn is expected to take: its last turn's time."""
    running: int = 0
    waiting: deque[tuple[int, asyncio.Future[Turn]]] = field(default_factory=deque)


@dataclass(frozen=True, eq=False)
class Turn:
    """A turn given (:meth:`FairTurns.take`); hand it back to :meth:`FairTurns.end` when the work is done."""

    usage: _Usage
    began: float
    estimate: float


class FairTurns:
    """Turns at ``slots`` workers shared by clients: when one is free, the waiting work of the client that
    has used the workers least goes (ties: first come, first served).

    Start-time fair queueing on measured time: a client's turn starts at the virtual time ``max(now, its
    finish)``, ``now`` being the start of the latest turn given, and its finish moves on by what the turn
    took (its last turn's time while it runs, corrected when it ends). So a client that has used little (a
    newcomer, one of small works) goes ahead of those whose heavy works took the workers, instead of
    waiting a round of them: a round-robin by count made a client with one small work wait for one heavy
    work of each other client. Clients idle long enough to be caught up by ``now`` are forgotten. Every
    method runs on one event loop; :meth:`end` may be called from another thread through
    ``loop.call_soon_threadsafe``."""

    SWEEP_EVERY = 1024
    """Turns given between two sweeps of the idle clients caught up by the virtual time."""

    def __init__(self, slots: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.slots = slots
        self.busy = 0
        self._clients: dict[str, _Usage] = {}
        self._queued = 0
        self._now = 0.0
        self._order = itertools.count()
        self._clock = clock
        self._given = 0

    def waiting(self) -> int:
        """Works waiting for a turn."""
        return self._queued

    def clients(self) -> int:
        """Clients remembered (running, waiting, or ahead of the virtual time)."""
        return len(self._clients)

    async def take(self, client: str = "") -> Turn:
        """A turn for ``client``'s work, once a worker is free and it is the client's turn."""
        usage = self._clients.get(client)
        if usage is None:
            usage = self._clients[client] = _Usage(client)
        if self.busy < self.slots and not self._queued:
            return self._give(usage)
        turn: asyncio.Future[Turn] = asyncio.get_running_loop().create_future()
        entry = (next(self._order), turn)
        usage.waiting.append(entry)
        self._queued += 1
        try:
            return await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.end(turn.result())  # given just as its work went away: nothing ran
            else:
                if entry in usage.waiting:  # else ``_wake`` has dropped it already
                    usage.waiting.remove(entry)
                    self._queued -= 1
                self._forget_if_idle(usage)
                self._wake()
            raise

    def end(self, turn: Turn) -> None:
        """The work of ``turn`` is done: its client is charged what it took, and its worker is free."""
        usage = turn.usage
        used = max(0.0, self._clock() - turn.began)
        usage.finish += used - turn.estimate
        usage.estimate = used
        usage.running -= 1
        self.busy -= 1
        self._forget_if_idle(usage)
        self._wake()

    def _give(self, usage: _Usage) -> Turn:
        start = max(self._now, usage.finish)
        self._now = start
        usage.finish = start + usage.estimate
        usage.running += 1
        self.busy += 1
        self._given += 1
        if self._given % self.SWEEP_EVERY == 0:
            for idle in [u for u in self._clients.values() if not u.running and not u.waiting]:
                self._forget_if_idle(idle)
        return Turn(usage, self._clock(), usage.estimate)

    def _forget_if_idle(self, usage: _Usage) -> None:
        if not usage.running and not usage.waiting and usage.finish <= self._now:
            self._clients.pop(usage.client, None)

    def _wake(self) -> None:
        """Give free workers to waiting works: the client of the smallest start first."""
        while self.busy < self.slots and self._queued:
            usage = min(
                (u for u in self._clients.values() if u.waiting),
                key=lambda u: (max(self._now, u.finish), u.waiting[0][0]),
            )
            _, turn = usage.waiting.popleft()
            self._queued -= 1
            if turn.done():  # its work went away (its own cleanup runs when its task resumes)
                continue
            turn.set_result(self._give(usage))
