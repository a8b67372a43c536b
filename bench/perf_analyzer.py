"""NVIDIA's perf_analyzer (shipped in tritonclient) run once per measured point; its ``-f`` CSV parsed.

On a CPU machine it needs Debian's libb64-0d and libcudart from the PyPI package
nvidia-cuda-runtime-cu12 (found through LD_LIBRARY_PATH), as in tests/integration/test_perf_analyzer.py.
"""

from __future__ import annotations

import csv
import ctypes.util
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.settings import ROOT
from bench.stats import Sample

Protocol = Literal["grpc", "http"]

BINARY = ROOT / ".venv" / "bin" / "perf_analyzer"
STABILITY_PERCENTAGE = 1000
"""perf_analyzer's stability check (max/min of its last 3 windows within this percentage), loosened so
far that a run is its first 3 windows: on a shared machine a stricter check fails runs outright. The
bench's own repeated runs and their median deal with the noise."""
MAX_TRIALS = 6
ATTEMPTS = 2
"""A run that perf_analyzer calls unstable (or that fails) is tried once more before it counts as failed."""


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed (the message holds its last output lines)."""


def _cuda_runtime_dir() -> Path | None:
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    return lib if lib.is_dir() else None


def missing() -> str | None:
    """Why perf_analyzer cannot run here, or None when it can."""
    if not BINARY.is_file():
        return f"{BINARY} is missing (the dev extra's tritonclient ships it: make install-dev)"
    if _cuda_runtime_dir() is None:
        return "the PyPI package nvidia-cuda-runtime-cu12 is missing (perf_analyzer loads libcudart even on a CPU)"
    if ctypes.util.find_library("b64") is None:
        return "the Debian package libb64-0d is missing (make system-deps installs it when run as root)"
    return None


@dataclass(frozen=True)
class PerfAnalyzer:
    window_ms: int
    timeout_s: float = 180.0

    def run(
        self,
        model: str,
        protocol: Protocol,
        url: str,
        concurrency: int,
        shapes: Mapping[str, Sequence[int]],
        input_data: str | Path = "zero",
        json_tensors: bool = False,
    ) -> Sample:
        """One perf_analyzer measurement at one concurrency; throughput in inferences (rows) per second."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._run_once(model, protocol, url, concurrency, shapes, input_data, json_tensors)
            except PerfAnalyzerError:
                if attempt == ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _run_once(
        self,
        model: str,
        protocol: Protocol,
        url: str,
        concurrency: int,
        shapes: Mapping[str, Sequence[int]],
        input_data: str | Path = "zero",
        json_tensors: bool = False,
    ) -> Sample:
        env = {**os.environ, "LD_LIBRARY_PATH": f"{_cuda_runtime_dir()}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        with tempfile.TemporaryDirectory(prefix="bench-pa-") as scratch:
            report = Path(scratch) / "report.csv"
            command = [
                str(BINARY),
                "-m",
                model,
                "-i",
                protocol,
                "-u",
                url,
                "--concurrency-range",
                str(concurrency),
                "--input-data",
                str(input_data),
                "--measurement-mode",
                "time_windows",
                "--measurement-interval",
                str(self.window_ms),
                "--stability-percentage",
                str(STABILITY_PERCENTAGE),
                "--max-trials",
                str(MAX_TRIALS),
                "--percentile",
                "50",
                "-f",
                str(report),
            ]
            for name, shape in shapes.items():
                command += ["--shape", f"{name}:{','.join(map(str, shape))}"]
            if json_tensors:
                command += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=self.timeout_s, env=env, check=False
                )
            except subprocess.TimeoutExpired:
                raise PerfAnalyzerError(f"perf_analyzer ran past {self.timeout_s:.0f} s") from None
            if done.returncode != 0 or not report.is_file():
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
                raise PerfAnalyzerError(f"perf_analyzer exited with status {done.returncode}: {tail}")
            return parse_csv(report.read_text())


def parse_csv(text: str) -> Sample:
    """perf_analyzer's ``-f`` report: one row per concurrency; latencies in microseconds."""
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise PerfAnalyzerError("perf_analyzer wrote an empty report")
    row = rows[-1]
    try:
        return Sample(
            throughput=float(row["Inferences/Second"]),
            p50_ms=float(row["p50 latency"]) / 1000.0,
            p99_ms=float(row["p99 latency"]) / 1000.0,
            extra={
                "client_send_us": float(row["Client Send"]),
                "network_server_send_recv_us": float(row["Network+Server Send/Recv"]),
                "server_queue_us": float(row["Server Queue"]),
                "server_compute_infer_us": float(row["Server Compute Infer"]),
            },
        )
    except (KeyError, ValueError) as e:
        raise PerfAnalyzerError(f"unexpected perf_analyzer report ({e}): {text[:300]!r}") from None
