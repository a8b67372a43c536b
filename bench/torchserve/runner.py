"""TorchServe for the text comparison: archive the handler, start the server on loopback, register the
model with TorchServe's own batching, and stop it all (process group, bounded in time).

Everything lives under ``bench/results/torchserve/`` (model store, logs, config, its pid file's
temporary folder), so nothing touches a TorchServe the machine may run for someone else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.server import HOST, ServerProcess, free_port, log_tail
from bench.settings import ROOT

HANDLER = Path(__file__).resolve().parent / "handler.py"
VENV_BIN = ROOT / ".venv" / "bin"
MODEL_NAME = "minilm"
START_TIMEOUT_S = 180.0
REGISTER_TIMEOUT_S = 300.0
MIN_JAVA = 11
PIP_LOG = ROOT / "bench" / "results" / "pip.log"


class TorchServeError(RuntimeError):
    """TorchServe could not be installed, started or given the model; the message says which and why."""


@dataclass(frozen=True)
class TorchServeSettings:
    """How TorchServe serves the model: its workers and its own batching."""

    workers: int
    threads: int  # torch intra-op threads per worker
    batch_size: int
    max_batch_delay_ms: int

    @property
    def model_name(self) -> str:
        """The name TorchServe serves these settings under (every candidate is registered at once)."""
        return f"{MODEL_NAME}-w{self.workers}-t{self.threads}-b{self.batch_size}-d{self.max_batch_delay_ms}"

    @property
    def label(self) -> str:
        return (
            f"{self.workers} worker{'s' if self.workers > 1 else ''} x {self.threads} torch "
            f"thread{'s' if self.threads > 1 else ''}, batch_size {self.batch_size}, "
            f"max_batch_delay {self.max_batch_delay_ms} ms"
        )

    def to_json(self) -> dict[str, int | str]:
        return {
            "workers": self.workers,
            "torch_threads_per_worker": self.threads,
            "batch_size": self.batch_size,
            "max_batch_delay_ms": self.max_batch_delay_ms,
            "label": self.label,
        }


def default_candidates(cores: int | None = None) -> list[TorchServeSettings]:
    """Settings tried at concurrency 8; the best one is measured. Workers x threads never exceed the
    cores; on 2 cores: 1 worker x 2 threads or 2 workers x 1 thread, batches of 4 to 8."""
    n = cores or os.cpu_count() or 1
    candidates = [TorchServeSettings(1, n, 8, 5)]
    if n > 1:
        candidates += [TorchServeSettings(n, 1, max(1, 8 // n), 5), TorchServeSettings(n, 1, 8, 10)]
    return candidates


def _java_major() -> int | str:
    java = shutil.which("java") if not os.environ.get("JAVA_HOME") else f"{os.environ['JAVA_HOME']}/bin/java"
    if java is None:
        return "java is not on PATH (TorchServe's frontend is Java; it needs Java 11 or newer)"
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`java -version` failed: {e}"
    found = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if found is None:
        return f"cannot read the Java version from: {(done.stderr + done.stdout).strip()[:200]!r}"
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def _pip_failure() -> str:
    """What ``make bench``'s pip install of bench/requirements.txt said last, when it failed."""
    if not PIP_LOG.is_file():
        return " (make bench installs bench/requirements.txt)"
    lines = [line for line in PIP_LOG.read_text(errors="replace").splitlines() if line.strip()]
    return f"; make bench's pip install said: {lines[-1] if lines else '(nothing)'} (all of it: {PIP_LOG})"


def missing() -> str | None:
    """Why TorchServe cannot run here, or None when it can."""
    for module, package in (("ts", "torchserve"), ("model_archiver", "torch-model-archiver")):
        if importlib.util.find_spec(module) is None:
            return f"the PyPI package {package} is not installed in .venv{_pip_failure()}"
    for tool in ("torchserve", "torch-model-archiver"):
        if not (VENV_BIN / tool).is_file():
            return f"{VENV_BIN / tool} is missing"
    java = _java_major()
    if isinstance(java, str):
        return java
    if java < MIN_JAVA:
        return f"TorchServe needs Java {MIN_JAVA} or newer; this machine has Java {java}"
    return None


class TorchServe(ServerProcess):
    """One TorchServe process group on free loopback ports; a context manager."""

    def __init__(self, workdir: Path, model_path: Path) -> None:
        self.workdir = workdir.resolve()
        self.model_path = model_path
        self.store = self.workdir / "model-store"
        self.logs = self.workdir / "logs"
        self.tmp = self.workdir / "tmp"
        self.inference_port = free_port()
        self.management_port = free_port()
        self.metrics_port = free_port()
        self.console_log = self.workdir / "torchserve.out"
        self._process: subprocess.Popen[bytes] | None = None
        self._registered: set[str] = set()

    def predictions_url(self, settings: TorchServeSettings) -> str:
        return f"http://{HOST}:{self.inference_port}/predictions/{settings.model_name}"

    @property
    def management_url(self) -> str:
        return f"http://{HOST}:{self.management_port}"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "LOG_LOCATION": str(self.logs),
            "METRICS_LOCATION": str(self.logs),
            "TMPDIR": str(self.tmp),  # TorchServe keeps its pid file in the temporary folder
            "TEMP": str(self.tmp),
        }

    def _write_config(self) -> Path:
        config = self.workdir / "config.properties"
        lines = [
            f"inference_address=http://{HOST}:{self.inference_port}",
            f"management_address=http://{HOST}:{self.management_port}",
            f"metrics_address=http://{HOST}:{self.metrics_port}",
            f"model_store={self.store}",
            "disable_token_authorization=true",
            "enable_model_api=true",
            "disable_system_metrics=true",
            "job_queue_size=1000",
            "default_response_timeout=120",
            "vmargs=-Xmx1g -XX:+UseContainerSupport",
        ]
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        for folder in (self.store, self.logs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        command = [
            str(VENV_BIN / "torchserve"),
            "--start",
            "--foreground",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.store),
            "--ncs",
            "--disable-token-auth",
            "--enable-model-api",
        ]
        with self.console_log.open("wb") as out:
            self._process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self._env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise TorchServeError(
                    f"TorchServe exited with status {self._process.returncode} while starting:\n"
                    f"{log_tail(self.console_log)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{HOST}:{self.inference_port}/ping", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.5)
        raise TorchServeError(f"TorchServe did not answer /ping after {START_TIMEOUT_S:.0f} s:\n{self.logs_tail()}")

    def archive(self, settings: TorchServeSettings) -> str:
        """A model archive of the handler, whose config points at the Hugging Face folder; its file name."""
        name = settings.model_name
        config = self.workdir / f"{name}.yaml"
        config.write_text(
            f"handler:\n  model_path: {self.model_path}\n  threads: {settings.threads}\n  max_length: 256\n"
        )
        command = [
            str(VENV_BIN / "torch-model-archiver"),
            "--model-name",
            name,
            "--version",
            "1.0",
            "--handler",
            str(HANDLER),
            "--config-file",
            str(config),
            "--export-path",
            str(self.store),
            "--force",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=self._env(), check=False)
        if done.returncode != 0:
            raise TorchServeError(f"torch-model-archiver failed: {(done.stdout + done.stderr).strip()[-600:]}")
        return f"{name}.mar"

    def register(self, settings: TorchServeSettings) -> None:
        """Load the model under ``settings.model_name`` with those settings, waiting until its workers are up."""
        archive = self.archive(settings)
        params: dict[str, str | int] = {
            "url": archive,
            "model_name": settings.model_name,
            "batch_size": settings.batch_size,
            "max_batch_delay": settings.max_batch_delay_ms,
            "initial_workers": settings.workers,
            "synchronous": "true",
            "response_timeout": 120,
        }
        try:
            response = httpx.post(f"{self.management_url}/models", params=params, timeout=REGISTER_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise TorchServeError(f"registering the model failed: {e}\n{self.logs_tail()}") from None
        if response.status_code != 200:
            raise TorchServeError(
                f"registering the model answered {response.status_code}: {response.text[:300]}\n{self.logs_tail()}"
            )
        self._registered.add(settings.model_name)

    def unregister(self, settings: TorchServeSettings) -> None:
        """Unload a model (and stop its workers); the ones not chosen free their memory this way."""
        if settings.model_name not in self._registered:
            return
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{self.management_url}/models/{settings.model_name}", timeout=120.0)
        self._registered.discard(settings.model_name)

    def logs_tail(self) -> str:
        parts = [f"{self.console_log.name}:\n{log_tail(self.console_log, 8)}"]
        model_log = self.logs / "model_log.log"
        if model_log.is_file():
            parts.append(f"{model_log.name}:\n{log_tail(model_log, 8)}")
        return "\n".join(parts)
