"""``onnxserve serve`` as a real subprocess on loopback, with its log in a file, stopped for sure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import orjson
import psutil

from bench.settings import ROOT

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """A server that did not start (its log's last lines are in the message)."""


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(process: subprocess.Popen[Any], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group we started (``process`` leads it, by ``start_new_session``), wait until
    every member is gone, and SIGKILL what is left after ``timeout_s``."""
    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, so that a finished group reads as gone
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


class PeakRss:
    """The largest resident size of process ``pid`` while in the block, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:  # the process is gone
                return
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class ModelStats:
    """Cumulative server-side counters of one model version (the V2 statistics extension)."""

    inferences: int
    executions: int
    queue_ns: int
    infer_ns: int
    requests: int
    batches: dict[int, int]  # executions by batch size (rows)

    def since(self, before: ModelStats) -> dict[str, Any]:
        """What happened between two snapshots: executions, mean batch rows, queue and ONNX Runtime time."""
        executions = self.executions - before.executions
        requests = self.requests - before.requests
        return {
            "executions": executions,
            "mean_batch_rows": round((self.inferences - before.inferences) / executions, 2) if executions else 0.0,
            "mean_queue_ms": round((self.queue_ns - before.queue_ns) / requests / 1e6, 3) if requests else 0.0,
            # every request records its whole batch's ONNX Runtime time: this is the mean batch's time
            "mean_infer_ms": round((self.infer_ns - before.infer_ns) / requests / 1e6, 3) if requests else 0.0,
            "batch_sizes": {
                str(size): count - before.batches.get(size, 0)
                for size, count in sorted(self.batches.items())
                if count > before.batches.get(size, 0)
            },
        }


class ServerProcess:
    """A server in a process group of its own (``start`` starts it), stopped for sure: a context manager
    that stops what ``start`` left behind when it fails or is interrupted, and stops it on leaving."""

    _process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process)
            self._process = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class OnnxServer(ServerProcess):
    """``.venv/bin/onnxserve serve --config CONFIG`` (or ``--model-repository REPOSITORY``, with ``config``
    None) on free loopback ports; a context manager."""

    def __init__(
        self,
        config: Path | None,
        log: Path,
        name: str,
        src: Path | None = None,
        env: dict[str, str] | None = None,
        repository: Path | None = None,
    ) -> None:
        if (config is None) == (repository is None):
            raise ValueError("serve either a config or a model repository")
        self.config = config
        self.repository = repository
        self.log = log
        self.name = name
        self.src = src  # another source tree to serve from (PYTHONPATH), e.g. the code before a change
        self.env = env or {}  # more environment variables for the server
        self.http_port = free_port()
        self.grpc_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def command(self) -> list[str]:
        return [
            str(ROOT / ".venv" / "bin" / "onnxserve"),
            "serve",
            *(["--config", str(self.config)] if self.config is not None else []),
            *(["--model-repository", str(self.repository)] if self.repository is not None else []),
            "--host",
            HOST,
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
        ]

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            env = dict(os.environ, **self.env)
            if self.src is not None:
                env["PYTHONPATH"] = str(self.src.resolve())
            self._process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"onnxserve ({self.name}) exited with status {self._process.returncode}:\n{log_tail(self.log)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"onnxserve ({self.name}) was not ready after {START_TIMEOUT_S:.0f} s:\n{log_tail(self.log)}")

    @property
    def pid(self) -> int:
        """The server process's id (it leads its process group)."""
        if self._process is None:
            raise ServerError(f"onnxserve ({self.name}) is not running")
        return self._process.pid

    def max_batch_size(self, model: str) -> int:
        """The ``max_batch_size`` the server gives ``model`` (its V2 model configuration): > 0 when it batches."""
        document = orjson.loads(httpx.get(f"{self.http_url}/v2/models/{model}/config", timeout=10.0).content)
        return int(document.get("max_batch_size", 0))

    def model_stats(self, model: str) -> ModelStats:
        document = orjson.loads(httpx.get(f"{self.http_url}/v2/models/{model}/stats", timeout=10.0).content)
        stats = document["model_stats"][0]
        inference = stats["inference_stats"]
        return ModelStats(
            inferences=int(stats["inference_count"]),
            executions=int(stats["execution_count"]),
            queue_ns=int(inference["queue"]["ns"]),
            infer_ns=int(inference["compute_infer"]["ns"]),
            requests=int(inference["success"]["count"]),
            batches={int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])},
        )
