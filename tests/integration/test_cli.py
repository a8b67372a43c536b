"""The ``onnxserve`` command as a user runs it: a real process, real ports, real signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import models

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]
LISTENING = re.compile(r"HTTP \(.*\) on http://([\d.]+):(\d+)")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ONNXSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def served_process(numeric_repository: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [*ONNXSERVE, "serve", "--model-repository", str(numeric_repository), "--http-port", "0", "--grpc-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    url = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        match = LISTENING.search(line)
        if match:
            url = f"http://{match.group(1)}:{match.group(2)}"
            break
    assert url, "the server never said where it listens"
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()
    process.stderr.close()


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"onnxserve \d+\.\d+\.\d+\n", result.stdout)


def test_serve_needs_exactly_one_source(tmp_path: Path) -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    assert "--config" in result.stderr
    assert "--model-repository" in result.stderr
    result = run_cli("serve", "--config", "a.json", "--model-repository", str(tmp_path))
    assert result.returncode == 2


def test_bad_config_stops_startup_with_one_message(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_config_list": [{"name": "m", "base_path": "m", "max_batch": 3}]}))
    result = run_cli("serve", "--config", str(config), "--http-port", "0", "--grpc-port", "0")
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "model_config_list[0].max_batch" in result.stderr
    assert "unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_broken_model_stops_the_whole_server(tmp_path: Path) -> None:
    models.write_version(tmp_path, "good", 1, models.add_model())
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not a protobuf")
    result = run_cli("serve", "--model-repository", str(tmp_path), "--http-port", "0", "--grpc-port", "0")
    assert result.returncode == 2
    assert "not an ONNX model" in result.stderr
    assert "broken" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_answers_and_stops_cleanly_on_sigterm(
    served_process: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = served_process
    assert url.startswith("http://127.0.0.1:"), "the default bind must be loopback"
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
    response = httpx.post(f"{url}/v2/models/fixed/infer", json=body)
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [2, 4, 6, 8, 10, 12]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
