"""Large JSON bodies are decoded outside the interpreter that serves (issue 14, finding 4, JSON part).

orjson and the standard parser hold Python's global lock for the whole parse of a body: four ~60 MB
JSON bodies parsed in codec threads held liveness and readiness probes for seconds. Bodies from
``offload.PROCESS_BYTES`` up are now decoded in worker processes. Asserted against a real server under a
memory cap: probes (live and ready, fresh connections) answer under a generous bound while four such
bodies are decoded and a normal client is served; a worker killed mid-body gives the documented
refusal and the next body is decoded by a new worker; a bad large body gets the same 400 as a small
one; no worker exists before the first large body. Also here: embedding answers count in
``--max-inflight-bytes`` like V2 answers.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import psutil
import pytest
import requests
from harness import CappedServer, serve_capped

import models
from onnxserve.protocols.offload import PROCESS_BYTES, WATCHDOG_NAME
from waiting import wait_until

PROBE_BOUND_S = 1.0  # generous: the box running the suite is shared and loaded
PROBES = ("/v2/health/live", "/v2/health/ready")
MIB = 1024 * 1024
WORKER_LOST = "the worker decoding this large JSON body stopped"
BUDGET_FULL = "bytes of requests and answers in flight (--max-inflight-bytes)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    repo: Path = tmp_path_factory.mktemp("large-json")
    models.write_version(repo, "total", 1, models.total_model())
    with serve_capped(repo) as running:
        yield running


def workers(server: CappedServer) -> list[psutil.Process]:
    """The decoding workers: the fork server's children (the server's grandchildren), not their watchdogs."""
    process = psutil.Process(server.process.pid)
    return [p for p in process.children(recursive=True) if p.ppid() != process.pid and p.name() != WATCHDOG_NAME]


def v2_body(mib: float, tail: bytes = b"") -> tuple[bytes, float]:
    values = np.random.default_rng(1).random(int(mib * MIB) // 11).astype(np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [values.size], "data": values}]}
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return body[:-1] + tail + b"}", float(values.astype(np.float64).sum())


def tfs_nan_body(mib: float) -> bytes:
    count = int(mib * MIB) // 11
    return b'{"inputs": [NaN' + b", 0.1234567" * (count - 1) + b"]}"


def post(server: CappedServer, path: str, body: bytes) -> requests.Response:
    return requests.post(server.http_url + path, data=body, headers={"Content-Type": "application/json"}, timeout=300)


def small_sum(server: CappedServer) -> float:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.5]}]}
    response = requests.post(f"{server.http_url}/v2/models/total/infer", json=doc, timeout=60)
    assert response.status_code == 200, response.text
    return float(response.json()["outputs"][0]["data"][0])


class Attack:
    """Runs the posts in threads; meanwhile probes live and ready, and serves a normal client."""

    def __init__(self, server: CappedServer, posts: list[tuple[str, bytes]]) -> None:
        self.server = server
        self.responses: list[requests.Response] = []
        self.threads = [threading.Thread(target=self._post, args=p, daemon=True) for p in posts]
        self.slowest = 0.0
        self.normal_served = 0

    def _post(self, path: str, body: bytes) -> None:
        self.responses.append(post(self.server, path, body))

    def run(self, deadline_s: float = 240) -> None:
        for thread in self.threads:
            thread.start()
        stop = time.monotonic() + deadline_s
        while any(t.is_alive() for t in self.threads) and time.monotonic() < stop:
            for path in PROBES:
                self.slowest = max(self.slowest, self.server.probe_seconds(path, timeout=30))
            assert small_sum(self.server) == 6.5
            self.normal_served += 1
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "the attack did not finish"


def test_no_worker_before_the_first_large_body(server: CappedServer) -> None:
    assert small_sum(server) == 6.5
    assert post(server, "/v2/models/total/infer", v2_body(1)[0]).status_code == 200  # under the threshold
    assert workers(server) == []


def test_four_60_mb_json_bodies_at_once_leave_probes_and_clients_served(server: CappedServer) -> None:
    body, expected = v2_body(60)
    nan = tfs_nan_body(60)
    attack = Attack(server, [("/v2/models/total/infer", body)] * 2 + [("/v1/models/total:predict", nan)] * 2)
    attack.run()
    assert [r.status_code for r in attack.responses] == [200] * 4, [r.text[:300] for r in attack.responses]
    v2 = [r.json() for r in attack.responses if r.text.startswith('{"model_name"')]
    assert [d["outputs"][0]["data"][0] for d in v2] == [pytest.approx(expected, rel=1e-3)] * 2
    assert sum("NaN" in r.text for r in attack.responses) == 2  # NaN in, NaN out
    assert attack.slowest < PROBE_BOUND_S
    assert attack.normal_served >= 1
    assert server.alive(), server.log()[-2000:]
    assert 1 <= len(workers(server)) <= 2  # at most PROCESSES, started by the first large body


def test_a_worker_killed_mid_body_refuses_that_body_and_the_next_one_is_served(server: CappedServer) -> None:
    nan = tfs_nan_body(40)  # the slow path (NaN): seconds of parsing to kill the worker in
    outcome: list[requests.Response] = []
    poster = threading.Thread(target=lambda: outcome.append(post(server, "/v1/models/total:predict", nan)))
    poster.start()

    def busy_worker() -> bool:
        busy = [p for p in workers(server) if p.cpu_percent(interval=0.05) > 20]
        for process in busy[:1]:
            process.kill()
        return bool(busy) or not poster.is_alive()

    wait_until(busy_worker, timeout=120, what="a worker decoding the body")
    poster.join(timeout=120)
    refused = outcome[0]
    assert refused.status_code == 429, refused.text[:300]  # TF Serving's RESOURCE_EXHAUSTED (V2: 503)
    assert WORKER_LOST in refused.json()["error"]
    assert refused.headers["Retry-After"] == "1"
    assert server.alive(), server.log()[-2000:]
    body, expected = v2_body(PROCESS_BYTES / MIB + 1)
    again = post(server, "/v2/models/total/infer", body)
    assert again.status_code == 200, again.text[:300]
    assert again.json()["outputs"][0]["data"][0] == pytest.approx(expected, rel=1e-3)
    assert small_sum(server) == 6.5


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b', "bogus": 1', "unknown key 'bogus' in the inference request"),
        (b', "outputs": [{"name": 7}]', "outputs[0] needs a 'name' string"),
    ],
)
def test_a_bad_large_json_body_gets_the_same_400_as_a_small_one(
    server: CappedServer, tail: bytes, message: str
) -> None:
    answers = []
    for mib in (0.01, PROCESS_BYTES / MIB + 1):
        body, _ = v2_body(mib, tail)
        answers.append(post(server, "/v2/models/total/infer", body))
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json()["error"] == answers[1].json()["error"]
    assert message in answers[1].json()["error"]
    assert small_sum(server) == 6.5


# --- embedding answers in the in-flight budget -------------------------------------------------------


@pytest.fixture(scope="module")
def text_server(tiny_text_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root = tmp_path_factory.mktemp("json-texts")
    shutil.copytree(tiny_text_version, root / "tiny" / "1")
    # 4 MiB in flight; a gRPC message may take all of it, so answers fit only alone in the budget
    with serve_capped(root, "--max-inflight-bytes", str(4 * MIB), cap_bytes=4 * 1024**3) as running:
        yield running


def _stalled_body(server: CappedServer) -> socket.socket:
    """A request that announced 1 MB, sends none of it, and so holds 1 MB of the budget."""
    sock = socket.create_connection((server.host, server.http_port), timeout=30)
    head = (
        "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    sock.sendall(head.encode("ascii"))
    return sock


@pytest.mark.parametrize("route", ["/v1/embeddings", "/embed?model=tiny"])
def test_embedding_answers_are_refused_while_the_budget_is_full(text_server: CappedServer, route: str) -> None:
    texts = ["hello world"] * 2048  # 2048 vectors of 32 floats: a 256 KiB answer, counted
    doc = {"model": "tiny", "input": texts} if route == "/v1/embeddings" else {"inputs": texts}

    def ask() -> requests.Response:
        return requests.post(text_server.http_url + route, json=doc, timeout=60)

    alone = ask()
    assert alone.status_code == 200, alone.text[:300]  # alone in the budget: served
    stalled = _stalled_body(text_server)
    try:
        answers: list[requests.Response] = []

        def refused() -> bool:
            answers.append(ask())
            return answers[-1].status_code != 200

        wait_until(refused, timeout=30, what="the embedding answer to be refused")
        busy = answers[-1]
        assert busy.status_code == 429, busy.text[:300]  # OpenAI's and TEI's RESOURCE_EXHAUSTED
        assert BUDGET_FULL in busy.text
        assert busy.headers["Retry-After"] == "1"
        one = {"model": "tiny", "input": "hello"} if route == "/v1/embeddings" else {"inputs": "hello"}
        small = requests.post(text_server.http_url + route, json=one, timeout=60)
        assert small.status_code == 200, small.text[:300]  # small answers are not counted: still served
    finally:
        stalled.close()
    wait_until(lambda: ask().status_code == 200, timeout=30, what="the budget to come back")
    assert text_server.alive()
