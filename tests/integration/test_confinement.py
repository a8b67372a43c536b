"""Paths: nothing a model folder, a config or the load API names makes the server read outside the
repository (issue #10, CVE-2023-31036 and CVE-2024-27318 in other servers).

Each escape is refused with a message that says what and why, the server keeps serving, and a canary
outside the repository proves that nothing opened it (see ``FifoCanary``).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import models
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.manager import Catalog
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ConfigError, ModelLoadError
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings


class FifoCanary:
    """A FIFO outside the repository that tells whether anything opened it for reading.

    Opening a FIFO for reading blocks until some writer opens it, and a non-blocking open for writing
    fails with ENXIO unless some reader has it open. A watcher thread tries that non-blocking open
    every millisecond: it succeeds only while a reader holds the FIFO, and a reader blocked in open()
    holds it until the watcher's open releases it (it then reads end-of-file). So any open for reading,
    by onnxserve, onnx or ONNX Runtime, in this process or another, is seen; ``stat`` and ``realpath``
    (which the checks use) do not open it. Running as root, a file without read permission would prove
    nothing, and atime depends on mount options; a FIFO proves it either way.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                time.sleep(0.001)
                continue
            self.opened += 1
            os.close(fd)  # the reader sees end-of-file and goes on

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[FifoCanary]:
    outside = tmp_path / "outside"
    outside.mkdir()
    watched = FifoCanary(outside / "canary")
    yield watched
    watched.close()


def test_the_canary_sees_an_open(canary: FifoCanary) -> None:
    """The control: a read of the canary is noticed (so a zero count below means no open happened)."""
    reader = threading.Thread(target=lambda: canary.path.read_bytes())
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert canary.opened >= 1


def external_model(location: str) -> onnx.ModelProto:
    """y = x + w, where w (4 floats) is external data at ``location``."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"])],
        "external",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def write_external(folder: Path, location: str, weights: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(external_model(location).SerializeToString())
    if weights is not None:
        (folder / location).write_bytes(weights)
    return folder / "model.onnx"


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    weights = np.array([1, 2, 3, 4], dtype=np.float32)
    session = ModelSession(write_external(tmp_path / "1", "weights.bin", weights.tobytes()))
    x = np.array([10, 20, 30, 40], dtype=np.float32)
    np.testing.assert_array_equal(session.run({"x": x})["y"], x + weights)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("../outside/canary", "leads out of the version folder"),
        ("sub/../../outside/canary", "leads out of the version folder"),
        ("ABSOLUTE", "is an absolute path"),
        ("..\\outside\\canary", "leads out of the version folder"),
        ("C:\\Windows\\win.ini", "is an absolute path"),
        ("linked", "resolves outside the version folder"),
        ("missing.bin", "is missing from the version folder"),
        ("", "external data without a location"),
    ],
)
def test_external_data_that_leaves_the_folder_is_refused_before_anything_opens_it(
    tmp_path: Path, canary: FifoCanary, location: str, expected: str
) -> None:
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    if location == "ABSOLUTE":
        location = str(canary.path)
    if location == "linked":
        (folder / "linked").symlink_to(canary.path)
    model = write_external(folder, location)
    with pytest.raises(ModelLoadError) as refused:
        ModelSession(model)
    assert expected in refused.value.message
    assert "initializer 'w'" in refused.value.message
    time.sleep(0.01)
    assert canary.opened == 0


def test_external_data_sibling_prefix_is_outside(tmp_path: Path, canary: FifoCanary) -> None:
    """``1_evil/`` beside ``1/`` starts with the same characters; it is still outside (a string-prefix
    check would let it through)."""
    folder = tmp_path / "m" / "1"
    sibling = tmp_path / "m" / "1_evil"
    sibling.mkdir(parents=True)
    os.symlink(canary.path, sibling / "weights.bin")
    (folder).mkdir(parents=True)
    (folder / "weights.bin").symlink_to(sibling / "weights.bin")
    with pytest.raises(ModelLoadError, match="resolves outside the version folder"):
        ModelSession(write_external(folder, "weights.bin"))
    assert canary.opened == 0


def test_external_data_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    model = write_external(tmp_path / "1", "weights.bin", b"\0" * 8)  # 4 floats need 16 bytes
    with pytest.raises(ModelLoadError, match=r"declares dims \[4\] \(16 bytes\) but its external data holds 8"):
        ModelSession(model)


def test_external_data_in_a_subgraph_is_checked(tmp_path: Path, canary: FifoCanary) -> None:
    """The escape hides in an If branch's initializer: still found, still refused."""
    inner = external_model(str(canary.path)).graph
    branch = oh.make_graph(
        list(inner.node), "then", [], [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4])], list(inner.initializer)
    )
    other = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["y2"])], "else", [], [oh.make_tensor_value_info("y2", TensorProto.FLOAT, [4])]
    )
    graph = oh.make_graph(
        [oh.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        "outer",
        [oh.make_tensor_value_info("c", TensorProto.BOOL, []), oh.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    folder = tmp_path / "1"
    folder.mkdir()
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), folder / "model.onnx")
    with pytest.raises(ModelLoadError, match="is an absolute path"):
        ModelSession(folder / "model.onnx")
    assert canary.opened == 0


# --- the server: version folders, repository entries, the load API --------------------------------


@pytest.fixture
def serve() -> Iterator[Any]:
    running: list[RunningServer] = []

    def start(config: ServerConfig, catalog: Catalog | None = None, **settings: Any) -> RunningServer:
        server = start_in_background(
            config, ServerSettings(http_port=0, grpc_port=0, log_level="warning", **settings), catalog
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def add_request(server: RunningServer, model: str = "add") -> httpx.Response:
    a = [1.0] * 16
    body = {
        "inputs": [
            {"name": "a", "shape": [1, 16], "datatype": "FP32", "data": a},
            {"name": "b", "shape": [1, 16], "datatype": "FP32", "data": a},
        ]
    }
    return httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body, timeout=30)


def index(server: RunningServer) -> dict[tuple[str, str], dict[str, str]]:
    entries = httpx.post(f"{server.http_url}/v2/repository/index", json={}).json()
    return {(e["name"], e["version"]): e for e in entries}


@pytest.fixture
def layout(tmp_path: Path, canary: FifoCanary) -> Path:
    """``repo/`` with a good model ``add``, and hostile neighbours outside it, the canary among them."""
    repo = tmp_path / "repo"
    models.write_version(repo, "add", 1, models.add_model())
    models.write_version(tmp_path / "repo_evil", "m", 1, models.add_model())  # a sibling-prefix of repo
    return repo


def grpc_load(server: RunningServer, name: str) -> grpc.RpcError | None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=pb.RepositoryModelLoadResponse.FromString,
        )
        try:
            call(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
        except grpc.RpcError as e:
            return e
    return None


@pytest.mark.parametrize(
    "name", ["../repo_evil/m", "..", "../repo_evil", "/etc", "a/b", ".hidden", "-m", "m\x00", "x" * 129]
)
def test_load_api_refuses_names_outside_the_safe_set(layout: Path, serve: Any, name: str) -> None:
    server = serve(
        parse_config({"model_config_list": [{"name": "add", "base_path": "add"}]}, "t", layout),
        Catalog(repository=layout),
        model_control_mode="explicit",
        load_models=("add",),
    )
    error = grpc_load(server, name)
    assert error is not None
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "invalid model name" in error.details()  # type: ignore[attr-defined]
    assert "../repo_evil/m" not in server.service.registry.names()
    assert add_request(server).status_code == 200


def test_repository_entries_that_lead_outside_are_not_served(layout: Path, serve: Any, canary: FifoCanary) -> None:
    """A model folder that is a symlink to a sibling-prefix folder (``repo_evil`` beside ``repo``) is
    neither scanned nor loadable by name."""
    (layout / "evil").symlink_to(layout.parent / "repo_evil" / "m")
    server = serve(
        parse_config({"model_config_list": [{"name": "add", "base_path": "add"}]}, "t", layout),
        Catalog(repository=layout),
        model_control_mode="explicit",
        load_models=("add",),
    )
    refused = httpx.post(f"{server.http_url}/v2/repository/models/evil/load")
    assert refused.status_code == 404
    assert "no model 'evil' in the repository" in refused.json()["error"]
    assert "evil" not in server.service.registry.names()
    assert add_request(server).status_code == 200


def version_folder_escapes(layout: Path, canary: FifoCanary) -> dict[str, str]:
    """Models whose version 1 tries to read outside, and the reason each must be refused with."""
    outside = layout.parent
    (layout / "sibling" / "1").mkdir(parents=True)
    # version folder -> a sibling-prefix of the base_path ("sibling_evil" beside "sibling")
    models.write_version(layout, "sibling_evil", 2, models.add_model())
    (layout / "sibling" / "2").symlink_to(layout / "sibling_evil" / "2")
    (layout / "sibling" / "1" / "model.onnx").write_bytes(models.add_model().SerializeToString())
    # model.onnx -> the canary
    (layout / "linked" / "1").mkdir(parents=True)
    (layout / "linked" / "1" / "model.onnx").symlink_to(canary.path)
    # a tokenizer file (any file of the folder) -> outside
    models.write_version(layout, "tokfile", 1, models.add_model())
    (layout / "tokfile" / "1" / "tokenizer.json").symlink_to(canary.path)
    # a FIFO inside the folder
    models.write_version(layout, "fifo", 1, models.add_model())
    os.mkfifo(layout / "fifo" / "1" / "vocab.txt")
    # a hard link to a file outside
    (layout / "hardlinked" / "1").mkdir(parents=True)
    outside_model = outside / "outside" / "model.onnx"
    outside_model.write_bytes(models.add_model().SerializeToString())
    os.link(outside_model, layout / "hardlinked" / "1" / "model.onnx")
    # external data -> outside
    write_external(layout / "external" / "1", "../../../outside/canary")
    return {
        "sibling": "version folder '2' leads outside the model's base_path",
        "linked": "'model.onnx' is a symbolic link that leads outside the version folder",
        "tokfile": "'tokenizer.json' is a symbolic link that leads outside the version folder",
        "fifo": "'vocab.txt' is not a regular file",
        "hardlinked": "'model.onnx' has 2 hard links",
        "external": "external data location '../../../outside/canary' leads out of the version folder",
    }


def test_version_folders_that_lead_outside_refuse_start_up(layout: Path, serve: Any, canary: FifoCanary) -> None:
    """At start-up a config that cannot be served is refused as a whole, naming every refused model."""
    expected = version_folder_escapes(layout, canary)
    config = parse_config(
        {"model_config_list": [{"name": n, "base_path": n} for n in ["add", *expected]]}, "escapes", layout
    )
    with pytest.raises(ConfigError) as refused:
        serve(config)
    for reason in expected.values():
        assert reason in refused.value.message
    assert canary.opened == 0


def test_version_folders_that_lead_outside_are_refused_by_the_load_api(
    layout: Path, serve: Any, canary: FifoCanary
) -> None:
    """Explicit control: each load is refused (400) with its reason, the index shows it UNAVAILABLE with
    the reason, and the good model keeps serving."""
    expected = version_folder_escapes(layout, canary)
    server = serve(
        parse_config({"model_config_list": [{"name": "add", "base_path": "add"}]}, "t", layout),
        Catalog(repository=layout),
        model_control_mode="explicit",
        load_models=("add",),
    )
    for name, reason in expected.items():
        answer = httpx.post(f"{server.http_url}/v2/repository/models/{name}/load", timeout=30)
        assert answer.status_code == 400, (name, answer.text)
        assert reason in answer.json()["error"], name
        assert add_request(server).status_code == 200
    listed = index(server)
    for name, reason in expected.items():
        version = "2" if name == "sibling" else "1"
        assert listed[(name, version)]["state"] == "UNAVAILABLE"
        assert reason in listed[(name, version)]["reason"]
    assert canary.opened == 0


def test_hard_links_load_when_the_model_allows_them(layout: Path, serve: Any) -> None:
    outside = layout.parent / "shared.onnx"
    outside.write_bytes(models.add_model().SerializeToString())
    (layout / "linked" / "1").mkdir(parents=True)
    os.link(outside, layout / "linked" / "1" / "model.onnx")
    config = parse_config(
        {"model_config_list": [{"name": "linked", "base_path": "linked", "allow_hardlinks": True}]}, "t", layout
    )
    server = serve(config)
    assert add_request(server, "linked").status_code == 200
