"""A model version that fails to load gives back what its load took.

Outside attack rt18: each failed load kept what it had read (a model file that is not ONNX: its bytes, 286 MB
a try for a 300 MB file; a model that ran out of memory as it loaded: 670 MB a try), held by the failure's
traceback in a reference cycle only the garbage collector frees, and by the allocator. Explicit loads need a
control token, but a repository poll retries a changed file on its own."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from harness import serve_capped

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
