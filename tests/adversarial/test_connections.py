"""Hostile HTTP connections: slowloris heads, silent sockets, file-descriptor exhaustion, stalled bodies.

Each attack runs against a real server process under a memory cap (``harness.CappedServer``) with
its timeouts set low, and checks, while the attack is still running, that the health probe answers
(generously: under 1 s), that a normal client is served, that memory stays bounded, and that the
attackers get the documented refusal (docs/limits.md). The ``long`` versions open thousands.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx
import onnx.helper
import orjson
import psutil
import pytest
import requests
from harness import (
    MODEL_INFER,
    CappedServer,
    connect_from,
    raw_request,
    read_answer,
    readable,
    said_until_closed,
    serve_capped,
)

import models
from waiting import wait_until

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MAX_REQUEST = 8 * 1024 * 1024
BUDGET = 2 * MAX_REQUEST + 2 * 1024 * 1024  # two stalled bodies fit (beside small requests' 1/16); a third not
PROBE_BOUND = 1.0
RSS_GROWTH_BOUND = 300 * 1024**2
FAST = (
    "--header-timeout",
    str(HEADER_TIMEOUT),
    "--body-timeout",
    str(BODY_TIMEOUT),
    "--keep-alive-timeout",
    "1",
    "--max-request-bytes",
    str(MAX_REQUEST),
    "--max-inflight-bytes",
    str(BUDGET),
)
INFER_BODY = {
    "inputs": [
        {"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        {"name": "b", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16},
    ]
}


def allow_open_files(count: int) -> None:
    """Raise this test process's soft limit of open files to hold ``count`` sockets (and some)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def served_normally(server: CappedServer) -> None:
    """A normal client's inference is answered correctly."""
    response = requests.post(f"{server.http_url}/v2/models/add/infer", json=INFER_BODY, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"][0] == 3.0


def check_still_serving(server: CappedServer, rss_before: int) -> None:
    assert server.alive()
    assert server.probe_seconds() < PROBE_BOUND
    served_normally(server)
    assert server.rss_bytes() - rss_before < RSS_GROWTH_BOUND


def open_sockets(server: CappedServer, count: int, port: int | None = None) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((server.host, port or server.http_port), timeout=5)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def closed_by_server(sockets: list[socket.socket], seconds: float) -> tuple[int, list[bytes]]:
    """Wait up to ``seconds`` for the server to close ``sockets``; (how many it closed, what it said)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    said: dict[socket.socket, bytes] = {sock: b"" for sock in sockets}
    closed = 0
    deadline = time.monotonic() + seconds
    while closed < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if data:
                said[sock] += data
                continue
            selector.unregister(sock)
            closed += 1
    selector.close()
    return closed, list(said.values())


@pytest.fixture(scope="module")
def server(numeric_repository: Path) -> Iterator[CappedServer]:
    with serve_capped(numeric_repository, *FAST, "--max-connections", "400") as capped:
        yield capped


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_slowloris_heads_are_answered_408_and_closed(server: CappedServer, sockets: list[socket.socket]) -> None:
    rss_before = server.rss_bytes()
    sockets += open_sockets(server, 150)
    for sock in sockets:
        sock.send(b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\n")
    # Drip one header byte every 0.2 s on each, for longer than the header timeout.
    started = time.monotonic()
    while time.monotonic() - started < HEADER_TIMEOUT + 1:
        for sock in sockets:
            with contextlib.suppress(OSError):  # one the server already closed
                sock.send(b"X")
        check_still_serving(server, rss_before)
        time.sleep(0.2)
    closed, said = closed_by_server(sockets, HEADER_TIMEOUT + 5)
    assert closed == len(sockets)
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in said)
    assert b"--header-timeout" in said[0]
    check_still_serving(server, rss_before)


def test_silent_connections_are_closed(server: CappedServer, sockets: list[socket.socket]) -> None:
    rss_before = server.rss_bytes()
    sockets += open_sockets(server, 300)
    check_still_serving(server, rss_before)
    closed, said = closed_by_server(sockets, HEADER_TIMEOUT + 5)
    assert closed == len(sockets)
    assert all(answer == b"" for answer in said)  # nothing was asked, nothing is answered
    check_still_serving(server, rss_before)


def test_stalled_bodies_hold_at_most_the_budget(server: CappedServer, sockets: list[socket.socket]) -> None:
    """Clients that announce a large body, send most of it and stall: two fit the in-flight budget and
    are answered 408 after the body timeout; the others get 503 + Retry-After (429 on TF Serving)
    before their body is read."""
    rss_before = server.rss_bytes()
    announced = MAX_REQUEST - 1024
    sent = announced - 64 * 1024
    for path in ["/v2/models/add/infer"] * 5 + ["/v1/models/add:predict"]:
        sock = socket.create_connection((server.host, server.http_port), timeout=5)
        sockets.append(sock)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: [::1]\r\n"
            f"Content-Type: application/json\r\nContent-Length: {announced}\r\n\r\n"
        )
        sock.sendall(head.encode("ascii"))
        sock.settimeout(0.3)
        try:  # a refused one is answered before its body is read
            answer = read_answer(sock)
        except TimeoutError:
            sock.settimeout(10)
            sock.sendall(b" " * sent)
            continue
        assert answer.startswith(b"HTTP/1.1 429 " if path.startswith("/v1/") else b"HTTP/1.1 503 "), answer
        assert b"retry-after: 1" in answer.lower()
        assert b"--max-inflight-bytes" in answer
    check_still_serving(server, rss_before)  # a small request still fits beside the two stalled ones
    for sock in sockets:
        sock.setblocking(False)
    closed, said = closed_by_server(sockets, BODY_TIMEOUT + 5)
    assert closed == len(sockets)
    assert sum(answer.startswith(b"HTTP/1.1 408 ") for answer in said) == 2
    # The budget is free again: a large (but honest) request is accepted.
    big = {"inputs": [{**entry, "shape": [4096, 16], "data": [1.0] * 4096 * 16} for entry in INFER_BODY["inputs"]]}
    assert requests.post(f"{server.http_url}/v2/models/add/infer", json=big, timeout=30).status_code == 200
    check_still_serving(server, rss_before)


def test_anonymous_bodies_are_refused_unread(numeric_repository: Path, tmp_path: Path) -> None:
    """With --auth-tokens, a large body without a token is answered 401 before it is read."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("adversarial-infer-token-0123456789 infer\n")
    tokens.chmod(0o600)
    with serve_capped(numeric_repository, *FAST, "--auth-tokens", str(tokens)) as capped:
        rss_before = capped.rss_bytes()
        opened = []
        try:
            for _ in range(20):
                sock = socket.create_connection((capped.host, capped.http_port), timeout=5)
                opened.append(sock)
                head = f"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: {MAX_REQUEST - 1}\r\n\r\n"
                sock.sendall(head.encode("ascii") + b" " * 4096)
                assert read_answer(sock).startswith(b"HTTP/1.1 401 ")
            assert capped.alive()
            assert capped.probe_seconds() < PROBE_BOUND
            assert capped.rss_bytes() - rss_before < RSS_GROWTH_BOUND
        finally:
            for sock in opened:
                sock.close()


def _established(server: CappedServer) -> int:
    connections = psutil.Process(server.process.pid).net_connections(kind="tcp")
    return sum(1 for c in connections if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.http_port)


def _idle_flood(repository: Path, cap: int, count: int) -> None:
    """``count`` idle connections (no timeout cuts them: the header timeout is long) against a cap of ``cap``."""
    allow_open_files(count + 16)
    with serve_capped(repository, "--header-timeout", "120", "--max-connections", str(cap)) as capped:
        rss_before = capped.rss_bytes()
        opened: list[socket.socket] = []
        try:
            for start in range(0, count, 100):
                opened += open_sockets(capped, min(100, count - start))
                assert capped.probe_seconds() < PROBE_BOUND
            check_still_serving(capped, rss_before)
            assert _established(capped) <= cap + 2
            assert capped.probe_seconds("/metrics") < PROBE_BOUND  # the scrape gets in too
        finally:
            for sock in opened:
                sock.close()


def test_idle_connections_cannot_exhaust_file_descriptors(numeric_repository: Path) -> None:
    """Past --max-connections the oldest idle connection is closed, so probes always get in."""
    _idle_flood(numeric_repository, cap=100, count=400)


@pytest.mark.long
def test_idle_connection_flood_at_the_default_cap(numeric_repository: Path) -> None:
    _idle_flood(numeric_repository, cap=1000, count=5000)


@pytest.mark.long
def test_slowloris_and_silent_thousands(server: CappedServer, sockets: list[socket.socket]) -> None:
    allow_open_files(2200)
    rss_before = server.rss_bytes()
    for _ in range(10):
        batch = open_sockets(server, 200)
        for sock in batch[::2]:
            sock.send(b"GET /v2/health/ready HTTP/1.1\r\nHo")
        sockets += batch
        assert server.probe_seconds() < PROBE_BOUND
    check_still_serving(server, rss_before)
    closed, _ = closed_by_server(sockets, HEADER_TIMEOUT + 20)
    assert closed == len(sockets)
    check_still_serving(server, rss_before)


def _send_until_answered(sock: socket.socket, first: bytes, more: bytes, count: int) -> bytes:
    """Send ``first``, then ``more`` up to ``count`` times, until the server answers or closes; what it said."""
    said = b""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    try:
        for piece in [first] + [more] * count:
            with contextlib.suppress(OSError):
                sock.sendall(piece)
            if selector.select(timeout=0.05):
                break
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                said += chunk
    finally:
        selector.close()
    return said


def test_unfinished_huge_heads_are_answered_431(server: CappedServer, sockets: list[socket.socket]) -> None:
    """The red team's attack, smaller: connections that each send a header line of megabytes that never
    ends. Each is answered 431 past --max-header-bytes (64 KiB) and closed; memory stays bounded."""
    rss_before = server.rss_bytes()
    said = []
    for _ in range(40):
        sock = socket.create_connection((server.host, server.http_port), timeout=5)
        sockets.append(sock)
        said.append(_send_until_answered(sock, b"GET /v2/health/ready HTTP/1.1\r\nX-Big: ", b"a" * 16384, 512))
    check_still_serving(server, rss_before)
    answered = [answer for answer in said if answer]
    assert len(answered) >= len(said) // 2  # the others may lose the answer to the reset of a fast sender
    assert all(answer.startswith(b"HTTP/1.1 431 ") for answer in answered), answered[0][:200]
    assert b"--max-header-bytes" in answered[0]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v2/health/ready HTTP/1.1\r\nHost: [::1]\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /v2/health/ready HTTP/1.1\r\nHost: [::1]\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(10_000))
        + b"\r\n",
    ],
    ids=["one-large-header", "ten-thousand-headers"],
)
def test_whole_large_heads_are_answered_431(server: CappedServer, head: bytes) -> None:
    with socket.create_connection((server.host, server.http_port), timeout=5) as sock:
        answer = _send_until_answered(sock, head, b"", 0)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"application/json" in answer
    check_still_serving(server, server.rss_bytes())


def test_a_head_under_the_limit_is_served(server: CappedServer) -> None:
    response = requests.post(
        f"{server.http_url}/v2/models/add/infer", json=INFER_BODY, headers={"X-Large": "a" * 32_000}, timeout=10
    )
    assert response.status_code == 200, response.text


def _heads_with_a_byte_of_body(server: CappedServer, count: int) -> list[socket.socket]:
    """``count`` connections from 127.0.0.1, each with an inference request's head announcing 100 KB of body
    and its first byte, then nothing."""
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 100000\r\n\r\n{"
    opened = []
    for _ in range(count):
        sock = connect_from(server, "127.0.0.1")
        sock.sendall(head)
        opened.append(sock)
    return opened


def test_busy_connections_leave_room_for_probes(numeric_repository: Path) -> None:
    """The red team's attack: every connection busy with a body sent one byte at a time. Busy ones are
    never evicted, so probes and the scrape get one of the reserve connections; anything else asked on a
    reserve connection is answered 503 with Retry-After, and once the reserve is full too, new
    connections are closed."""
    cap = 40
    with serve_capped(numeric_repository, "--max-connections", str(cap), "--body-timeout", "60") as capped:
        rss_before = capped.rss_bytes()
        busy: list[socket.socket] = []
        try:
            busy += _heads_with_a_byte_of_body(capped, cap)
            deadline = time.monotonic() + 5
            while _established(capped) < cap and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(3):
                for sock in busy:
                    sock.send(b" ")
                assert capped.probe_seconds() < PROBE_BOUND
                assert capped.probe_seconds("/v2/health/live") < PROBE_BOUND
                assert capped.probe_seconds("/metrics") < PROBE_BOUND
            with socket.create_connection((capped.host, capped.http_port), timeout=5) as other:
                other.sendall(b"GET /v2/models/add HTTP/1.1\r\nHost: [::1]\r\n\r\n")
                answer = _send_until_answered(other, b"", b"", 0)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            assert b"retry-after: 1" in answer.lower()
            assert b"--max-connections" in answer
            assert capped.rss_bytes() - rss_before < RSS_GROWTH_BOUND
        finally:
            for sock in busy:
                sock.close()
        check_still_serving(capped, rss_before)


def test_reserve_connections_that_never_read_their_scrapes_do_not_keep_probes_out(numeric_repository: Path) -> None:
    """Outside attack: with every ordinary connection busy, 16 clients took the whole probe reserve by
    pipelining hundreds of /metrics scrapes with a 4 KB receive buffer and never reading, so every probe
    got a reset. A reserve connection open longer than a probe needs is now closed to make room."""
    cap = 8
    with serve_capped(numeric_repository, "--max-connections", str(cap), "--body-timeout", "60") as capped:
        rss_before = capped.rss_bytes()
        held: list[socket.socket] = []
        try:
            for _ in range(cap):
                sock = socket.create_connection((capped.host, capped.http_port), timeout=5)
                sock.sendall(b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 10\r\n\r\n")
                held.append(sock)
            deadline = time.monotonic() + 5
            while _established(capped) < cap and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(16):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((capped.host, capped.http_port))
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.send(b"GET /metrics HTTP/1.1\r\nHost: [::1]\r\n\r\n" * 300)
                held.append(sock)
            time.sleep(2.5)  # older than a probe needs
            for _ in range(5):
                assert capped.probe_seconds() < PROBE_BOUND
        finally:
            for sock in held:
                sock.close()
        check_still_serving(capped, rss_before)


def test_pipelined_requests_of_a_client_that_half_closes_log_no_errors(server: CappedServer) -> None:
    """Outside attack: two pipelined requests and a half-close made the second answer's write fail on the
    closed connection, logged as two ERROR tracebacks each (3.9 MB of log in 0.8 s for 500 connections). A
    client that leaves is logged at DEBUG, whichever answer it leaves behind."""
    body = orjson.dumps(INFER_BODY)
    head = "POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    errors_before = sum("ERROR" in line or "Traceback" in line for line in server.log_lines)
    for _ in range(40):
        with socket.create_connection((server.host, server.http_port)) as sock:
            sock.sendall(request * 2)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
    served_normally(server)
    time.sleep(0.5)  # the log reader's last lines
    errors = [line for line in server.log_lines if "ERROR" in line or "Traceback" in line]
    assert len(errors) == errors_before, "".join(errors[-5:])
    assert server.probe_seconds() < PROBE_BOUND


ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"
SLOW_BODY = (
    b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
)


def _ask(sock: socket.socket, method: str, path: str, body: bytes = b"") -> bytes:
    sock.sendall(raw_request(method, path, body))
    return read_answer(sock)


def _slow_run() -> bytes:
    """A request of the ``slow`` model that runs for a while (2,000 products of 256x256 matrices)."""
    x = {"name": "x", "datatype": "FP32", "shape": [256, 256], "data": [0.01] * (256 * 256)}
    return orjson.dumps({"inputs": [{"name": "iterations", "datatype": "INT64", "shape": [], "data": [2000]}, x]})


def test_slow_senders_of_one_address_do_not_keep_other_addresses_out(numeric_repository: Path) -> None:
    """Outside attack: connections from one address that each announce a body and send it a byte at a
    time took every slot of --max-connections, and every other client got 503 until --body-timeout. A
    newcomer from an address holding fewer now makes the server close one of the heaviest address's
    connections still sending (answered 503, then an orderly close); one whose request is being served
    is never closed; a newcomer from the heaviest address itself (or behind a proxy: one address for
    all) still gets only the probe reserve."""
    cap = 40
    with serve_capped(numeric_repository, "--max-connections", str(cap), "--body-timeout", "60") as capped:
        rss_before = capped.rss_bytes()
        attack: list[socket.socket] = []
        try:
            served = connect_from(capped, ATTACKER)  # first and oldest, and sent least once its body is in
            body = _slow_run()
            served.sendall(
                b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            attack.append(served)
            for _ in range(cap - 1):
                sock = connect_from(capped, ATTACKER)
                sock.sendall(SLOW_BODY)
                attack.append(sock)
            wait_until(lambda: _established(capped) >= cap, timeout=10, what="the attacker's connections")
            for sock in attack[1:]:
                sock.send(b" ")  # each has sent two bytes of its body
            still_running = not readable(served)  # when the other address comes in

            with connect_from(capped, OTHER) as other:
                answer = _ask(other, "POST", "/v2/models/add/infer", orjson.dumps(INFER_BODY))
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
                assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["outputs"][0]["data"][0] == 3.0
                ready = _ask(other, "GET", "/v2/health/ready")
                assert ready.startswith(b"HTTP/1.1 200 "), ready[:300]
            with connect_from(capped, OTHER) as probe:
                assert _ask(probe, "GET", "/v2/health/live").startswith(b"HTTP/1.1 200 ")

            # the slow run was not cut: it is answered in full
            ran = read_answer(served)
            assert ran.startswith(b"HTTP/1.1 200 "), ran[:300]
            # the two connections closed to let the other address in said why, then closed in order
            selector = selectors.DefaultSelector()
            for sock in attack[1:]:
                selector.register(sock, selectors.EVENT_READ)
            closed = [key.fileobj for key, _ in selector.select(timeout=5)]
            selector.close()
            # (a run already answered left its connection idle, and an idle one is closed first)
            assert 1 <= len(closed) <= 2 if still_running else len(closed) <= 2, len(closed)
            for sock in closed:
                assert isinstance(sock, socket.socket)
                said = said_until_closed(sock, 10)
                assert said.startswith(b"HTTP/1.1 503 "), said[:300]
                assert b"retry-after: 1" in said.lower()
                assert b"this client address holds the most" in said

            # the heaviest address itself, like every client behind a proxy, gets only the probe reserve
            served.close()
            for sock in closed:
                assert isinstance(sock, socket.socket)
                sock.close()
            attack = [sock for sock in attack[1:] if sock not in closed]
            wait_until(lambda: _established(capped) <= len(attack), timeout=10, what="the closed connections to go")
            for _ in range(cap - len(attack)):
                sock = connect_from(capped, ATTACKER)
                sock.sendall(SLOW_BODY)
                attack.append(sock)
            wait_until(lambda: _established(capped) >= cap, timeout=10, what="the slots to be full again")
            with connect_from(capped, ATTACKER) as again:
                refused = _ask(again, "POST", "/v2/models/add/infer", orjson.dumps(INFER_BODY))
            assert refused.startswith(b"HTTP/1.1 503 "), refused[:300]
            assert b"kept for health probes and metrics" in refused
            assert "closed 1 connection(s) of 127.0.0.2, the address holding the most (40)" in capped.log()
            assert capped.rss_bytes() - rss_before < RSS_GROWTH_BOUND
        finally:
            for sock in attack:
                sock.close()
        check_still_serving(capped, rss_before)


def test_connections_whose_clients_do_not_read_their_answers_give_way_to_other_addresses(
    numeric_repository: Path, tmp_path: Path
) -> None:
    """Outside attack rt16: one address held every connection slot with pipelined requests for answers it
    never read (each connection "being answered" until --body-timeout, and such a connection was never
    closed for another address): 12 of 12 requests from another address got 503. A connection whose
    client does not read its answer (its writing paused) is now closed for a newcomer from a lighter
    address, after the idle and sending ones."""
    repository = tmp_path / "repository"
    shutil.copytree(numeric_repository, repository)
    chain = [onnx.helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(8000)]
    graph = onnx.helper.make_graph(
        chain,
        "chain",
        [onnx.helper.make_tensor_value_info("t0", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("t8000", onnx.TensorProto.FLOAT, [1])],
    )
    models.write_version(repository, "chain", 1, onnx.helper.make_model(graph))
    cap = 20
    with serve_capped(repository, "--max-connections", str(cap), "--body-timeout", "60") as capped:
        url = f"{capped.http_url}/web/api/models/chain/versions/1/graph"
        document = requests.get(url, headers={"Connection": "close"}, timeout=60)
        assert len(document.content) > 800_000  # computed once, then each answer is a copy of it
        wait_until(lambda: _established(capped) == 0, timeout=10, what="the document's connection to close")
        rss_before = capped.rss_bytes()
        pipelined = b"GET /web/api/models/chain/versions/1/graph HTTP/1.1\r\nHost: [::1]\r\n\r\n" * 33
        attack: list[socket.socket] = []
        try:
            for _ in range(cap):
                sock = connect_from(capped, ATTACKER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(pipelined)  # 33 answers of 800 KB (26 MB), never read
                attack.append(sock)
            wait_until(lambda: all(readable(sock) for sock in attack), timeout=30, what="answers being written")
            answers = []
            for _ in range(5):
                with connect_from(capped, OTHER) as other:
                    answer = _ask(other, "POST", "/v2/models/add/infer", orjson.dumps(INFER_BODY))
                answers.append(answer.split(b"\r\n", 1)[0])
                if answer.startswith(b"HTTP/1.1 200 "):
                    break
                time.sleep(1)  # the attacker's answers are still going into its sockets' buffers
            assert answers[-1] == b"HTTP/1.1 200 OK", answers
            assert "closed a connection whose client does not read its answer" in capped.log()
            assert capped.rss_bytes() - rss_before < RSS_GROWTH_BOUND
        finally:
            for sock in attack:
                sock.close()
        check_still_serving(capped, rss_before)


def test_thousands_of_pipelined_requests_close_their_connection_and_leave_the_loop_free(
    server: CappedServer,
) -> None:
    """Outside attack rt13 N1: one connection sent 40,000 pipelined tiny GETs (1.28 MB) at once; each read
    of them was parsed whole, and every request queued went over the connection's list of requests again
    (quadratic): the event loop was frozen for 6 minutes, every client locked out. Now a connection that
    queues more than 32 requests behind the one being answered is closed."""
    rss_before = server.rss_bytes()
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n" * 40_000)
        assert server.probe_seconds() < PROBE_BOUND  # while the server reads them
        said = b""
        with contextlib.suppress(OSError):  # closed with requests unread: a reset may come first
            while chunk := sock.recv(65536):
                said += chunk
    assert said.count(b"HTTP/1.1 200 ") <= 40  # answered at most as far as the limit, then closed
    check_still_serving(server, rss_before)


def test_a_pipelined_head_behind_a_busy_request_is_held_to_the_head_limit(server: CappedServer) -> None:
    """Outside attack rt13 N3: a head sent behind a request still being answered was never counted: one
    connection put 1.25 GB of one endless header into the server. Now it is cut past --max-header-bytes
    and one read, like any other head (the answer being written leaves no room for a 431: closed)."""
    rss_before = server.rss_bytes()
    sent = 0
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        run = _slow_run()
        head = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: {len(run)}\r\n\r\n"
        sock.sendall(head.encode() + run + b"GET /v2/health/ready HTTP/1.1\r\nX-Endless: ")
        with contextlib.suppress(OSError):  # the server closes: a reset or a broken pipe
            for _ in range(4096):  # 64 MiB of one header line that never ends
                sock.sendall(b"a" * 16384)
                sent += 16384
    assert sent < 32 * 1024 * 1024, f"the server read {sent} bytes of one head"
    check_still_serving(server, rss_before)


def test_a_pipelined_request_refused_for_its_trailer_is_not_answered_ahead_of_the_one_before(
    server: CappedServer,
) -> None:
    """Outside attack rt18: a request pipelined behind a running one, whose trailer field passed the head
    limit, was answered 431 at once, ahead of the running request's answer, so the client read the 431 as
    that answer. Such a connection is now closed instead, as for the other limits of pipelined requests."""
    run = _slow_run()
    busy = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: {len(run)}\r\n\r\n".encode() + run
    pipelined = (
        b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\nX-T: "
    )
    said = b""
    with socket.create_connection((server.host, server.http_port), timeout=30) as sock:
        sock.sendall(busy + pipelined)
        with contextlib.suppress(OSError):  # the server closes: a reset or a broken pipe
            for _ in range(64):
                sock.sendall(b"a" * 16384)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                said += chunk
    assert not said.startswith(b"HTTP/1.1 431 "), said[:300]
    check_still_serving(server, server.rss_bytes())


def test_chunked_bodies_of_tiny_chunks_are_refused(server: CappedServer) -> None:
    """Outside attack rt18: bodies streamed as 1-byte chunks (6 bytes of wire a byte, each chunk Python calls
    on the event loop) from 30 connections held probes 19 s. Past 1,024 chunks, a body's chunks must average
    256 bytes; a body of larger chunks is served."""
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection((server.host, server.http_port), timeout=30) as sock:
        sock.sendall(head + b"1\r\n \r\n" * 2000)
        said = said_until_closed(sock, 30)
    assert said.startswith(b"HTTP/1.1 400 "), said[:300]
    assert b"chunks average under 256 bytes after 1024 of them" in said
    body = orjson.dumps(INFER_BODY)
    body += b" " * (2000 * 300 - len(body))
    chunks = b"".join(b"%x\r\n%s\r\n" % (300, body[i : i + 300]) for i in range(0, len(body), 300))
    with socket.create_connection((server.host, server.http_port), timeout=30) as sock:
        sock.sendall(head + chunks + b"0\r\n\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    check_still_serving(server, server.rss_bytes())


def stream_after_head(sock: socket.socket, head: bytes, piece: bytes, most: int) -> tuple[int, bytes]:
    """Send ``head``, then ``piece`` until ``most`` bytes or the server stops reading; (bytes of ``piece``
    sent, what the server said)."""
    sent = 0
    said = b""
    sock.sendall(head)
    with contextlib.suppress(OSError):  # the server stops reading: a reset or a broken pipe
        while sent < most:
            sock.sendall(piece)
            sent += len(piece)
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            said += chunk
    return sent, said


def test_an_early_answer_closes_its_connection_instead_of_reading_the_body_on(server: CappedServer) -> None:
    """Outside attack rt20: a POST announcing a body of 10 GB was answered 413 at once, and the server then read
    all 10 GB to keep the connection (30 such over TLS held probes 5.5 s). A connection answered before its
    body is in now closes, reading and dropping at most LINGER_BYTES (64 MiB) so that the client gets its
    answer."""
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 10000000000\r\n\r\n"
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        sent, said = stream_after_head(sock, head, b" " * 65536, 256 * 1024 * 1024)
    assert said.startswith(b"HTTP/1.1 413 "), said[:300]
    assert sent < 100 * 1024 * 1024, f"the server read {sent} bytes of a body it had answered"
    check_still_serving(server, server.rss_bytes())


def test_bodies_sent_to_the_probes_are_refused_unread(numeric_repository: Path, tmp_path: Path) -> None:
    """Outside attack rt20: the probes are open to all, also with --auth-tokens, and a POST to them had its
    body read and counted in --max-inflight-bytes: 4 anonymous heads announcing 67 MB held the budget, and
    every authenticated large request was refused 503 for up to --body-timeout. A body sent to a probe is
    refused 400 before a byte of it is read or counted."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-secret-of-32-characters-at-least infer\n")
    tokens.chmod(0o600)
    with serve_capped(
        numeric_repository, *FAST, "--auth-tokens", str(tokens), "--max-inflight-bytes", str(2 * MAX_REQUEST)
    ) as capped:
        held = []
        try:
            for path in (b"/v2/health/live", b"/v2/health/ready"):
                sock = socket.create_connection((capped.host, capped.http_port), timeout=10)
                held.append(sock)
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: [::1]\r\nContent-Length: %d\r\n\r\n" % (path, MAX_REQUEST))
                said = said_until_closed(sock, 10)
                assert said.startswith(b"HTTP/1.1 400 "), said[:300]
                assert b"the health probes take no request body" in said
            for _ in range(4):  # the attack: heads that announce a body and send none of it
                sock = socket.create_connection((capped.host, capped.http_port), timeout=10)
                held.append(sock)
                head = b"POST /v2/health/live HTTP/1.1\r\nHost: [::1]\r\nContent-Length: %d\r\n\r\n"
                sock.sendall(head % MAX_REQUEST)
            large = orjson.dumps(INFER_BODY) + b" " * (MAX_REQUEST - 1024)
            answer = requests.post(
                f"{capped.http_url}/v2/models/add/infer",
                data=large,
                headers={"Authorization": "Bearer a-secret-of-32-characters-at-least"},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            assert capped.probe_seconds() < PROBE_BOUND
        finally:
            for sock in held:
                sock.close()


def test_refusals_for_a_token_are_logged_a_few_times_not_once_each(numeric_repository: Path, tmp_path: Path) -> None:
    """Outside attack rt21: every call refused for its token wrote an INFO line: 105,548 unauthenticated gRPC
    calls wrote 22.7 MB of log in 15 s. Refusals are counted and reported at most every 10 s, with their
    count and the last one's method, path and reason."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-secret-of-32-characters-at-least infer\n")
    tokens.chmod(0o600)
    with serve_capped(numeric_repository, *FAST, "--auth-tokens", str(tokens)) as capped:
        with requests.Session() as session:
            codes = {session.get(f"{capped.http_url}/v2/models/add", timeout=10).status_code for _ in range(200)}
        assert codes == {401}
        target = f"{capped.host}:{capped.grpc_port}"
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(MODEL_INFER, request_serializer=bytes, response_deserializer=bytes)
            for _ in range(200):
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"", timeout=10)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert capped.probe_seconds() < PROBE_BOUND
        lines = [line for line in capped.log().splitlines() if "for their token" in line]
        http_lines = [line for line in lines if "request(s)" in line]
        grpc_lines = [line for line in lines if "gRPC call(s)" in line]
        assert 1 <= len(http_lines) <= 3, http_lines  # before: 200 lines
        assert 1 <= len(grpc_lines) <= 3, grpc_lines
        assert "refused 1 request(s) for their token (last: GET /v2/models/add: " in http_lines[0]


@pytest.mark.parametrize(
    ("request_bytes", "line"),
    [
        (b"[[[[ no HTTP request ]]]]\r\n\r\n", "invalid HTTP request(s) received"),
        (b"POST /v2/health/live HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 1\r\n\r\nx", "a body to a health probe"),
    ],
    ids=["not-http", "body-to-a-probe"],
)
def test_repeated_refusals_are_logged_a_few_times_not_once_each(
    server: CappedServer, request_bytes: bytes, line: str
) -> None:
    """Outside attacks rt22, rt23: uvicorn logged a WARNING for each connection that sent bytes that are no
    HTTP request (20,084 lines in 15 s), and the connection layer an INFO line for each request it refused (a
    body sent to a probe: 65,711 lines in 20 s). Each kind is reported at most every 10 s, with a count."""
    before = server.log().count(line)
    for _ in range(200):
        with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
            sock.sendall(request_bytes)
            said = said_until_closed(sock, 10)
        assert said.startswith(b"HTTP/1.1 400 "), said[:300]
    assert server.probe_seconds() < PROBE_BOUND
    log = server.log()
    assert "Invalid HTTP request received." not in log  # uvicorn's own line, each time before
    assert 1 <= log.count(line) - before <= 3  # before: 200


def test_chunk_extensions_that_outweigh_the_data_are_refused(server: CappedServer) -> None:
    """Outside attack rt20: 256-byte chunks each with a 60,000-byte chunk extension passed every data limit
    (--max-request-bytes and the chunk average count data) and the framing limit per chunk: 30 connections
    streamed 10 GB of framing in 15 s, never answered, probes 6.2 s. A body whose framing passes its data by
    --max-header-bytes is refused; short extensions are served."""
    head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"100;" + b"e" * 60000 + b"\r\n" + b" " * 256 + b"\r\n"
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        sent, said = stream_after_head(sock, head, chunk, 64 * 1024 * 1024)
    assert said.startswith(b"HTTP/1.1 400 "), said[:300]
    assert b"chunk lines (chunk extensions) hold more bytes than its data" in said
    assert sent < 4 * 1024 * 1024, f"the server read {sent} bytes of chunk extensions"
    body = orjson.dumps(INFER_BODY)
    chunks = b"".join(
        b"%x;name=value\r\n%s\r\n" % (len(body[i : i + 64]), body[i : i + 64]) for i in range(0, len(body), 64)
    )
    with socket.create_connection((server.host, server.http_port), timeout=30) as sock:
        sock.sendall(head + chunks + b"0\r\n\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    check_still_serving(server, server.rss_bytes())


@pytest.mark.parametrize("answered_first", [False, True], ids=["waiting-for-its-body", "answered-401-first"])
def test_trailer_fields_that_never_end_are_refused_at_the_head_limit(
    numeric_repository: Path, tmp_path: Path, answered_first: bool
) -> None:
    """Outside attack rt16: a chunked body's trailer field whose value never ends was kept by the parser as
    one bytes object extended with each read, counted nowhere: 40 such connections held +801 MB and probes
    waited 15.6 s (also with --auth-tokens: the 401 went out first, and the parser read on). A chunked
    body's framing since its last chunk (chunk lines, trailer fields) is now held to --max-header-bytes:
    431 while the request waits for its body, else the connection is closed."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-secret-of-32-characters-at-least infer\n")
    tokens.chmod(0o600)
    options = ("--auth-tokens", str(tokens)) if answered_first else ()
    with serve_capped(numeric_repository, *FAST, *options) as capped:
        rss_before = capped.rss_bytes()
        sent = 0
        said = b""
        with socket.create_connection((capped.host, capped.http_port), timeout=10) as sock:
            head = b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nTransfer-Encoding: chunked\r\n\r\n"
            sock.sendall(head + b"1\r\n{\r\n0\r\nX-Trailer: ")
            with contextlib.suppress(OSError):  # the server closes: a reset or a broken pipe
                for _ in range(6144):  # 96 MiB of one trailer value that never ends
                    sock.sendall(b"a" * 16384)
                    sent += 16384
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    said += chunk
        if answered_first:
            # refused before its body: the connection closes after the 401, reading and dropping (not
            # holding) at most LINGER_BYTES of what follows so the client gets its answer
            assert sent < 80 * 1024 * 1024, f"the server read {sent} bytes after the refusal"
            assert said.startswith(b"HTTP/1.1 401 "), said[:300]
            assert b"connection: close" in said.lower()
        else:
            assert sent < 32 * 1024 * 1024, f"the server read {sent} bytes of one trailer field"
            assert said.startswith(b"HTTP/1.1 431 "), said[:300]
            assert b"chunk lines or trailer fields are larger than 65536 bytes" in said
        assert capped.alive()
        assert capped.probe_seconds() < PROBE_BOUND
        assert capped.rss_bytes() - rss_before < RSS_GROWTH_BOUND


def test_an_anonymous_request_with_a_body_is_refused_and_its_connection_closed(
    numeric_repository: Path, tmp_path: Path
) -> None:
    """Outside attack rt19: 30 anonymous TLS connections kept streaming request bodies after their 401 (the
    connection read them on, to be reused) and held probes 5 to 8 s. A 401 to a request that announces a
    body now closes its connection (after at most LINGER_BYTES / LINGER_SECONDS of the body read and
    dropped, so the client gets the answer)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-secret-of-32-characters-at-least infer\n")
    tokens.chmod(0o600)
    with serve_capped(numeric_repository, *FAST, "--auth-tokens", str(tokens)) as capped:
        sent = 0
        said = b""
        with socket.create_connection((capped.host, capped.http_port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 1000000000\r\n\r\n")
            with contextlib.suppress(OSError):  # the server stops reading: a reset or a broken pipe
                for _ in range(8192):  # up to 128 MiB of a body it will never use
                    sock.sendall(b" " * 16384)
                    sent += 16384
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    said += chunk
        assert said.startswith(b"HTTP/1.1 401 "), said[:300]
        assert b"connection: close" in said.lower()
        assert sent < 100 * 1024 * 1024, f"the server read {sent} bytes of a refused body"
        assert capped.probe_seconds() < PROBE_BOUND


def test_requests_that_ask_to_switch_protocols_are_served_as_http_and_give_their_slots_back(
    server: CappedServer,
) -> None:
    """Outside attack rt16: uvicorn handed a connection that asked for a WebSocket to its WebSocket protocol,
    and its close never gave the connection's slot back: 1,016 upgrades (each answered 403) locked every
    client, probes included, out of the HTTP port for good. A request that asks to switch protocols is now
    served as plain HTTP/1.1 and its connection closed after the answer; what follows it is not read."""
    rss_before = server.rss_bytes()
    websocket = (
        b"GET /v2/health/ready HTTP/1.1\r\nHost: [::1]\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    for _ in range(450):  # past --max-connections 400 and the probe reserve of 16
        with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
            sock.sendall(websocket)
            said = said_until_closed(sock, 10)
            assert said.startswith(b"HTTP/1.1 200 "), said[:300]
    h2c = b"GET /v2/health/live HTTP/1.1\r\nHost: [::1]\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        sock.sendall(h2c + b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n" + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        said = said_until_closed(sock, 10)
    assert said.startswith(b"HTTP/1.1 200 "), said[:300]
    assert said.count(b"HTTP/1.1 ") == 1  # the bytes after the switch were not read as a request
    assert "upgrade" not in server.log().lower()  # no warning per connection (uvicorn wrote two or three)
    # one with a body (curl --http2 on an http:// URL): the parser stops before it, so it is refused, not
    # handed to the application empty (outside attack rt18: a valid inference answered "not valid JSON")
    body = orjson.dumps(INFER_BODY)
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        said = said_until_closed(sock, 10)
    assert said.startswith(b"HTTP/1.1 400 "), said[:300]
    assert b"asks to switch protocols (Connection: upgrade) and has a body" in said
    check_still_serving(server, rss_before)


def test_pipelined_request_targets_count_with_the_heads(server: CappedServer) -> None:
    """Request targets (the URL of a request line) pipelined behind a busy request count against
    --max-header-bytes with the heads' fields: 31 requests of a 4 KiB target each (under every per-head
    limit) were all parsed and held, each as bytes, a path and a query string, and answered."""
    run = _slow_run()
    busy = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: {len(run)}\r\n\r\n".encode() + run
    target = b"/v2/health/live?" + b"q" * 4096
    pipelined = (b"GET " + target + b" HTTP/1.1\r\nHost: [::1]\r\n\r\n") * 31
    with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
        sock.sendall(busy + pipelined)
        said = b""
        with contextlib.suppress(OSError):  # closed with requests unread: a reset may come first
            while chunk := sock.recv(65536):
                said += chunk
    assert said.count(b"HTTP/1.1 200 ") < 32, said.count(b"HTTP/1.1 200 ")  # not every request answered
    assert "requests pipelined behind a busy one above 65536 bytes together" in server.log()
    check_still_serving(server, server.rss_bytes())


def test_pipelined_heads_of_many_fields_are_bounded_together(server: CappedServer) -> None:
    """Outside attack rt15: each of 300 connections sent a request whose answer it never read, then 31
    pipelined heads of 1,500 short header fields each (under the 32-request and 64 KiB-per-head limits):
    uvicorn parsed them all into Python objects, 5.4 MB per connection, +1.6 GB in all, and probes waited
    23 s. The heads pipelined behind a busy request now count against --max-header-bytes together, and a
    head may have at most 100 fields."""
    rss_before = server.rss_bytes()
    run = _slow_run()
    busy = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: {len(run)}\r\n\r\n".encode() + run
    fields = b"".join(b"a%d: b\r\n" % i for i in range(1500))
    pipelined = (b"GET /v2/health/live HTTP/1.1\r\n" + fields + b"\r\n") * 31
    sockets = []
    try:
        for _ in range(120):
            sock = socket.create_connection((server.host, server.http_port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with contextlib.suppress(OSError):
                sock.sendall(busy + pipelined)
            sockets.append(sock)
        # while the attack holds its connections (before: 5.4 s, and 5.4 MB per connection, kept after)
        assert server.probe_seconds() < 3 * PROBE_BOUND  # 120 slow runs are admitted meanwhile: generous
        assert server.rss_bytes() - rss_before < RSS_GROWTH_BOUND
    finally:
        for sock in sockets:
            sock.close()
    check_still_serving(server, rss_before)
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        head = b"GET /v2/health/ready HTTP/1.1\r\nHost: [::1]\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(101))
        said = _send_until_answered(sock, head + b"\r\n", b"", 0)
    assert said.startswith(b"HTTP/1.1 431 "), said[:200]
    assert b"more than 100 header fields" in said


def test_connections_lingering_after_an_early_answer_give_their_slots_to_newcomers(numeric_repository: Path) -> None:
    """Clients that announce a body over --max-request-bytes and send one byte of it: each is answered 413
    at once and its connection lingers 5 s reading the rest (so that the kernel does not reset the answer
    away). They counted against --max-connections and none could be closed for room, so one address
    sending such heads every few seconds kept every other address out (outside attack rt43: 57 of 70
    refused, with --auth-tokens and 401s too). Once its answer has reached the client, a lingering
    connection gives its slot to a newcomer."""
    cap = 40
    with serve_capped(numeric_repository, "--max-connections", str(cap), "--max-request-bytes", "4096") as capped:
        rss_before = capped.rss_bytes()
        held: list[socket.socket] = []
        try:
            held += _heads_with_a_byte_of_body(capped, cap)
            for sock in held:
                assert sock.recv(12) == b"HTTP/1.1 413"  # answered early; the connection lingers
            with connect_from(capped, "127.0.0.2") as other:
                other.sendall(b"GET /v2/models/add HTTP/1.1\r\nHost: [::1]\r\n\r\n")
                answer = _send_until_answered(other, b"", b"", 0)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        finally:
            for sock in held:
                sock.close()
        check_still_serving(capped, rss_before)


def test_a_client_still_sending_the_body_past_its_early_answer_keeps_its_connection(
    numeric_repository: Path,
) -> None:
    """A client that sends its whole body before it reads the answer (http.client, as many do), answered
    413 at its head: while it still sends, its lingering connection is not cut for newcomers past the cap,
    so it reads its 413 (the cut, 0.5 s after the answer, reset it mid-body and it lost the answer:
    outside attack rt45)."""
    cap = 20
    with serve_capped(numeric_repository, "--max-connections", str(cap), "--max-request-bytes", "4096") as capped:
        idle = [connect_from(capped, "127.0.0.1") for _ in range(cap - 1)]
        stop = threading.Event()

        def newcomers() -> None:  # a new connection from the same address every 0.1 s, past the cap
            while not stop.wait(0.1):
                with contextlib.suppress(OSError):
                    idle.append(connect_from(capped, "127.0.0.1"))

        arriving = threading.Thread(target=newcomers)
        try:
            with connect_from(capped, "127.0.0.2") as uploader:
                uploader.sendall(
                    b"POST /v2/models/add/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 3000000\r\n\r\n"
                )
                arriving.start()
                for _ in range(30):  # 3 MB at about 1 MB/s, then the answer is read
                    uploader.sendall(b" " * 100_000)
                    time.sleep(0.1)
                answer = said_until_closed(uploader, 10)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        finally:
            stop.set()
            if arriving.is_alive():
                arriving.join(timeout=10)
            for sock in idle:
                sock.close()
