"""gRPC calls waiting for their messages share the room for arriving messages fairly (server.message_room).

Each call waiting for its request message holds a place of ``--grpc-max-message-bytes`` in a room of
``--max-inflight-bytes``: here 4 places. Calls that never send (written frame by frame with ``h2``,
raw_h2.py), from one loopback address or several (the client socket bound to 127.0.0.x; no tokens, so
each address is a client), must not keep other clients' calls out: the heaviest client's newest waiting
call gives way at once, and a call waiting longer than ``--grpc-message-wait`` gives way to anyone. The
server under a memory cap keeps answering probes and ordinary calls, and no place leaks.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import CappedServer, message_room, serve_capped
from raw_h2 import INFER, STREAM_INFER, RawGrpcConnection
from test_grpc_streams import check_still_serving, wait_ended
from tritonclient.grpc import service_pb2 as pb

MAX_MESSAGE = 1024 * 1024
PLACES = 4
MESSAGE_WAIT = 2.0
BODY_TIMEOUT = 60.0

OK = grpc.StatusCode.OK.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
GAVE_WAY = "needed the room for other clients' messages; retry"
ROOM_FULL = "is receiving its limit"

REQUEST = pb.ModelInferRequest(
    model_name="add",
    inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1, 16]) for n in "ab"],
    raw_input_contents=[np.ones(16, np.float32).tobytes()] * 2,
).SerializeToString()


@pytest.fixture(scope="module")
def server(numeric_repository: Path) -> Iterator[CappedServer]:
    with serve_capped(
        numeric_repository,
        *message_room(MAX_MESSAGE, PLACES * MAX_MESSAGE),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--grpc-message-wait",
        str(MESSAGE_WAIT),
    ) as capped:
        yield capped


@pytest.fixture
def connections(server: CappedServer) -> Iterator[list[RawGrpcConnection]]:
    """The test's connections; once they are closed, every place of the room must be free again."""
    opened: list[RawGrpcConnection] = []
    yield opened
    for c in opened:
        c.close()
    wait_until_free(server)


def wait_until_free(server: CappedServer, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not room_is_free(server, "127.0.0.250"):  # the server may take a moment to see the closes
        assert time.monotonic() < deadline, "places of ended calls are still held"


def connect(server: CappedServer, connections: list[RawGrpcConnection], source: str) -> RawGrpcConnection:
    c = RawGrpcConnection(server.host, server.grpc_port, source=source)
    connections.append(c)
    return c


def infer_from(server: CappedServer, connections: list[RawGrpcConnection], source: str) -> tuple[int | None, str]:
    """One whole ModelInfer call from ``source``: its grpc-status and message once it ended."""
    c = connect(server, connections, source)
    call = c.open_call(INFER)
    c.send_whole(call, REQUEST)
    wait_ended([c], 20)
    return c.calls[call].status, c.calls[call].message


def pump_until(connections: list[RawGrpcConnection], done: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        for c in connections:
            c.pump(0.05)


def idle_calls(
    server: CappedServer, connections: list[RawGrpcConnection], source: str, count: int, method: str = INFER
) -> tuple[RawGrpcConnection, list[int]]:
    """``count`` calls from ``source`` that never send their message."""
    c = connect(server, connections, source)
    return c, [c.open_call(method) for _ in range(count)]


def room_is_free(server: CappedServer, source: str) -> bool:
    """Whether every place is free: ``PLACES`` idle calls from one address all take one, and one more
    finds none (the same client: nobody gives way to it) and is refused after its short wait while they
    keep theirs."""
    opened: list[RawGrpcConnection] = []
    try:
        c, calls = idle_calls(server, opened, source, PLACES)
        extra = c.open_call(INFER)
        pump_until([c], lambda: c.calls[extra].ended)
        assert c.calls[extra].status == RESOURCE_EXHAUSTED, c.calls[extra]
        assert ROOM_FULL in c.calls[extra].message
        return not any(c.calls[call].ended for call in calls)
    finally:
        for one in opened:
            one.close()


def test_one_address_cannot_hold_the_room(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    """Twice the room of calls that never send, from one address: the room takes 4, the others are refused;
    another address's call is then served at once, displacing the flooder's newest waiting call
    (RESOURCE_EXHAUSTED, a clear message); the flooder's other calls keep their places."""
    rss_before = server.rss_bytes()
    flooder, calls = idle_calls(server, connections, "127.0.0.1", 2 * PLACES)
    pump_until([flooder], lambda: sum(flooder.calls[call].ended for call in calls) >= PLACES)
    refused = [flooder.calls[call] for call in calls[PLACES:]]
    assert all(o.status == RESOURCE_EXHAUSTED and ROOM_FULL in o.message for o in refused), refused
    placed = calls[:PLACES]
    assert not any(flooder.calls[call].ended for call in placed)

    status, message = infer_from(server, connections, "127.0.0.2")
    assert status == OK, message
    pump_until([flooder], lambda: flooder.calls[placed[-1]].ended, 10)
    newest = flooder.calls[placed[-1]]
    assert newest.status == RESOURCE_EXHAUSTED, newest
    assert GAVE_WAY in newest.message
    assert not any(flooder.calls[call].ended for call in placed[:-1])
    assert "gave way to other calls' messages" in server.log()
    # the flooder's connection keeps serving: a call that sends its message takes the free place
    call = flooder.open_call(INFER)
    flooder.send_whole(call, REQUEST)
    pump_until([flooder], lambda: flooder.calls[call].ended)
    assert flooder.calls[call].status == OK, flooder.calls[call]
    check_still_serving(server, rss_before)


def test_idle_calls_of_several_addresses_give_way_after_the_wait(
    server: CappedServer, connections: list[RawGrpcConnection]
) -> None:
    """One idle call from each of 4 addresses: nobody holds two more than another, so a newcomer waits
    until the oldest has waited ``--grpc-message-wait``, then takes its place."""
    opened = time.monotonic()
    idle = [idle_calls(server, connections, f"127.0.0.{i}", 1) for i in range(1, PLACES + 1)]

    def displaced() -> list[int]:
        return [i for i, (c, (call,)) in enumerate(idle) if c.calls[call].ended]

    statuses: Counter[int | None] = Counter()
    deadline = time.monotonic() + 20
    while not displaced() and time.monotonic() < deadline:
        status, message = infer_from(server, connections, "127.0.0.9")
        assert status in (OK, RESOURCE_EXHAUSTED), message
        statuses[status] += 1
        pump_until([c for c, _ in idle], lambda: bool(displaced()), 0.2)
    assert len(displaced()) == 1, displaced()
    c, (call,) = idle[displaced()[0]]
    assert c.calls[call].status == RESOURCE_EXHAUSTED
    assert GAVE_WAY in c.calls[call].message
    assert time.monotonic() - opened >= MESSAGE_WAIT  # never displaced before it waited that long
    assert statuses[OK] >= 1
    status, message = infer_from(server, connections, "127.0.0.9")  # and the next newcomer is served too
    assert status == OK, message


def test_a_stream_between_messages_gives_way_only_under_contention(
    server: CappedServer, connections: list[RawGrpcConnection]
) -> None:
    """An ordinary ModelStreamInfer client idle between two messages longer than ``--grpc-message-wait``
    keeps its stream while the room has space; when the room is full and a newcomer waits, it is the one
    waiting longest and gives way."""
    c = connect(server, connections, "127.0.0.2")
    stream = c.open_call(STREAM_INFER)
    for answers in (1, 2):
        c.send_part(stream, len(REQUEST), 0)
        c.h2.send_data(stream, REQUEST)
        c.flush()
        least = answers * (5 + 16 * 4)  # each answer: a 5-byte gRPC prefix and 16 floats at least
        pump_until([c], lambda least=least: c.calls[stream].received >= least or c.calls[stream].ended)
        assert not c.calls[stream].ended, c.calls[stream]
        assert c.calls[stream].received >= least
        c.pump(MESSAGE_WAIT + 0.5)  # idle past the wait, without contention: it keeps its place
        assert not c.calls[stream].ended, c.calls[stream]
    others = [idle_calls(server, connections, f"127.0.0.{i}", 1) for i in range(3, 3 + PLACES - 1)]
    deadline = time.monotonic() + 20
    while not c.calls[stream].ended and time.monotonic() < deadline:
        # (a first newcomer may reach the server before the others' calls and take the last free place)
        status, message = infer_from(server, connections, "127.0.0.9")
        assert status == OK, message
        pump_until([c], lambda: c.calls[stream].ended, 0.5)
    assert c.calls[stream].status == RESOURCE_EXHAUSTED, c.calls[stream]
    assert GAVE_WAY in c.calls[stream].message
    assert not any(o.calls[call].ended for o, (call,) in others)


def test_no_place_leaks(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    """Calls that take places and leave every way (displaced, refused, served, reset by the client, their
    connection closed, a stream that ends): afterwards the whole room is free and the server serves."""
    rss_before = server.rss_bytes()
    flooder, calls = idle_calls(server, connections, "127.0.0.1", 2 * PLACES)
    streams, open_streams = idle_calls(server, connections, "127.0.0.3", 2, STREAM_INFER)
    for round_ in range(3):
        status, _ = infer_from(server, connections, f"127.0.0.{10 + round_}")
        assert status in (OK, RESOURCE_EXHAUSTED)
    for call in calls[:3]:
        flooder.h2.reset_stream(call)
    flooder.flush()
    streams.send_part(open_streams[0], len(REQUEST), 0)
    streams.h2.send_data(open_streams[0], REQUEST, end_stream=True)
    streams.flush()
    pump_until([streams], lambda: streams.calls[open_streams[0]].ended)
    assert streams.calls[open_streams[0]].status == OK
    for c in connections:
        c.close()
    wait_until_free(server)
    check_still_serving(server, rss_before)


def test_with_tokens_each_token_is_a_client(numeric_repository: Path, tmp_path: Path) -> None:
    """With bearer tokens, the client is the token, not the address: a flood of idle calls with one token
    gives way to a call with another token from the same address (and not to the flood's own token)."""
    tokens = tmp_path / "tokens.txt"
    flood_token, other_token = "room-flood-token-0123456789abcdef", "room-other-token-0123456789abcdef"
    tokens.write_text(f"{flood_token} infer\n{other_token} infer\n")
    tokens.chmod(0o600)
    settings = message_room(MAX_MESSAGE, PLACES * MAX_MESSAGE)
    with serve_capped(numeric_repository, "--auth-tokens", str(tokens), *settings) as capped:
        c = RawGrpcConnection(capped.host, capped.grpc_port)
        try:
            flood_auth = (("authorization", f"Bearer {flood_token}"),)
            flood = [c.open_call(INFER, flood_auth) for _ in range(PLACES)]
            same = c.open_call(INFER, flood_auth)  # the flood's own token: nobody gives way to it
            c.send_whole(same, REQUEST)
            pump_until([c], lambda: c.calls[same].ended)
            assert c.calls[same].status == RESOURCE_EXHAUSTED, c.calls[same]
            assert ROOM_FULL in c.calls[same].message
            other = c.open_call(INFER, (("authorization", f"Bearer {other_token}"),))
            c.send_whole(other, REQUEST)
            pump_until([c], lambda: c.calls[other].ended and c.calls[flood[-1]].ended)
            assert c.calls[other].status == OK, c.calls[other]
            assert c.calls[flood[-1]].status == RESOURCE_EXHAUSTED, c.calls[flood[-1]]
            assert GAVE_WAY in c.calls[flood[-1]].message
            assert not any(c.calls[call].ended for call in flood[:-1])
        finally:
            c.close()
