"""The container image's steps, run outside a container (Docker cannot run here): deploy/docker/install.sh
into a fresh virtual environment (serving only: no torch, no transformers), and deploy/docker/entrypoint.sh
serving a model repository the way the image does, its HEALTHCHECK command, and SIGTERM -> exit 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

import models

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
INSTALL = DOCKER / "install.sh"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the image's build stage does: copy pyproject.toml, README.md and src/, run install.sh."""
    work = tmp_path_factory.mktemp("image")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    prefix = work / "opt-onnxserve"
    env = {**os.environ, "PYTHON": sys.base_prefix + "/bin/python3", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        ["sh", str(INSTALL), str(prefix), str(source)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith("onnxserve 0.1.0")
    return prefix


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    models.write_version(tmp_path / "models", "m", 1, models.offset_model(10.0))
    return tmp_path / "models"


class Served:
    def __init__(self, prefix: Path, repository: Path) -> None:
        self.http_port, self.grpc_port = free_ports(2)
        self.env = {
            "PATH": "/usr/bin:/bin",
            "ONNXSERVE_PREFIX": str(prefix),
            "ONNXSERVE_MODEL_REPOSITORY": str(repository),
            "ONNXSERVE_HOST": "127.0.0.1",  # the image's default is 0.0.0.0; tests stay on loopback
            "ONNXSERVE_HTTP_PORT": str(self.http_port),
            "ONNXSERVE_GRPC_PORT": str(self.grpc_port),
            "ONNXSERVE_INFERENCE_THREADS": "3",
        }
        # No arguments: the image's default command.
        # A file, not a pipe (a pipe nobody reads could block the server); closed by serve_and_drain.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(["sh", str(ENTRYPOINT)], env=self.env, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.http_port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def healthcheck(self) -> int:
        return subprocess.run(
            ["sh", str(ENTRYPOINT), "healthcheck"], env=self.env, capture_output=True, timeout=30
        ).returncode

    def wait_live(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not come up")


def serve_and_drain(prefix: Path, repository: Path) -> None:
    served = Served(prefix, repository)
    try:
        served.wait_live()
        assert served.healthcheck() == 0
        assert httpx.get(f"{served.url}/v2/health/ready", timeout=5).status_code == 200
        body = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1.0, 2.0]}]}
        response = httpx.post(f"{served.url}/v2/models/m/infer", json=body, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [11.0, 12.0]

        # The entrypoint exec's onnxserve (PID 1 in a container gets the signals) with the default command.
        cmdline = Path(f"/proc/{served.process.pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode() for a in cmdline if a]
        assert args[0].endswith("python") or args[0].endswith("python3")
        assert args[1] == str(prefix / "bin" / "onnxserve")
        assert args[2:] == [
            "serve",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(served.http_port),
            "--grpc-port",
            str(served.grpc_port),
            "--inference-threads",
            "3",
        ]

        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0, served.output()
        assert served.healthcheck() != 0  # the HEALTHCHECK fails once the server is gone
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
        served.log.close()


def test_entrypoint_serves_the_repository_and_drains(repository: Path) -> None:
    """The entrypoint over this checkout's environment (fast; the `long` test below uses install.sh's)."""
    serve_and_drain(Path(sys.prefix), repository)


def test_entrypoint_passes_arguments_through(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ONNXSERVE_PREFIX": sys.prefix}
    done = subprocess.run(["sh", str(ENTRYPOINT), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == "onnxserve 0.1.0"
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), "serve", "--model-repository", str(tmp_path / "missing"), "--http-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr


def test_install_refuses_a_used_prefix(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    done = subprocess.run(["sh", str(INSTALL), str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "fresh prefix" in done.stderr


# The two tests below run install.sh itself: pip with --no-cache-dir downloads every dependency, then
# compileall (about 56 s on 2 cores). They run with `pytest -m long`. What they check stays in the quick
# suite: a serving-only install without torch or transformers that runs its CLI from the environment
# (test_wheel.py::test_serving_only_install_has_no_torch), an installed environment serving
# (test_wheel.py::test_the_installed_server_serves_and_its_web_page_files), and the entrypoint serving,
# answering its HEALTHCHECK and draining on SIGTERM (test_entrypoint_serves_the_repository_and_drains).
# Only install.sh's own pip and compileall steps wait for `-m long`.
@pytest.mark.slow
@pytest.mark.long
def test_install_is_serving_only(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    # the installed environment alone: a PYTHONPATH of the caller's (e.g. src/) would import this checkout
    alone = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    for module in ("torch", "transformers"):
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=60, env=alone)
        assert done.returncode == 1, module
        assert f"No module named '{module}'" in done.stderr
    done = subprocess.run(
        [str(installed / "bin" / "onnxserve"), "--version"], capture_output=True, text=True, env=alone
    )
    assert done.returncode == 0
    assert done.stdout.strip() == "onnxserve 0.1.0"
    # A regular install: the package lives in the environment, not in this checkout.
    done = subprocess.run(
        [python, "-c", "import onnxserve; print(onnxserve.__file__)"], capture_output=True, text=True, env=alone
    )
    assert done.stdout.strip().startswith(str(installed))


@pytest.mark.slow
@pytest.mark.long
def test_installed_image_environment_serves_and_drains(installed: Path, repository: Path) -> None:
    serve_and_drain(installed, repository)


def test_entrypoint_serves_the_tutorial_config_variable(tmp_path: Path) -> None:
    """The tutorial's Dockerfile: the model and config copied in, ENV ONNX_SERVER_CONFIG, no CMD."""
    (tmp_path / "models").mkdir()
    import onnx

    onnx.save(models.offset_model(10.0), tmp_path / "models" / "huggingface_model.onnx")
    config = tmp_path / "config.json"
    entry = {"name": "m", "base_path": "models/huggingface_model.onnx", "model_platform": "onnxruntime"}
    config.write_text(json.dumps({"model_config_list": [entry]}))
    served = Served(Path(sys.prefix), tmp_path / "no-repository-needed")
    served.process.kill()
    served.process.wait()
    served.log.close()
    env = {k: v for k, v in served.env.items() if k != "ONNXSERVE_MODEL_REPOSITORY"}
    served.env = {**env, "ONNX_SERVER_CONFIG": str(config)}
    if "PYTHONPATH" in os.environ:  # this checkout's code, when the environment's install points elsewhere
        served.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    served.log = tempfile.TemporaryFile()  # noqa: SIM115
    served.process = subprocess.Popen(["sh", str(ENTRYPOINT)], env=served.env, stderr=served.log)
    try:
        served.wait_live()
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        response = httpx.post(f"{served.url}/v2/models/m/infer", json=body, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [11.0]
        cmdline = Path(f"/proc/{served.process.pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode() for a in cmdline if a]
        assert args[2:5] == ["serve", "--config", str(config)]
    finally:
        served.process.kill()
        served.process.wait()
        served.log.close()
