"""At the gRPC connection cap, idle connections make room, and so do those that only wait for their client.

grpc-core refused every connection past its cap and closed an idle one only after
``--grpc-max-connection-idle`` (300 s), so a client holding the cap's worth of idle connections locked
every gRPC caller out (docs/limits.md, the old known gap). The port's front (server.grpc_front) follows
each connection's calls and, past ``--grpc-max-connections``, closes the connection idle longest of the
address holding the most (or of any address holding as many as the newcomer's). Connections are raw
HTTP/2 (raw_h2.py) from loopback addresses 127.0.0.x, each address a client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import CappedServer, serve_capped
from raw_h2 import INFER, SERVER_READY, STREAM_INFER, RawGrpcConnection

from waiting import wait_until

CAP = 12
OK = grpc.StatusCode.OK.value[0]


@pytest.fixture(scope="module")
def server(numeric_repository: Path) -> Iterator[CappedServer]:
    with serve_capped(
        numeric_repository,
        "--grpc-max-connections",
        str(CAP),
        # small messages: every call waiting for its message has a place in the room
        "--grpc-max-message-bytes",
        str(1024 * 1024),
        "--log-repeat-seconds",
        "0.5",
    ) as capped:
        yield capped


@pytest.fixture
def opened() -> Iterator[list[RawGrpcConnection]]:
    connections: list[RawGrpcConnection] = []
    yield connections
    for connection in connections:
        connection.close()
    time.sleep(0.5)  # the server sees the closes before the next test counts its connections


def connect(server: CappedServer, opened: list[RawGrpcConnection], source: str) -> RawGrpcConnection:
    connection = RawGrpcConnection(server.host, server.grpc_port, source=source)
    opened.append(connection)
    connection.pump(0.05)  # the server's SETTINGS
    return connection


def ready_from(server: CappedServer, opened: list[RawGrpcConnection], source: str) -> int | None:
    """A ServerReady call on a new connection from ``source``: its grpc-status (None: no answer, closed)."""
    connection = connect(server, opened, source)
    call = connection.open_call(SERVER_READY)
    connection.send_whole(call, b"")
    deadline = time.monotonic() + 10
    while not connection.calls[call].ended and not connection.closed and time.monotonic() < deadline:
        connection.pump(0.05)
    return connection.calls[call].status


def closed_soon(connection: RawGrpcConnection, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not connection.closed and time.monotonic() < deadline:
        connection.pump(0.05)
    return connection.closed


def test_idle_connections_of_one_address_make_room_for_another(
    server: CappedServer, opened: list[RawGrpcConnection]
) -> None:
    """The cap's worth of idle connections from one address: another address's call is served, and the
    flooder's connection idle longest is the one closed."""
    flood = [connect(server, opened, "127.0.0.1") for _ in range(CAP)]
    assert ready_from(server, opened, "127.0.0.2") == OK
    assert closed_soon(flood[0])
    assert not any(connection.closed for connection in flood[1:])
    wait_until(lambda: "closed idle gRPC connection(s), or ones whose client" in server.log(), 5, "the log line")


def test_the_same_address_still_gets_in(server: CappedServer, opened: list[RawGrpcConnection]) -> None:
    """Behind a proxy every client is one address: a new connection from it still gets in, in the place of
    its oldest idle connection."""
    flood = [connect(server, opened, "127.0.0.3") for _ in range(CAP)]
    assert ready_from(server, opened, "127.0.0.3") == OK
    assert closed_soon(flood[0])


def test_connections_sending_their_requests_give_way_to_another_address_only(
    server: CappedServer, opened: list[RawGrpcConnection]
) -> None:
    """Every connection with a ModelInfer call waiting for its message: a newcomer from the same address is
    closed, unserved, and every open call stays open; one from another address is served in the place of
    one of them, as on the HTTP port, where a connection still sending its request gives way to a lighter
    address (before, such holders kept every newcomer out: a call that never sends its message waits 1 s
    for a place in a full room, and its client opens the next at once); once a call ends, its connection is
    idle and makes room for its own address too."""
    busy = [connect(server, opened, "127.0.0.4") for _ in range(CAP)]
    calls = [connection.open_call(INFER) for connection in busy]
    for connection in busy:
        connection.pump(0.05)
    assert ready_from(server, opened, "127.0.0.4") is None
    assert opened[-1].closed
    wait_until(lambda: "each with a call open" in server.log(), 5, "the log line")
    assert not any(connection.closed for connection in busy)
    assert not any(connection.calls[call].ended for connection, call in zip(busy, calls, strict=True))

    def closed() -> list[int]:
        for connection in busy:
            connection.pump(0.02)
        return [k for k, connection in enumerate(busy) if connection.closed]

    assert ready_from(server, opened, "127.0.0.5") == OK
    wait_until(lambda: len(closed()) == 1, 5, "a sending connection closed")
    left = next(k for k in range(CAP) if k not in closed())
    busy[left].h2.reset_stream(calls[left])
    busy[left].flush()
    time.sleep(0.3)  # the front sees the reset
    assert ready_from(server, opened, "127.0.0.4") == OK
    wait_until(lambda: len(closed()) == 2, 5, "the idle connection closed")
    assert left in closed()


def stalled_calls(server: CappedServer, opened: list[RawGrpcConnection], source: str) -> list[RawGrpcConnection]:
    """The cap's worth of connections from ``source``, each with a ServerReady call sent whole and a
    flow-control window of 0 for its answer: grpc-core has sent the answer's headers and can send nothing
    more until the client reads (it never does)."""
    stalled = []
    for _ in range(CAP):
        connection = RawGrpcConnection(server.host, server.grpc_port, source=source, reads=False)
        opened.append(connection)
        connection.send_whole(connection.open_call(SERVER_READY), b"")
        stalled.append(connection)
    for connection in stalled:
        connection.pump(0.05)
    return stalled


def test_connections_whose_client_reads_nothing_make_room(
    server: CappedServer, opened: list[RawGrpcConnection]
) -> None:
    """The cap's worth of connections whose one call's answer waits for a window their client never opens
    (outside attack rt40: they kept every newcomer out until the client left, and a client reconnecting at
    once kept the cap through --grpc-max-connection-age): another address's call is served in the place of
    one of them, and so is the same address's next."""
    stalled = stalled_calls(server, opened, "127.0.0.6")
    assert not any(connection.closed for connection in stalled)

    def closed() -> int:
        for connection in stalled:
            connection.pump(0.02)
        return sum(connection.closed for connection in stalled)

    assert ready_from(server, opened, "127.0.0.7") == OK
    wait_until(lambda: closed() >= 1, 5, "a stalled connection closed")
    assert ready_from(server, opened, "127.0.0.6") == OK
    wait_until(lambda: closed() >= 2, 5, "another stalled connection closed")
    assert closed() == 2
    wait_until(lambda: "read nothing of its answers, to make room" in server.log(), 5, "the log line")


def test_streams_between_two_messages_give_way_to_another_address(
    server: CappedServer, opened: list[RawGrpcConnection]
) -> None:
    """The cap's worth of connections each with a ModelStreamInfer stream whose one request was answered,
    its client sending nothing more: the server can do nothing until the client sends, so another address's
    call is served in the place of one of them (before, a stream answered once counted as busy, and
    holders reopening streams kept every newcomer out)."""
    holders = []
    for _ in range(CAP):
        connection = connect(server, opened, "127.0.0.8")
        stream = connection.open_call(STREAM_INFER)
        connection.h2.send_data(stream, b"\x00\x00\x00\x00\x00")  # one empty request message, the stream open
        connection.flush()
        holders.append((connection, stream))

    def answered() -> bool:
        for connection, _ in holders:
            connection.pump(0.02)
        return all(connection.calls[stream].received for connection, stream in holders)

    wait_until(answered, 10, "every stream's first answer")
    assert not any(connection.calls[stream].ended for connection, stream in holders)
    assert ready_from(server, opened, "127.0.0.9") == OK

    def closed() -> int:
        for connection, _ in holders:
            connection.pump(0.02)
        return sum(connection.closed for connection, _ in holders)

    wait_until(lambda: closed() == 1, 5, "a waiting stream's connection closed")


def test_connections_waiting_for_their_client_both_ways_make_room(
    server: CappedServer, opened: list[RawGrpcConnection]
) -> None:
    """The cap's worth of connections each with a call whose answer waits for a window their client never
    opens and a ModelInfer call whose message never comes (outside attack rt42: such a mix counted as busy,
    and 0 of 54 honest connections got in): another address's call is served in the place of one of them."""
    holders = stalled_calls(server, opened, "127.0.0.10")
    for connection in holders:
        connection.open_call(INFER)
        connection.pump(0.02)
    assert ready_from(server, opened, "127.0.0.11") == OK

    def closed() -> int:
        for connection in holders:
            connection.pump(0.02)
        return sum(connection.closed for connection in holders)

    wait_until(lambda: closed() == 1, 5, "a holder closed")
