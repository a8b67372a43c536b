"""A model version that fails to load gives back what its load took.

Outside attack rt18: each failed load kept what it had read (a model file that is not ONNX: its bytes, 286 MB
a try for a 300 MB file; a model that ran out of memory as it loaded: 670 MB a try), held by the failure's
traceback in a reference cycle only the garbage collector frees, and by the allocator. Explicit loads need a
control token, but a repository poll retries a changed file on its own."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import numpy as np
import onnx
import psutil
import requests
from harness import serve_capped
from onnx import TensorProto, helper, numpy_helper

GARBAGE_BYTES = 100 * 1024 * 1024


def test_failed_loads_give_back_what_they_read(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    model = repository / "bad" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(os.urandom(GARBAGE_BYTES))  # not a protobuf message: read whole, then refused
    with serve_capped(repository, "--model-control-mode", "explicit") as server:
        rest = server.rss_bytes()
        for attempt in range(3):
            answer = requests.post(f"{server.http_url}/v2/repository/models/bad/load", timeout=120)
            assert answer.status_code == 400, answer.text
            assert "not an ONNX model" in answer.json()["error"]
            os.utime(model, (attempt + 1e9, attempt + 1e9))  # a changed file is tried again, not remembered
        # before: +286 MB a try for a 300 MB file; now the reading's memory goes back after each
        assert server.rss_bytes() - rest < GARBAGE_BYTES
        assert server.probe_seconds() < 1.0


def test_a_load_short_of_memory_is_not_called_corrupt(tmp_path: Path) -> None:
    """protobuf reports that its arena could not grow as a parse error; a good file read while the process is
    short of memory was refused as "not an ONNX model" (rt18, rt19), which sends its operator after a corrupt
    file that is not there."""
    size = 150 * 1024 * 1024
    weights = numpy_helper.from_array(np.zeros(size, np.int8), "weights")
    output = helper.make_tensor_value_info("y", TensorProto.INT8, None)
    graph = helper.make_graph([helper.make_node("Identity", ["weights"], ["y"])], "g", [], [output], [weights])
    repository = tmp_path / "repository"
    model = repository / "large" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph), model)
    del weights, graph
    with serve_capped(repository, "--model-control-mode", "explicit") as server:
        url = f"{server.http_url}/v2/repository/models/large/load"
        mapped = psutil.Process(server.process.pid).memory_info().vms
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_AS)
        # room to read the file's bytes, not to parse them (protobuf's arena needs about as much again)
        resource.prlimit(server.process.pid, resource.RLIMIT_AS, (mapped + size + size // 8, hard))
        try:
            answer = requests.post(url, timeout=120)
        finally:
            resource.prlimit(server.process.pid, resource.RLIMIT_AS, (hard, hard))
        assert answer.status_code == 400, answer.text
        assert "no memory to read this model now" in answer.json()["error"], answer.text
        assert "not an ONNX model" not in answer.json()["error"], answer.text
        assert server.probe_seconds() < 1.0
        os.utime(model)  # the same file, tried again with the memory back: it loads
        assert requests.post(url, timeout=120).status_code == 200
        assert "Traceback" not in server.log()
