"""Hostile gRPC clients, written frame by frame with ``h2`` (raw_h2.py): anonymous calls that announce a
huge message and stall, authenticated ones that do the same, streams that never send, silent sockets.

Each runs against a real server process under a memory cap, with bearer tokens on and timeouts set low,
and checks while it runs that probes answer (under 1 s), memory stays bounded, the attackers get the
documented status (docs/limits.md), and a normal tritonclient caller is served.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from harness import CappedServer, message_room, serve_capped
from raw_h2 import INFER, SERVER_READY, STREAM_INFER, RawGrpcConnection
from test_connections import PROBE_BOUND, allow_open_files, closed_by_server, open_sockets
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

TOKEN = "adversarial-infer-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_MESSAGE = 8 * 1024 * 1024
BUDGET = 2 * MAX_MESSAGE + 1024 * 1024  # two messages in reception fit; a third does not
BODY_TIMEOUT = 2.0
HEADER_TIMEOUT = 1.0
RSS_GROWTH_BOUND = 300 * 1024**2
STREAMS_PER_CONNECTION = 50

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.fixture(scope="module")
def server(numeric_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(f"{TOKEN} infer\n")
    tokens.chmod(0o600)
    with serve_capped(
        numeric_repository,
        "--auth-tokens",
        str(tokens),
        *message_room(MAX_MESSAGE, BUDGET),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--grpc-max-concurrent-streams",
        str(STREAMS_PER_CONNECTION),
    ) as capped:
        yield capped


def infer_normally(server: CappedServer) -> np.ndarray:
    """A normal tritonclient call with the token; the sum it answered."""
    client = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        inputs = [grpcclient.InferInput(name, [1, 16], "FP32") for name in ("a", "b")]
        inputs[0].set_data_from_numpy(np.ones((1, 16), np.float32))
        inputs[1].set_data_from_numpy(np.full((1, 16), 2, np.float32))
        result = client.infer("add", inputs, headers=dict(AUTH), client_timeout=10)
        answer = result.as_numpy("sum")
        assert answer is not None
        return answer
    finally:
        client.close()


def infer_over_http(server: CappedServer, padding: int = 0) -> list[float]:
    """A normal V2 REST call with the token, its JSON body padded with ``padding`` spaces; the sum."""
    inputs = [{"name": n, "shape": [1, 16], "datatype": "FP32", "data": [v] * 16} for n, v in (("a", 1.0), ("b", 2.0))]
    body = json.dumps({"inputs": inputs}).encode() + b" " * padding
    headers = {**dict(AUTH), "Content-Type": "application/json"}
    response = requests.post(f"{server.http_url}/v2/models/add/infer", data=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    data: list[float] = response.json()["outputs"][0]["data"]
    return data


def check_still_serving(server: CappedServer, rss_before: int, infer: bool = True) -> None:
    assert server.alive()
    assert server.probe_seconds() < PROBE_BOUND
    probe = RawGrpcConnection(server.host, server.grpc_port)  # the gRPC readiness probe, anonymous
    try:
        started = time.monotonic()
        call = probe.open_call(SERVER_READY)
        probe.send_whole(call, b"")
        while not probe.calls[call].ended and time.monotonic() - started < 10:
            probe.pump(0.1)
        assert probe.calls[call].status == 0
        assert time.monotonic() - started < PROBE_BOUND
    finally:
        probe.close()
    if infer:
        assert infer_normally(server)[0, 0] == 3.0
    assert server.rss_bytes() - rss_before < RSS_GROWTH_BOUND


def wait_ended(connections: list[RawGrpcConnection], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(call.ended for c in connections for call in c.calls.values()):
            return
        for c in connections:
            c.pump(0.05)


@pytest.fixture
def connections() -> Iterator[list[RawGrpcConnection]]:
    opened: list[RawGrpcConnection] = []
    yield opened
    for c in opened:
        c.close()


def _anonymous_announcers(server: CappedServer, connections: list[RawGrpcConnection], count: int) -> None:
    rss_before = server.rss_bytes()
    announced = MAX_MESSAGE - 1024
    for start in range(0, count, STREAMS_PER_CONNECTION):
        c = RawGrpcConnection(server.host, server.grpc_port)
        connections.append(c)
        for _ in range(min(STREAMS_PER_CONNECTION, count - start)):
            call = c.open_call(INFER)  # no authorization
            c.send_part(call, announced, announced, deadline=2)
    check_still_serving(server, rss_before)
    wait_ended(connections, 10)
    outcomes = [call for c in connections for call in c.calls.values()]
    assert Counter(call.status for call in outcomes) == {UNAUTHENTICATED: count}
    # Nothing was received beyond a flow-control window: the message was never read.
    assert max(call.sent for call in outcomes) < 1024 * 1024
    check_still_serving(server, rss_before)


def test_anonymous_huge_messages_are_refused_unread(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    _anonymous_announcers(server, connections, 150)


@pytest.mark.long
def test_anonymous_huge_messages_thousands(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    _anonymous_announcers(server, connections, 2000)


def test_stalled_messages_hold_at_most_the_budget(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    """Authenticated calls that announce a large message, send most of it and stall: two are received
    within the budget and reset with DEADLINE_EXCEEDED after the body timeout; the others get
    RESOURCE_EXHAUSTED without being read."""
    rss_before = server.rss_bytes()
    announced = MAX_MESSAGE - 1024
    c = RawGrpcConnection(server.host, server.grpc_port)
    connections.append(c)
    calls = [c.open_call(INFER, AUTH) for _ in range(6)]
    for call in calls:
        c.send_part(call, announced, announced - 64 * 1024, deadline=3)
    check_still_serving(server, rss_before, infer=False)  # the room for arriving messages is held
    # ... but not the budget of bytes really held: other clients' HTTP requests are served meanwhile
    assert infer_over_http(server, padding=2 * 1024 * 1024) == [3.0] * 16  # more than is left beside them
    wait_ended(connections, BODY_TIMEOUT + 10)
    statuses = Counter(c.calls[call].status for call in calls)
    assert statuses == {RESOURCE_EXHAUSTED: 4, DEADLINE_EXCEEDED: 2}, statuses
    assert "--max-inflight-bytes" in next(o.message for o in c.calls.values() if o.status == RESOURCE_EXHAUSTED)
    check_still_serving(server, rss_before)  # and once they are gone, it is served


def test_stream_messages_hold_at_most_the_budget(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    """ModelStreamInfer calls whose message is announced large and sent as fast as flow control allows
    (the red team's attack): each message is received only inside the budget, like a unary call's, so
    two are received and time out, the others get RESOURCE_EXHAUSTED having sent at most a window."""
    rss_before = server.rss_bytes()
    announced = MAX_MESSAGE - 1024
    attackers = []
    for _ in range(3):
        c = RawGrpcConnection(server.host, server.grpc_port)
        connections.append(c)
        attackers.append((c, [c.open_call(STREAM_INFER, AUTH) for _ in range(4)]))
    for c, calls in attackers:
        for call in calls:
            c.send_part(call, announced, announced - 64 * 1024, deadline=2)
    check_still_serving(server, rss_before, infer=False)
    wait_ended(connections, BODY_TIMEOUT + 10)
    outcomes = [c.calls[call] for c, calls in attackers for call in calls]
    statuses = Counter(o.status for o in outcomes)
    assert statuses == {RESOURCE_EXHAUSTED: 10, DEADLINE_EXCEEDED: 2}, statuses
    assert all(o.sent < 1024 * 1024 for o in outcomes if o.status == RESOURCE_EXHAUSTED)
    check_still_serving(server, rss_before)


def test_a_normal_stream_is_served_message_by_message(server: CappedServer) -> None:
    request = pb.ModelInferRequest(
        model_name="add",
        inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1, 16]) for n in "ab"],
        raw_input_contents=[np.ones(16, np.float32).tobytes()] * 2,
    ).SerializeToString()
    c = RawGrpcConnection(server.host, server.grpc_port)
    try:
        call = c.open_call(STREAM_INFER, AUTH)
        for _ in range(3):
            c.send_part(call, len(request), 0)
            c.h2.send_data(call, request)
            c.flush()
            c.pump(0.2)
        c.h2.end_stream(call)
        c.flush()
        wait_ended([c], 10)
        assert c.calls[call].status == 0, c.calls[call]
        # three answers, each a 5-byte gRPC prefix and a response that holds 16 floats
        assert c.calls[call].received > 3 * (5 + 16 * 4)
    finally:
        c.close()


def test_streams_that_never_send_are_reset(server: CappedServer, connections: list[RawGrpcConnection]) -> None:
    rss_before = server.rss_bytes()
    for _ in range(4):
        c = RawGrpcConnection(server.host, server.grpc_port)
        connections.append(c)
        for _ in range(STREAMS_PER_CONNECTION):
            c.open_call(INFER, AUTH)
    check_still_serving(server, rss_before, infer=False)
    wait_ended(connections, BODY_TIMEOUT + 10)
    statuses = Counter(call.status for c in connections for call in c.calls.values())
    # Two calls at a time are received within the budget and time out; the rest find no room.
    assert set(statuses) <= {DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED}, statuses
    assert statuses[DEADLINE_EXCEEDED] >= 2, statuses
    assert sum(statuses.values()) == 4 * STREAMS_PER_CONNECTION
    check_still_serving(server, rss_before)


def test_streams_beyond_the_connection_limit_are_refused(
    server: CappedServer, connections: list[RawGrpcConnection]
) -> None:
    c = RawGrpcConnection(server.host, server.grpc_port)
    connections.append(c)
    c.pump(0.3)  # the server's SETTINGS
    assert c.h2.remote_settings.max_concurrent_streams == STREAMS_PER_CONNECTION


def test_silent_grpc_connections_are_closed(server: CappedServer) -> None:
    allow_open_files(300)
    rss_before = server.rss_bytes()
    sockets: list[socket.socket] = open_sockets(server, 200, port=server.grpc_port)
    try:
        check_still_serving(server, rss_before)
        closed, _ = closed_by_server(sockets, HEADER_TIMEOUT + 10)
        assert closed == len(sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_unknown_token_still_refused_before_reading(server: CappedServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        inputs = [grpcclient.InferInput(name, [1, 16], "FP32") for name in ("a", "b")]
        for one in inputs:
            one.set_data_from_numpy(np.ones((1, 16), np.float32))
        with pytest.raises(InferenceServerException, match="not accepted"):
            client.infer("add", inputs, headers={"authorization": "Bearer not-a-token-at-all-000000"})
    finally:
        client.close()


def test_idle_grpc_connections_do_not_lock_clients_out(numeric_repository: Path, tmp_path: Path) -> None:
    """The red team's attack: hundreds of anonymous HTTP/2 connections that complete the handshake and
    never start a call (grpc closes none of them before --grpc-max-connection-idle; past
    --grpc-max-connections, the port's front closes the idle longest for a new one): past the HTTP port's
    --max-connections they cost about 21 KiB each, and probes and normal calls still get in."""
    allow_open_files(400)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN} infer\n")
    tokens.chmod(0o600)
    with serve_capped(numeric_repository, "--auth-tokens", str(tokens), "--max-connections", "50") as capped:
        rss_before = capped.rss_bytes()
        idle: list[RawGrpcConnection] = []
        try:
            for _ in range(300):
                idle.append(RawGrpcConnection(capped.host, capped.grpc_port))
            for c in idle[::30]:
                c.pump(0.1, once=True)  # the server's SETTINGS: the handshake is done
                assert not c.closed
            check_still_serving(capped, rss_before)
            assert capped.rss_bytes() - rss_before < 300 * 40 * 1024  # far less than 40 KiB each
        finally:
            for c in idle:
                c.close()
