"""JSON bodies dense with numbers just under 4 MiB are decoded in worker processes (issue 14, outside attack
rt9 N2).

A JSON body under ``offload.PROCESS_BYTES`` was parsed in the server unless it held many arrays, objects or
strings: 48 bodies of 4 MiB - 1 bytes of about two million numbers each at once (V2 ``"data":[0,0,...]``,
TF Serving ``{"instances":[[0,0,...]]}``) held readiness probes 1.2 to 2.5 s; ten bytes more, and so
decoded in the workers, 0.1 to 0.2 s. Now the values (commas) are counted too. Asserted against a real
server under a memory cap: such bodies, V2 and TF Serving at once, are answered correctly while probes
(fresh connections) answer under a generous bound and a normal client is served, and every one of them
was decoded in a worker (``onnxserve_json_bodies_decoded_total``); small normal requests are still
decoded on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import CappedServer, serve_capped
from prometheus_client.parser import text_string_to_metric_families

import models
from onnxserve.protocols.offload import PROCESS_BYTES

PROBE_BOUND_S = 1.0  # generous: the box running the suite is shared and loaded
PROBES = ("/v2/health/live", "/v2/health/ready")
V2 = "/v2/models/rows/infer"
TFS = "/v1/models/rows:predict"
BODIES = 6  # of each protocol, at once


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    repo: Path = tmp_path_factory.mktemp("dense-numbers")
    rows = models.parse(
        """
        rows (float[batch, n] x) => (float[batch] total) {
            axes = Constant <value = int64[1] {1}> ()
            total = ReduceSum <keepdims = 0> (x, axes)
        }
        """
    )
    models.write_version(repo, "rows", 1, rows)
    models.write_version(repo, "strings", 1, models.strings_model())
    with serve_capped(repo) as running:
        yield running


def _padded(body: bytes) -> bytes:
    """``body`` made exactly one byte under ``PROCESS_BYTES`` with trailing spaces."""
    assert len(body) < PROCESS_BYTES
    return body + b" " * (PROCESS_BYTES - 1 - len(body))


def ones(count: int) -> bytes:
    return b",".join([b"1"] * count)


COUNT = (PROCESS_BYTES - 200) // 2
"""Numbers in one body: two bytes each (``1,``), about two million."""

V2_BODY = _padded(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,%d],"data":[%s]}]}' % (COUNT, ones(COUNT)))
TFS_BODY = _padded(b'{"instances":[[%s]]}' % ones(COUNT))


def decoded(server: CappedServer) -> dict[str, float]:
    """``onnxserve_json_bodies_decoded_total`` by where."""
    text = requests.get(server.http_url + "/metrics", timeout=30).text
    return {
        sample.labels["where"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "onnxserve_json_bodies_decoded_total"
    }


def small_total(server: CappedServer) -> float:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
    response = requests.post(server.http_url + V2, json=doc, timeout=60)
    assert response.status_code == 200, response.text
    return float(response.json()["outputs"][0]["data"][0])


def total(answer: dict[str, Any]) -> float:
    """The one row's total in a V2 or a TF Serving answer."""
    (value,) = answer["predictions"] if "predictions" in answer else answer["outputs"][0]["data"]
    return float(value)


def post(server: CappedServer, path: str, body: bytes) -> requests.Response:
    return requests.post(server.http_url + path, data=body, headers={"Content-Type": "application/json"}, timeout=300)


def test_number_dense_bodies_just_under_4_mib_are_decoded_in_workers_while_probes_answer(
    server: CappedServer,
) -> None:
    assert len(V2_BODY) == len(TFS_BODY) == PROCESS_BYTES - 1
    before = decoded(server)
    answers: list[requests.Response] = []
    posts = [(V2, V2_BODY), (TFS, TFS_BODY)] * BODIES
    threads = [threading.Thread(target=lambda p=p: answers.append(post(server, *p)), daemon=True) for p in posts]
    for thread in threads:
        thread.start()
    slowest, served = 0.0, 0
    stop = time.monotonic() + 240
    while any(t.is_alive() for t in threads) and time.monotonic() < stop:
        for path in PROBES:
            slowest = max(slowest, server.probe_seconds(path, timeout=30))
        assert small_total(server) == 8.0
        served += 1
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "the bodies were not all answered"
    assert [a.status_code for a in answers] == [200] * len(posts), [a.text[:300] for a in answers]
    assert [total(a.json()) for a in answers] == [float(COUNT)] * len(posts)
    assert slowest < PROBE_BOUND_S
    assert served >= 1
    after = decoded(server)
    assert after["worker"] - before["worker"] == len(posts)  # each of them, none in the server
    assert after["thread"] == before["thread"]
    assert server.alive(), server.log()[-2000:]


@pytest.mark.parametrize(
    ("path", "doc"),
    [
        (V2, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.25 * i for i in range(16)]}]}),
        (TFS, {"instances": [[0.25 * i for i in range(16)]]}),
        (
            "/v2/models/strings/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [" ".join(["word"] * 12)]}]},
        ),
    ],
    ids=["v2-1x16-fp32", "tfs-1x16-fp32", "v2-12-word-text"],
)
def test_a_small_normal_request_is_decoded_on_the_event_loop(server: CappedServer, path: str, doc: object) -> None:
    before = decoded(server)
    response = requests.post(server.http_url + path, json=doc, timeout=60)
    assert response.status_code == 200, response.text
    after = decoded(server)
    assert after["loop"] - before["loop"] == 1
    assert (after["thread"], after["worker"]) == (before["thread"], before["worker"])
