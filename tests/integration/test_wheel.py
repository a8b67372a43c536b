"""onnxserve as a real package: a wheel built with ``python -m build``, installed into fresh virtual
environments (serving only, without torch; and with the ``export`` extra), runs ``onnxserve --help``
and ``onnxserve serve``, and serves the web page's files from the installed package.

Dependencies come from the package registry the machine's pip is configured for; when it cannot be
reached these tests skip and say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import models
from served_process import ServedProcess

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the CPU build this machine carries; any other version pulls a CUDA build
UNREACHABLE = ("No matching distribution", "Could not find a version", "connection", "Network is unreachable")

# Building the wheel and filling fresh environments from the registry takes minutes on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def run(command: list[str], timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)  # type: ignore[call-overload, no-any-return]


def pip_install(python: Path, *requirements: str) -> None:
    """``pip install`` into the environment of ``python``, run by this environment's pip (``--python``):
    the fresh environment needs no pip of its own. ``--no-compile``: modules are compiled when first
    imported, not all of them (sympy, onnx, numpy, ...) at install time, which is most of an install's time."""
    done = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile", *requirements]
    )
    if done.returncode != 0:
        if any(marker.lower() in done.stderr.lower() for marker in UNREACHABLE):
            pytest.skip(f"the package registry cannot be reached: {done.stderr.strip().splitlines()[-1]}")
        raise AssertionError(done.stderr[-4000:])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build --wheel`` on a copy of this checkout (the build writes nothing here)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "dist"), str(source)])
    if done.returncode != 0 and any(m.lower() in (done.stderr + done.stdout).lower() for m in UNREACHABLE):
        pytest.skip("the package registry cannot be reached to build the wheel (setuptools)")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (found,) = (work / "dist").glob("onnxserve-*.whl")
    return found


def fresh_venv(where: Path) -> Path:
    """A fresh virtual environment of the base interpreter, without pip (``pip_install`` runs ours on it)."""
    done = run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(where)])
    assert done.returncode == 0, done.stderr
    return where / "bin" / "python"


def test_the_wheel_carries_the_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"onnxserve/py.typed"}
    for folder in ("server/web/static", "toolkit/visualize/assets"):
        files = [p.name for p in (ROOT / "src" / "onnxserve" / folder).iterdir() if p.is_file()]
        assert files, folder
        expected |= {f"onnxserve/{folder}/{name}" for name in files}
    assert expected <= names, sorted(expected - names)
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)


@pytest.fixture(scope="module")
def serving_only(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel alone in a fresh virtual environment: the serving dependencies, no torch."""
    python = fresh_venv(tmp_path_factory.mktemp("venv") / "serving")
    pip_install(python, str(wheel))
    return python


@pytest.fixture
def served(serving_only: Path, tmp_path: Path) -> Iterator[str]:
    models.write_version(tmp_path / "repo", "m", 1, models.offset_model(10.0))
    command = ["serve", "--model-repository", str(tmp_path / "repo"), "--http-port", "0", "--grpc-port", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONNXSERVE_", "ONNX_SERVER_", "PYTHONPATH"))}
    server = ServedProcess([str(serving_only.parent / "onnxserve"), *command], env, cwd=tmp_path / "repo")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_serving_only_install_has_no_torch(serving_only: Path) -> None:
    for module in ("torch", "transformers"):
        done = run([str(serving_only), "-c", f"import {module}"])
        assert done.returncode == 1, module
        assert f"No module named '{module}'" in done.stderr
    done = run([str(serving_only), "-c", "import onnxserve; print(onnxserve.__file__)"])
    assert done.stdout.strip().startswith(str(serving_only.parents[1]))  # installed, not this checkout
    done = run([str(serving_only.parent / "onnxserve"), "--help"])
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout


def test_the_installed_server_serves_and_its_web_page_files(served: str) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1.0, 2.0]}]}
    response = httpx.post(f"{served}/v2/models/m/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [11.0, 12.0]
    page = httpx.get(f"{served}/", timeout=30)
    assert page.status_code == 200
    for asset in (ROOT / "src" / "onnxserve" / "server" / "web" / "static").iterdir():
        response = httpx.get(f"{served}/web/static/{asset.name}", timeout=30)
        assert response.status_code == 200, asset.name
        assert response.content == asset.read_bytes()


@pytest.mark.long  # ~4 min: torch, transformers and their deps into a fresh venv; run with `pytest -m long`
@pytest.mark.timeout(1800)
def test_the_export_extra_installs_the_exporters(wheel: Path, tmp_path: Path) -> None:
    """``pip install 'onnxserve[export]'`` (torch pinned to the CPU build, as the Makefile does)."""
    python = fresh_venv(tmp_path / "export")
    pip_install(python, TORCH, f"onnxserve[export] @ {wheel.as_uri()}")
    done = run([str(python), "-c", "import torch, transformers, skl2onnx; print(torch.__version__)"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2.13.0")
    done = run([str(python.parent / "onnxserve"), "export", "hf", "--help"])
    assert done.returncode == 0, done.stderr
