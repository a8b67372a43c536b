"""Text requests queued at a busy model hold their model's room, not the server's. An outside attack kept a
one-instance text model busy and sent it four requests of 64 Ki characters: tokenized, they waited in its
queue holding the server-wide small text pool (256 Ki characters), and a 600-character request to another,
idle model waited 22.6 s for room (probes up to 1.9 s). Now a text request holds the server-wide budget
only while it is tokenized, and its own model version's room while it waits and runs
(``core.text_budget``): the idle model's request is answered while the busy model still runs.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from harness import CappedServer
from watch import Watch

import models
from onnxserve.core.text_budget import SMALL_CHARACTERS_AT_ONCE, SMALL_REQUEST_CHARACTERS, TEXT_CHARACTERS
from waiting import wait_until

CAP = 4 * 1024**3
RSS_BOUND = 1024**3
PROBE_BOUND = 2.0  # generous: the box running the suite is loaded
SECONDS = 60
FOREVER = 10**9  # a blocker's largest token id: chained products until its client leaves
FLOODS = SMALL_CHARACTERS_AT_ONCE // SMALL_REQUEST_CHARACTERS  # what fills the small pool: 4


@pytest.fixture(scope="module")
def server(tiny_text_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    """``tiny``: the tiny BERT; ``paced``: a text model on one instance that a client can keep busy."""
    root = tmp_path_factory.mktemp("text-room")
    paced = models.write_version(root / "repository", "paced", 1, models.value_paced_text_model())
    shutil.copy(tiny_text_version / "tokenizer.json", paced / "tokenizer.json")
    config = root / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_config_list": [
                    {"name": "tiny", "base_path": str(tiny_text_version.parent)},
                    {"name": "paced", "base_path": str(paced.parent), "instance_count": 1},
                ]
            }
        )
    )
    with CappedServer(["--config", str(config)], cap_bytes=CAP) as running:
        yield running


def _blocker(server: CappedServer) -> socket.socket:
    """A request that keeps ``paced``'s one instance busy until its client leaves (closes the socket)."""
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [FOREVER]},
                {"name": "attention_mask", "shape": [1, 1], "datatype": "INT64", "data": [1]},
            ]
        }
    )
    head = "POST /v2/models/paced/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    sock = socket.create_connection((server.host, server.http_port))
    sock.sendall(head.encode() + body)
    return sock


def _queue_depth(server: CappedServer, model: str) -> float:
    scrape = requests.get(f"{server.http_url}/metrics", timeout=SECONDS).text
    prefix = f'onnxserve_queue_depth{{model="{model}"'
    return next((float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines() if line.startswith(prefix)), 0.0)


def _text_body(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def test_a_busy_model_delays_only_its_own_text_requests(server: CappedServer) -> None:
    # counted at 64 Ki characters (each text counts TEXT_CHARACTERS more): a small request
    flood = _text_body(["!" * (SMALL_REQUEST_CHARACTERS // 4 - TEXT_CHARACTERS)] * 4)
    statuses: list[int] = []

    def send_flood() -> None:
        answer = requests.post(f"{server.http_url}/v2/models/paced/infer", json=flood, timeout=SECONDS)
        statuses.append(answer.status_code)

    with Watch(server) as prober:
        blocker = _blocker(server)
        try:
            floods = [threading.Thread(target=send_flood) for _ in range(FLOODS)]
            for thread in floods:
                thread.start()
            # all four tokenized and queued behind the blocker, holding their room
            wait_until(lambda: _queue_depth(server, "paced") == FLOODS, SECONDS, "the floods queued at paced")
            small = requests.post(
                f"{server.http_url}/v2/models/tiny/infer", json=_text_body(["word " * 120]), timeout=SECONDS
            )
            assert small.status_code == 200, small.text[:500]
            assert small.elapsed.total_seconds() < 10  # generous: one run of the tiny model, not the flood's wait
            blocker.setblocking(False)
            with pytest.raises(BlockingIOError):
                blocker.recv(1)  # the busy model still runs: the idle model's request did not wait for it
            assert _queue_depth(server, "paced") == FLOODS
        finally:
            blocker.close()  # the blocker's client leaves: its run stops and the floods run
        for thread in floods:
            thread.join(SECONDS)
        assert statuses == [200] * FLOODS
    assert server.alive(), server.log()[-3000:]
    assert not prober.failures, prober.failures
    assert prober.worst_probe < PROBE_BOUND
    assert prober.peak_rss < RSS_BOUND
