"""NVIDIA's perf_analyzer (shipped in tritonclient) measures onnxserve over gRPC and HTTP without errors."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from onnxserve.server.lifecycle import RunningServer

PERF_ANALYZER = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))


def cuda_runtime_dir() -> str | None:
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found]
    except ImportError:
        return None
    lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    return str(lib) if lib.is_dir() else None


def missing() -> str | None:
    if PERF_ANALYZER is None:
        return "perf_analyzer is not installed (tritonclient ships it)"
    if cuda_runtime_dir() is None:
        return "the PyPI package nvidia-cuda-runtime-cu12 is not installed"
    if ctypes.util.find_library("b64") is None:
        return "the Debian package libb64-0d is not installed (make test installs it when run as root)"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def run_perf_analyzer(*args: str) -> subprocess.CompletedProcess[str]:
    assert PERF_ANALYZER is not None
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cuda_runtime_dir()}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    command = [
        PERF_ANALYZER,
        *args,
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "30",
        "--stability-percentage",
        "100",
        "--max-trials",
        "5",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)


def inference_count(server: RunningServer, model: str) -> int:
    stats = httpx.get(f"{server.http_url}/v2/models/{model}/stats").json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


@pytest.mark.parametrize(
    ("protocol", "extra"),
    [
        ("grpc", []),
        ("http", []),
        ("http", ["--input-tensor-format", "json", "--output-tensor-format", "json"]),
    ],
    ids=["grpc", "http-binary", "http-json"],
)
def test_perf_analyzer_runs_against_onnxserve(numeric_server: RunningServer, protocol: str, extra: list[str]) -> None:
    url = numeric_server.grpc_address if protocol == "grpc" else f"{numeric_server.host}:{numeric_server.http_port}"
    before = inference_count(numeric_server, "add")
    # "add" batches (max_batch_size 8): --shape omits the batch dimension, -b sets it.
    result = run_perf_analyzer("-m", "add", "-i", protocol, "-u", url, "-b", "2", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "throughput" in result.stdout
    assert inference_count(numeric_server, "add") > before


def test_perf_analyzer_with_a_non_batching_model(numeric_server: RunningServer) -> None:
    # "fixed" has max_batch_size 0 (its first dim is fixed): perf_analyzer sends [2, 3] as it is.
    result = run_perf_analyzer("-m", "fixed", "-i", "grpc", "-u", numeric_server.grpc_address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "throughput" in result.stdout
