"""Connection slots held by requests waiting at a busy model (outside attack rt8 F4).

The attack: with ``--max-connections 20``, 20 connections from one address each kept a request queued at a
one-instance model, and every request from two other addresses got 503 "every connection is busy" for
25 s: sharing the slots between addresses closed only connections that were idle or still sending, and a
request waiting in its model's queue counted as being served. Now a newcomer from a lighter address
withdraws the heaviest address's newest request that only waits (``core.progress``): it leaves the queue
without running and is answered 503 with ``Retry-After``, then its connection closes. A request whose run
has begun is never cut, and a newcomer from the heaviest address itself (every client behind a proxy)
still gets only the probe reserve.

Scaled down: ``--max-connections 6`` and a ``paced`` model on one instance (y = x after x chained matrix
products). The attacker's first two requests run until their client leaves (one runs, the other
queues, whichever came first); its four others, short ones, are queued one after another behind them,
so that the newest is known.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import orjson
import psutil
import pytest
import requests
from harness import CappedServer, connect_from, raw_request, read_answer, readable, said_until_closed, serve_config

import models
from waiting import wait_until

CAP = 6
ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"
FOREVER = 1e9  # products: a run that goes on until its client leaves
PRODUCTS = 50.0  # products: a run of a few ms
PROBE_BOUND = 1.0
RSS_GROWTH_BOUND = 300 * 1024**2
ADD_BODY = orjson.dumps(
    {
        "inputs": [
            {"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
            {"name": "b", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16},
        ]
    }
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root = tmp_path_factory.mktemp("waiting-connections")
    paced = models.write_version(root / "repository", "paced", 1, models.value_paced_model("paced", 64))
    add = models.write_version(root / "repository", "add", 1, models.add_model())
    entries = [
        {"name": "paced", "base_path": str(paced.parent), "instance_count": 1, "max_batch_size": 0},
        {"name": "add", "base_path": str(add.parent)},
    ]
    with serve_config(root, entries, "--max-connections", str(CAP)) as running:
        yield running


def _ask_from(server: CappedServer, address: str, method: str, path: str, body: bytes = b"") -> bytes:
    """One request on a connection of its own from ``address``, closed once it is answered."""
    with connect_from(server, address) as sock:
        sock.sendall(raw_request(method, path, body, close=True))
        answer = read_answer(sock)
        while sock.recv(65536):  # until the server has closed it: its slot is free again
            pass
    return answer


def _established(server: CappedServer) -> int:
    connections = psutil.Process(server.process.pid).net_connections(kind="tcp")
    return sum(1 for c in connections if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.http_port)


def _queued(server: CappedServer) -> float:
    """``paced``'s queue depth, scraped from the attacker's own address (a probe-reserve connection once
    every slot is taken, so that the scrape itself withdraws nothing)."""
    scrape = _ask_from(server, ATTACKER, "GET", "/metrics").decode()
    prefix = 'onnxserve_queue_depth{model="paced"'
    return next((float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines() if line.startswith(prefix)), 0.0)


def _executions(server: CappedServer) -> int:
    stats = requests.get(f"{server.http_url}/v2/models/paced/stats", timeout=30).json()
    return int(stats["model_stats"][0]["execution_count"])


def test_requests_waiting_at_a_busy_model_give_their_connection_to_another_address(server: CappedServer) -> None:
    rss_before = server.rss_bytes()
    executions_before = _executions(server)
    attack: list[socket.socket] = []
    try:
        for products in (FOREVER, FOREVER, *[PRODUCTS] * (CAP - 2)):  # each queued once the one before is in
            wait_until(lambda: _established(server) == len(attack), timeout=10, what="the scrapes to close")
            sock = connect_from(server, ATTACKER)
            body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [products]}]})
            sock.sendall(raw_request("POST", "/v2/models/paced/infer", body))
            attack.append(sock)
            wait_until(lambda: _queued(server) == max(0, len(attack) - 1), timeout=10, what="the request queued")

        # The heaviest address itself (as every client behind a proxy) only gets the probe reserve: no
        # request of its own is withdrawn for it.
        refused = _ask_from(server, ATTACKER, "POST", "/v2/models/add/infer", ADD_BODY)
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:300]
        assert b"kept for health probes and metrics" in refused
        assert _queued(server) == CAP - 1

        # Another address connects: the attacker's newest waiting request makes room.
        other = connect_from(server, OTHER)
        said = said_until_closed(attack[-1], 30)
        head, _, body = said.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), said[:300]
        assert b"retry-after: 1" in head.lower()
        assert b"connection: close" in head.lower()
        assert b"application/json" in head.lower()
        message = orjson.loads(body)["error"]
        assert "this client address holds the most" in message
        assert "dropped without running" in message

        # The attacker comes straight back (as its client would): it gets only the probe reserve, and the
        # other address's connection, idle until its request arrives, is not closed for it.
        again = _ask_from(server, ATTACKER, "POST", "/v2/models/add/infer", ADD_BODY)
        assert again.startswith(b"HTTP/1.1 503 "), again[:300]
        assert b"kept for health probes and metrics" in again
        with other:
            other.sendall(raw_request("POST", "/v2/models/add/infer", ADD_BODY))
            answer = read_answer(other)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["outputs"][0]["data"][0] == 3.0

        # Nothing else was cut: the run in progress and the other waiting requests are still there.
        assert not any(readable(sock) for sock in attack[:-1])
        assert _queued(server) == CAP - 2
        line = "closed 1 connection(s) of 127.0.0.2, the address holding the most"
        wait_until(lambda: line in server.log(), 5, "the WARNING line")  # the harness reads the log as it comes

        # The two endless ones' client leaves; the short ones queued behind them run and are answered.
        for sock in attack[:2]:
            sock.close()
        for sock in attack[2:-1]:
            ran = read_answer(sock)
            assert ran.startswith(b"HTTP/1.1 200 "), ran[:300]
            assert orjson.loads(ran.partition(b"\r\n\r\n")[2])["outputs"][0]["data"][0] == PRODUCTS
        assert _executions(server) - executions_before == CAP - 3  # the withdrawn one never ran
    finally:
        for sock in attack:
            sock.close()
    assert server.alive()
    assert server.probe_seconds() < PROBE_BOUND
    served = requests.post(f"{server.http_url}/v2/models/add/infer", data=ADD_BODY, timeout=30)
    assert served.status_code == 200, served.text
    assert _queued(server) == 0
    assert server.rss_bytes() - rss_before < RSS_GROWTH_BOUND
