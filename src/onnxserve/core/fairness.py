"""Fair order between clients: the requests waiting for a model's instances, queued per client and served
round-robin.

A client is an opaque string the protocol front ends give each request (``Work.client``): the bearer
token's identity when tokens are configured, else the peer's address; "" for a peer nobody knows (a
Unix socket), which all such requests share. Core never looks inside it.

``FairQueue`` keeps each client's requests in arrival order and the clients in a rotation: the next
request is the oldest one of the client whose turn it is, and that client then goes to the end of the
rotation. A client that had nothing waiting joins at the end. So a client with one request waits for
at most one request of each other waiting client, however many the others have queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
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
