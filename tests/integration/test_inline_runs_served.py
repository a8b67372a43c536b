"""Tiny models run on the event loop (``core.inline_runs``) in a real server, and a model whose run time
its input values decide never does: while clients keep such a model busy with long runs, the probes and
the tiny model keep answering, the tiny model's runs still on the loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import models
from onnxserve.config import parse_config
from onnxserve.core.registry import ModelVersion
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

RUN_SECONDS = 0.3
"""About how long one hostile run takes (calibrated with ONNX Runtime on this machine)."""

HOSTILE_CLIENTS = 4
HOSTILE_SECONDS = 2.0

ADD_BODY = {
    "inputs": [
        {"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        {"name": "b", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16},
    ]
}


def _products_for(seconds: float) -> int:
    session = ort.InferenceSession(models.value_paced_model("paced", 64).SerializeToString())
    probe = 400
    session.run(None, {"x": np.array([[probe]], dtype=np.float32)})
    started = time.perf_counter()
    session.run(None, {"x": np.array([[probe]], dtype=np.float32)})
    return max(1, int(seconds / ((time.perf_counter() - started) / probe)))


@pytest.fixture
def server(tmp_path: Path) -> RunningServer:
    models.write_version(tmp_path, "add", 1, models.add_model())
    models.write_version(tmp_path, "paced", 1, models.value_paced_model("paced", 64))
    entries = [
        {"name": "add", "base_path": "add", "inline_run_us": 1000},  # generous: this machine is loaded
        {"name": "paced", "base_path": "paced"},
    ]
    config = parse_config({"model_config_list": entries}, "inline test", tmp_path)
    running = start_in_background(config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    yield running
    running.stop()


def _version(server: RunningServer, name: str) -> ModelVersion:
    return server.service.registry.resolve(name, None)


def _inline_executions(server: RunningServer) -> int:
    inline = getattr(_version(server, "add").scheduler, "inline", None)
    assert inline is not None
    return int(inline.executions)


def test_probes_and_a_tiny_model_answer_while_a_value_paced_model_runs_long(server: RunningServer) -> None:
    assert getattr(_version(server, "paced").scheduler, "inline", "absent") is None  # its Loop rules it out
    products = _products_for(RUN_SECONDS)
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        for _ in range(30):
            assert client.post("/v2/models/add/infer", json=ADD_BODY).status_code == 200
            if _inline_executions(server):
                break
        assert _inline_executions(server) > 0
        before = _inline_executions(server)

        stop = time.monotonic() + HOSTILE_SECONDS
        hostile_answers: list[int] = []

        def hostile() -> None:
            body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [products]}]}
            with httpx.Client(base_url=server.http_url, timeout=120) as own:
                while time.monotonic() < stop:
                    hostile_answers.append(own.post("/v2/models/paced/infer", json=body).status_code)

        threads = [threading.Thread(target=hostile) for _ in range(HOSTILE_CLIENTS)]
        for thread in threads:
            thread.start()
        probes: list[float] = []
        try:
            deadline = time.monotonic() + 60
            while not _version(server, "paced").scheduler.pool.busy[0] and time.monotonic() < deadline:
                time.sleep(0.005)
            while time.monotonic() < stop:
                started = time.perf_counter()
                assert client.get("/v2/health/ready").status_code == 200
                probes.append(time.perf_counter() - started)
                answer = client.post("/v2/models/add/infer", json=ADD_BODY)
                assert answer.status_code == 200
                assert answer.json()["outputs"][0]["data"] == [3.0] * 16
        finally:
            for thread in threads:
                thread.join()
        assert set(hostile_answers) == {200}
        assert probes
        assert max(probes) < 1.0, f"a probe took {max(probes):.2f} s while the paced model ran"
        assert _inline_executions(server) > before  # the tiny model's runs stayed on the loop meanwhile
        assert _version(server, "paced").stats.snapshot().execution_count >= HOSTILE_CLIENTS
