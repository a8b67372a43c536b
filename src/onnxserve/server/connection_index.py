"""Bookkeeping that finds the connection to close without looking over the open ones.

A burst of new connections past ``--max-connections`` asks, for each one, which open connection makes room
(``server.connections``). Looking over every open connection per accept kept the event loop busy for
seconds (3,000 silent connections: probes waited 1 to 15 s). These structures answer the same questions
in O(1) or O(log n) per accept, kept up to date as connections open, close and change state:

- :class:`Counts`: how many connections each client address holds, in buckets by count, so the address
  holding the most (and those holding at least some count) are found without a scan.
- :class:`LazyHeap`: the connection with the smallest key among those that pass a test (idle, still
  sending...). Entries are pushed whenever a connection may have entered the state, and checked when
  they reach the top: one that fails the test is dropped, one whose key has grown since (bytes sent) is
  pushed again with its key now. The heap is rebuilt when stale entries outnumber the live ones, so it
  stays within a constant factor of the connections it is about.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Opened(Protocol):
    opened_at: float


C = TypeVar("C", bound=Opened)

_sequence = itertools.count()
"""Ties between equal keys go to the entry pushed first; connections themselves are never compared."""


class LazyHeap(Generic[C]):
    """Connections by ``key`` (then by when they opened), among those that pass ``valid``.

    ``key`` of a connection may only grow while it stays valid; where it may shrink or the connection
    may have become valid again, the caller calls :meth:`push` (duplicates are harmless)."""

    def __init__(self, key: Callable[[C], float], valid: Callable[[C], bool]) -> None:
        self._key = key
        self._valid = valid
        self._heap: list[tuple[float, float, int, C]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, connection: C, live: int) -> None:
        """Add ``connection`` (``live``: how many connections this heap is about, for its rebuild)."""
        heapq.heappush(self._heap, (self._key(connection), connection.opened_at, next(_sequence), connection))
        self.trim(live)

    def trim(self, live: int) -> None:
        """Drop the entries of connections no longer valid, and duplicates, once they outnumber ``live``."""
        if len(self._heap) > 2 * live + 64:
            self._rebuild()

    def first(self) -> C | None:
        """The valid connection with the smallest key, left in the heap; None when none is valid."""
        heap = self._heap
        while heap:
            key, opened_at, _, connection = heap[0]
            if not self._valid(connection):
                heapq.heappop(heap)
                continue
            now = self._key(connection)
            if now != key:  # it has grown (or the entry is an older one): at its place now
                heapq.heapreplace(heap, (now, opened_at, next(_sequence), connection))
                continue
            return connection
        return None

    def _rebuild(self) -> None:
        seen: set[int] = set()
        kept = []
        for _, opened_at, _, connection in self._heap:
            if id(connection) not in seen and self._valid(connection):
                seen.add(id(connection))
                kept.append((self._key(connection), opened_at, next(_sequence), connection))
        heapq.heapify(kept)
        self._heap = kept


class Counts:
    """How many connections each address holds, with the addresses in buckets by that count."""

    def __init__(self) -> None:
        self.of: dict[str, int] = {}
        self._buckets: dict[int, dict[str, None]] = {}  # count -> addresses, in the order they reached it
        self.most = 0
        """The largest count any address holds (0 when none holds any)."""

    def add(self, address: str) -> None:
        count = self.of.get(address, 0)
        self._move(address, count, count + 1)
        self.most = max(self.most, count + 1)

    def remove(self, address: str) -> None:
        count = self.of[address]
        self._move(address, count, count - 1)
        while self.most and not self._buckets.get(self.most):
            self.most -= 1

    def heaviest(self) -> str:
        """An address holding the most (the first to have reached that count)."""
        return next(iter(self._buckets[self.most]))

    def holding_at_least(self, count: int) -> Iterator[str]:
        """The addresses holding ``count`` connections or more."""
        for held in range(self.most, max(count, 1) - 1, -1):
            yield from self._buckets.get(held, ())

    def _move(self, address: str, old: int, new: int) -> None:
        if old:
            bucket = self._buckets[old]
            del bucket[address]
            if not bucket:
                del self._buckets[old]
        if new:
            self._buckets.setdefault(new, {})[address] = None
            self.of[address] = new
        else:
            del self.of[address]
