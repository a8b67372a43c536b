"""A drain that times out answers every text request still open 503 in JSON, within a slice of tokenizing.

An outside attack sent twelve requests of a million one-character texts to one-instance text models (a
request now sends at most 2,048 texts) and a SIGTERM with ``--drain-timeout 5``: a tokenizer call ran about
14 s and could not be stopped, so the process exited after 20 s, two clients got uvicorn's plain-text 500,
one a bare disconnect, and the log got CancelledError tracebacks. Large requests are now tokenized in slices
(``core.text_slices``) that stop once the drain has ended, and the requests waiting for the server-wide text
budget or their model's room are refused then too (``server.lifecycle``).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from onnxserve.config import load_config
from onnxserve.core.pipeline import MAX_REQUEST_CHARACTERS, MAX_REQUEST_TEXTS
from onnxserve.core.registry import ModelVersion
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from waiting import wait_until

TEXTS = MAX_REQUEST_TEXTS  # as many texts as one request may send, each of a token a character:
TEXT = "!" * (MAX_REQUEST_CHARACTERS // MAX_REQUEST_TEXTS)  # seconds of tokenizing, in slices
DRAIN = 1.0
SECONDS = 60
EXIT_BOUND = DRAIN + 5.0  # generous: a slice of tokenizing, the refusals sent, uvicorn's 1 s; the box is loaded


@pytest.fixture
def server(tiny_text_version: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """``a`` and ``b``: the tiny BERT twice, each on one instance."""
    config = tmp_path / "config.json"
    entries = [{"name": n, "base_path": str(tiny_text_version.parent), "instance_count": 1} for n in ("a", "b")]
    config.write_text(json.dumps({"model_config_list": entries}))
    settings = ServerSettings(http_port=0, grpc_port=0, log_level="warning", drain_timeout=DRAIN)
    running = start_in_background(load_config(config), settings)
    yield running
    running.stop()


BODY = orjson.dumps({"inputs": [{"name": "text", "shape": [TEXTS], "datatype": "BYTES", "data": [TEXT] * TEXTS}]})


def _send(server: RunningServer, model: str) -> socket.socket:
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    sock = socket.create_connection((server.host, server.http_port))
    sock.settimeout(SECONDS)
    sock.sendall(head.encode() + BODY)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, str]]:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head, "the connection closed without an answer"
    return int(head.split()[1]), json.loads(body)


def test_a_drain_that_times_out_answers_requests_being_tokenized_or_waiting_for_text_room_503(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service = server.service
    room: ModelVersion = service.registry.resolve("a", None)
    service.text_budget.large.limit = MAX_REQUEST_CHARACTERS  # one such request tokenized at a time
    tokenizing = _send(server, "a")  # takes a's room and the whole server-wide budget: a million characters
    wait_until(lambda: service.text_budget.large.used > 0, SECONDS, "the first request being tokenized")
    shared = _send(server, "b")  # b's room is free: it waits for the server-wide budget
    wait_until(lambda: service.text_budget.large.waiting() == 1, SECONDS, "a request waiting for the budget")
    queued = _send(server, "a")  # a's room is held: it waits for it, untokenized
    wait_until(lambda: room.text_room.large.waiting() == 1, SECONDS, "a request waiting for its model's room")
    assert service.text_budget.large.used > 0, "the first request was still to be tokenizing for this test"

    signalled = time.monotonic()
    server.drain()
    answers = [_answer(sock) for sock in (tokenizing, shared, queued)]
    server._thread.join(SECONDS)
    service.close()  # what the process does last: it waits for the tokenizer threads
    took = time.monotonic() - signalled

    # A request tokenizes at most 2,048 texts and 1 Mi characters (about a second), so the first may have been
    # answered within the drain (200), or be running when it ended; the others waited behind it. Every request
    # still open when the drain ended is answered 503 in JSON.
    first, rest = answers[0], answers[1:]
    assert first[0] == 200 or (first[0] == 503 and "when its drain ended" in first[1]["error"]), answers
    assert [status for status, _ in rest] == [503, 503], answers
    assert all("when its drain ended" in body["error"] for _, body in rest), answers
    assert took < EXIT_BOUND, f"the shutdown took {took:.1f} s with a drain timeout of {DRAIN} s"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
