"""The layouts users bring: ``base_path`` at a ``.onnx`` file, at a folder holding one model file,
or at version folders; the first two are version 1, reloaded in place when the file is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import models
from onnxserve.config import load_config
from onnxserve.core.manager import Catalog
from onnxserve.core.repository import discover_versions, scan_repository
from onnxserve.errors import ConfigError
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from waiting import wait_until


def infer(server: RunningServer, name: str = "m", x: float = 0.0) -> httpx.Response:
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [x]}]}
    return httpx.post(f"{server.http_url}/v2/models/{name}/infer", json=body, timeout=30)


def answer(server: RunningServer, name: str = "m") -> float:
    response = infer(server, name)
    assert response.status_code == 200, response.text
    value: float = response.json()["outputs"][0]["data"][0]
    return value


def write_config(path: Path, base_path: str, name: str = "m") -> None:
    entry: dict[str, Any] = {"name": name, "base_path": base_path, "model_platform": "onnxruntime"}
    path.write_text(json.dumps({"model_config_list": [entry]}))


def replace_atomically(target: Path, model: onnx.ModelProto) -> None:
    partial = target.with_name(f".{target.name}.partial")
    onnx.save(model, partial)
    partial.replace(target)


def serve(config_file: Path, poll: bool = False) -> RunningServer:
    settings = ServerSettings(
        http_port=0,
        grpc_port=0,
        log_level="warning",
        model_control_mode="poll" if poll else "none",
        repository_poll_secs=0.1,
    )
    return start_in_background(load_config(config_file), settings, Catalog(config_file=config_file))


@pytest.fixture
def file_layout(tmp_path: Path) -> Iterator[tuple[RunningServer, Path]]:
    """The old tutorial's layout: models/huggingface_model.onnx, base_path at the file, poll mode."""
    (tmp_path / "models").mkdir()
    model_file = tmp_path / "models" / "huggingface_model.onnx"
    onnx.save(models.offset_model(1.0), model_file)
    write_config(tmp_path / "config.json", "models/huggingface_model.onnx")
    server = serve(tmp_path / "config.json", poll=True)
    yield server, model_file
    server.stop()


def test_base_path_at_a_file_is_version_1(file_layout: tuple[RunningServer, Path]) -> None:
    server, _ = file_layout
    assert answer(server) == 1.0
    metadata = httpx.get(f"{server.http_url}/v2/models/m", timeout=10).json()
    assert metadata["versions"] == ["1"]
    assert httpx.get(f"{server.http_url}/v1/models/m", timeout=10).json()["model_version_status"][0]["version"] == "1"


def test_replacing_the_file_reloads_it_in_place(file_layout: tuple[RunningServer, Path]) -> None:
    server, model_file = file_layout
    assert answer(server) == 1.0
    replace_atomically(model_file, models.offset_model(2.0))
    wait_until(lambda: answer(server) == 2.0, what="the replaced file to serve")
    assert httpx.get(f"{server.http_url}/v2/models/m", timeout=10).json()["versions"] == ["1"]


def test_a_broken_replacement_keeps_the_old_model_serving(
    file_layout: tuple[RunningServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, model_file = file_layout
    partial = model_file.with_name(".partial")
    partial.write_bytes(b"this is not an onnx model")
    partial.replace(model_file)
    # A poll sees it and fails to load it: the loaded model answers all along.
    wait_until(lambda: "failed to load" in caplog.text, what="the failed load")
    assert "not an ONNX model" in caplog.text
    assert answer(server) == 1.0
    replace_atomically(model_file, models.offset_model(3.0))
    wait_until(lambda: answer(server) == 3.0, what="the good replacement to serve")


def test_base_path_at_a_folder_holding_one_model_file(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(models.offset_model(5.0), folder / "huggingface_model.onnx")
    (folder / "notes.txt").write_text("files that are not models are left alone")
    write_config(tmp_path / "config.json", "models")
    server = serve(tmp_path / "config.json")
    try:
        assert answer(server) == 5.0
    finally:
        server.stop()


def test_external_data_beside_a_model_file(tmp_path: Path) -> None:
    """model.onnx + model.onnx.data, as torch.onnx.export writes them."""
    folder = tmp_path / "models"
    folder.mkdir()
    model = models.parse(
        """
        offset (float[batch, 1] x) => (float[batch, 1] y) <float[1] shift = {7.0}> {
            y = Add(x, shift)
        }
        """
    )
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([7.0], dtype=np.float32), "shift"))
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, size_threshold=0, location="model.onnx.data")
    assert (folder / "model.onnx.data").is_file()
    for base_path in ("models", "models/model.onnx"):
        write_config(tmp_path / "config.json", base_path)
        server = serve(tmp_path / "config.json")
        try:
            assert answer(server) == 7.0
        finally:
            server.stop()


def test_a_folder_with_several_model_files_is_refused_clearly(tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        onnx.save(models.offset_model(1.0), tmp_path / name)
    with pytest.raises(ConfigError) as caught:
        discover_versions(tmp_path)
    assert "a.onnx, b.onnx" in caught.value.message
    assert "point base_path at one of the files" in caught.value.message


def test_a_file_that_is_not_onnx_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(ConfigError) as caught:
        discover_versions(tmp_path / "model.txt")
    assert "not an ONNX model" in caught.value.message


def test_version_folders_win_over_a_loose_file(tmp_path: Path) -> None:
    models.write_version(tmp_path, "m", 2, models.offset_model(2.0))
    onnx.save(models.offset_model(9.0), tmp_path / "m" / "stray.onnx")
    found = discover_versions(tmp_path / "m")
    assert [(v.version, v.flat) for v in found] == [(2, False)]


def test_repository_scan_takes_a_folder_holding_one_model_file(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    onnx.save(models.offset_model(1.0), tmp_path / "flat" / "anything.onnx")
    models.write_version(tmp_path, "versioned", 1, models.offset_model(1.0))
    assert sorted(m.name for m in scan_repository(tmp_path).model_config_list) == ["flat", "versioned"]


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_symlink_out_beside_a_model_file_is_refused(tmp_path: Path, layout: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text("{}")
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(models.offset_model(1.0), folder / "m.onnx")
    (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    write_config(tmp_path / "config.json", "models/m.onnx" if layout == "file" else "models")
    with pytest.raises(ConfigError) as caught:
        serve(tmp_path / "config.json")
    assert "tokenizer.json" in caught.value.message
    assert "leads outside" in caught.value.message


def test_a_model_file_symlinked_from_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx.save(models.offset_model(1.0), outside / "m.onnx")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.onnx").symlink_to(outside / "m.onnx")
    write_config(tmp_path / "config.json", "models")
    with pytest.raises(ConfigError) as caught:
        serve(tmp_path / "config.json")
    assert "leads outside" in caught.value.message


def test_a_fifo_beside_a_model_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(models.offset_model(1.0), folder / "m.onnx")
    os.mkfifo(folder / "m.onnx.data")
    write_config(tmp_path / "config.json", "models/m.onnx")
    with pytest.raises(ConfigError) as caught:
        serve(tmp_path / "config.json")
    assert "not a regular file" in caught.value.message


def test_serve_reads_the_tutorial_environment_variable(tmp_path: Path) -> None:
    """``onnxserve serve`` with no flags: ONNX_SERVER_CONFIG names the config (the old tutorial's way)."""
    (tmp_path / "models").mkdir()
    onnx.save(models.offset_model(4.0), tmp_path / "models" / "m.onnx")
    write_config(tmp_path / "config.json", "models/m.onnx")
    env = {**os.environ, "ONNX_SERVER_CONFIG": str(tmp_path / "config.json")}
    env.pop("ONNXSERVE_CONFIG", None)
    env.pop("ONNXSERVE_MODEL_REPOSITORY", None)
    command = [sys.executable, "-m", "onnxserve.cli", "serve", "--http-port", "0", "--grpc-port", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        url = ""
        for line in process.stderr:
            if "HTTP" in line and "http://" in line:
                url = "http://" + line.split("http://", 1)[1].split()[0].rstrip("/")
                break
        assert url, "the server did not report its address"
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        response = httpx.post(f"{url}/v2/models/m/infer", json=body, timeout=30)
        assert response.json()["outputs"][0]["data"] == [5.0]
    finally:
        process.terminate()
        process.wait(timeout=60)
        if process.stderr is not None:
            process.stderr.close()


def test_serve_without_flags_or_variables_says_what_to_give(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXSERVE_CONFIG", "ONNX_SERVER_CONFIG")}
    env.pop("ONNXSERVE_MODEL_REPOSITORY", None)
    done = subprocess.run(
        [sys.executable, "-m", "onnxserve.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "ONNX_SERVER_CONFIG" in done.stderr


def test_a_tokenizer_beside_a_model_without_token_inputs_changes_nothing(tmp_path: Path) -> None:
    """Text is accepted only for token inputs (input_ids ...); other models stay tensor models."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(models.offset_model(1.0), folder / "m.onnx")
    Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    write_config(tmp_path / "config.json", "models/m.onnx")
    server = serve(tmp_path / "config.json")
    try:
        assert answer(server) == 1.0
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
        response = httpx.post(f"{server.http_url}/v2/models/m/infer", json=body, timeout=30)
        assert response.status_code == 400
        assert "unknown input 'text'" in response.json()["error"]
        assert "or send text" not in response.json()["error"]
        assert answer(server) == 1.0
    finally:
        server.stop()
