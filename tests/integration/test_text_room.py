"""Each text model version's own room (core/text_budget.py): a text request takes its model's room before it
is tokenized and holds it until it has run, and the server-wide budget only while it is tokenized; one that
its busy model has no room for waits untokenized, holding nothing; unloading the version fails the
requests still waiting for its room and drops the room with it, and stops the run still going once its drain
has ended."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

import models
from onnxserve.config import load_config
from onnxserve.core.manager import Catalog
from onnxserve.core.registry import ModelVersion
from onnxserve.core.text_budget import SMALL_REQUEST_CHARACTERS, TEXT_CHARACTERS
from onnxserve.core.types import ModelState
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from waiting import wait_until

FOREVER = 10**9  # a blocker's largest token id: chained products until its client leaves
SECONDS = 60


@pytest.fixture
def server(tiny_text_version: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """``paced`` (explicit model control): a text model on one instance that a client can keep busy."""
    paced = models.write_version(tmp_path / "repository", "paced", 1, models.value_paced_text_model())
    shutil.copy(tiny_text_version / "tokenizer.json", paced / "tokenizer.json")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"model_config_list": [{"name": "paced", "base_path": str(paced.parent), "instance_count": 1}]})
    )
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("paced",)
    )
    running = start_in_background(load_config(config), settings, Catalog(config_file=config))
    yield running
    running.stop()


def _send(server: RunningServer, body: dict[str, object]) -> socket.socket:
    """An inference request to ``paced`` over a socket of its own; closing the socket makes its client leave."""
    data = orjson.dumps(body)
    head = "POST /v2/models/paced/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    sock = socket.create_connection((server.host, server.http_port))
    sock.sendall(head.encode() + data)
    return sock


def _text(characters: int) -> dict[str, object]:
    """Four texts counted at ``characters`` in the text budgets (each text counts ``TEXT_CHARACTERS`` more)."""
    texts = ["!" * (characters // 4 - TEXT_CHARACTERS)] * 4
    return {"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": texts}]}


def test_requests_wait_for_their_busy_models_room_untokenized_and_fail_when_it_is_unloaded(
    server: RunningServer,
) -> None:
    service = server.service
    version: ModelVersion = service.registry.resolve("paced", None)
    room, shared = version.text_room.small, service.text_budget.small
    room.limit = SMALL_REQUEST_CHARACTERS  # room for one queued request of 64 Ki characters
    tokens = {
        "inputs": [
            {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [FOREVER]},
            {"name": "attention_mask", "shape": [1, 1], "datatype": "INT64", "data": [1]},
        ]
    }
    blocker = _send(server, tokens)
    wait_until(lambda: version.scheduler.pool.busy == [1], SECONDS, "the blocker running")
    queued = _send(server, _text(SMALL_REQUEST_CHARACTERS))
    wait_until(lambda: version.scheduler.queued() == 1, SECONDS, "the first text request tokenized and queued")
    assert room.used == SMALL_REQUEST_CHARACTERS
    assert shared.used == 0  # tokenized: it holds only its model's room while it waits

    answers: list[httpx.Response] = []

    def waiting_request() -> None:
        url = f"{server.http_url}/v2/models/paced/infer"
        answers.append(httpx.post(url, json=_text(SMALL_REQUEST_CHARACTERS), timeout=SECONDS))

    waiters = [threading.Thread(target=waiting_request) for _ in range(2)]
    for thread in waiters:
        thread.start()
    wait_until(lambda: room.waiting() == 2, SECONDS, "two requests waiting for the model's room")
    assert shared.used == 0  # not tokenized, holding nothing
    assert version.scheduler.incoming == 0
    leaving = _send(server, _text(SMALL_REQUEST_CHARACTERS))  # a third waits, then its client leaves
    wait_until(lambda: room.waiting() == 3, SECONDS, "a third request waiting")
    leaving.close()
    wait_until(lambda: room.waiting() == 2, SECONDS, "the request whose client left gone from the line")
    assert room.used == SMALL_REQUEST_CHARACTERS

    assert service.manager is not None
    service.manager.drain_seconds = 0  # unload without waiting for the requests still open
    unloaded: list[int] = []
    unload = threading.Thread(
        target=lambda: unloaded.append(
            httpx.post(f"{server.http_url}/v2/repository/models/paced/unload", timeout=SECONDS).status_code
        )
    )
    unload.start()
    # (unloading, or already unloaded: its drain time is 0, and its running run is cut at once)
    wait_until(lambda: version.state is not ModelState.READY, SECONDS, "the version unloading")
    # The running request's run is stopped once the drain has ended (here at once), and its client answered:
    blocker.settimeout(SECONDS)
    answer = blocker.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 503"), answer
    assert "version 1 was unloaded while this request ran (its drain ended); its run was stopped" in answer
    blocker.close()
    for thread in waiters:
        thread.join(SECONDS)
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
    assert all("version 1 was unloaded before this request could run" in a.json()["error"] for a in answers)
    assert room.waiting() == 0
    queued.close()  # the request tokenized before the unload leaves the stopped queue, and its room
    wait_until(lambda: room.used == 0, SECONDS, "the queued request's room given back")
    unload.join(SECONDS)
    assert unloaded == [200]
    assert "paced" not in service.registry.names()
    assert shared.used == 0
