"""The bookkeeping that picks the connection to close without a scan (server.connection_index)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxserve.server.connection_index import Counts, LazyHeap


@dataclass(eq=False)
class Conn:
    opened_at: float
    sent: int = 0
    idle: bool = True


def sent(c: Conn) -> float:
    return c.sent


def oldest(c: Conn) -> float:
    return 0.0


def test_counts_find_the_heaviest_address_as_connections_come_and_go() -> None:
    counts = Counts()
    for address in ["a", "b", "b", "c", "b", "a"]:
        counts.add(address)
    assert counts.of == {"a": 2, "b": 3, "c": 1}
    assert (counts.heaviest(), counts.most) == ("b", 3)
    assert sorted(counts.holding_at_least(2)) == ["a", "b"]
    assert sorted(counts.holding_at_least(0)) == ["a", "b", "c"]
    counts.remove("b")
    counts.remove("b")
    assert counts.most == 2
    assert counts.heaviest() == "a"  # the first to have held 2
    for address in ["a", "a", "b", "c"]:
        counts.remove(address)
    assert (counts.of, counts.most) == ({}, 0)
    assert list(counts.holding_at_least(1)) == []


def test_the_oldest_valid_connection_comes_first() -> None:
    heap = LazyHeap[Conn](oldest, lambda c: c.idle)
    conns = [Conn(opened_at=float(t)) for t in (3, 1, 2)]
    for c in conns:
        heap.push(c, len(conns))
    assert heap.first() is conns[1]
    conns[1].idle = False  # busy now: left out, and its entry dropped
    assert heap.first() is conns[2]
    assert len(heap) == 2
    conns[1].idle = True
    heap.push(conns[1], len(conns))  # idle again: pushed again where it changed state
    assert heap.first() is conns[1]
    assert heap.first() is conns[1]  # first leaves it in the heap


def test_keys_that_grow_are_put_back_at_their_place() -> None:
    heap = LazyHeap[Conn](sent, lambda c: c.idle)
    a, b, c = Conn(1.0), Conn(2.0), Conn(3.0)
    for conn in (a, b, c):
        heap.push(conn, 3)
    assert heap.first() is a  # all 0 bytes: the oldest
    a.sent = 500
    b.sent = 100
    assert heap.first() is c
    c.sent = 1000
    assert heap.first() is b
    b.sent = 0  # a new request: its count starts again, and it is pushed where that happens
    heap.push(b, 3)
    assert heap.first() is b


def test_stale_entries_are_dropped_before_they_outnumber_the_live_ones() -> None:
    heap = LazyHeap[Conn](oldest, lambda c: c.idle)
    live = Conn(0.0)
    for i in range(10_000):
        gone = Conn(float(i + 1))
        heap.push(gone, 1)
        gone.idle = False
        heap.push(live, 1)  # the same connection again and again: duplicates
    assert len(heap) <= 2 * 1 + 64 + 1
    assert heap.first() is live
