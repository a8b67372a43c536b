"""Hostile models: a corpus of broken and malicious ONNX files, generated here, beside a good model.

Each fails to load cleanly with its reason in the repository index, nothing crashes the process or
allocates what a model merely declares, and the good model keeps serving (issue #10).

Start-up and later loads differ on purpose, as in Triton (``--exit-on-error``, on by default): a
config or repository that cannot be served as a whole is refused at start-up with one message naming
every bad model; once serving, a bad model found by a poll or named by the load API is reported (index,
log, 400 to the load call) and everything else keeps serving.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import models
from onnxserve.core.manager import Catalog
from onnxserve.core.repository import scan_repository
from onnxserve.errors import ConfigError
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

OPSET = [oh.make_opsetid("", 17)]


def graph_model(nodes: list[onnx.NodeProto], inputs: Any, outputs: Any, initializers: Any = (), **kw: Any) -> bytes:
    graph = oh.make_graph(nodes, "hostile", inputs, outputs, list(initializers))
    return oh.make_model(graph, opset_imports=kw.pop("opsets", OPSET), ir_version=9, **kw).SerializeToString()


def x_in(shape: list[int] | None = None) -> list[onnx.ValueInfoProto]:
    return [oh.make_tensor_value_info("x", TensorProto.FLOAT, shape or [1])]


def y_out(shape: list[int] | None = None) -> list[onnx.ValueInfoProto]:
    return [oh.make_tensor_value_info("y", TensorProto.FLOAT, shape or [1])]


def with_field(change: Callable[[onnx.ModelProto], None]) -> bytes:
    model = models.add_model()
    change(model)
    return model.SerializeToString()


def corpus() -> dict[str, tuple[bytes, str]]:
    """Model name -> (model.onnx bytes, a phrase its load failure must contain)."""
    good = models.add_model().SerializeToString()
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**40])  # 4 TiB declared, nothing carried
    huge_constant = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[2**20, 2**20])
    missing = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1])
    missing.data_location = TensorProto.EXTERNAL
    missing.external_data.add(key="location", value="weights.bin")
    negative = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[-4])
    return {
        "truncated": (good[: len(good) // 2], "not an ONNX model"),
        "random_bytes": (np.random.default_rng(10).bytes(4096), "not an ONNX model"),
        "empty_file": (b"", "the file is empty"),
        "ir_zero": (with_field(lambda m: setattr(m, "ir_version", 0)), "IR version 0 is not a valid ONNX IR version"),
        "ir_future": (with_field(lambda m: setattr(m, "ir_version", 99)), "Unsupported model IR version: 99"),
        "opset_future": (
            with_field(lambda m: setattr(m.opset_import[0], "version", 999)),
            "needs opset 999 of the ONNX domain",
        ),
        "huge_initializer": (
            graph_model([oh.make_node("Add", ["x", "w"], ["y"])], x_in(), y_out(), [huge]),
            "initializer 'w' declares dims [1099511627776]",
        ),
        "huge_constant": (
            graph_model(
                [oh.make_node("Constant", [], ["c"], value=huge_constant), oh.make_node("Add", ["x", "c"], ["y"])],
                x_in(),
                y_out(),
            ),
            "declares dims [1048576, 1048576]",
        ),
        "negative_dims": (
            graph_model([oh.make_node("Add", ["x", "w"], ["y"])], x_in(), y_out(), [negative]),
            "declares a negative dimension",
        ),
        "unknown_op": (graph_model([oh.make_node("NoSuchOp", ["x"], ["y"])], x_in(), y_out()), "NoSuchOp"),
        "unknown_domain": (
            graph_model(
                [oh.make_node("Evil", ["x"], ["y"], domain="evil.domain")],
                x_in(),
                y_out(),
                opsets=[*OPSET, oh.make_opsetid("evil.domain", 1)],
            ),
            "evil.domain",
        ),
        "cyclic": (
            graph_model(
                [
                    oh.make_node("Add", ["x", "b"], ["a"]),
                    oh.make_node("Add", ["a", "x"], ["b"]),
                    oh.make_node("Identity", ["a"], ["y"]),
                ],
                x_in(),
                y_out(),
            ),
            "acyclic",
        ),
        "empty_graph": (graph_model([], [], []), "the graph has no outputs"),
        "missing_external_data": (
            graph_model([oh.make_node("Add", ["x", "w"], ["y"])], x_in(), y_out(), [missing]),
            "external data file 'weights.bin' is missing",
        ),
    }


def huge_input_model() -> bytes:
    """Valid, with a fixed 4 TiB input: it loads, and its warm-up must not allocate the input."""
    big = [2**20, 2**20]
    return graph_model([oh.make_node("Identity", ["x"], ["y"])], x_in(big), y_out(big))


def write_corpus(repository: Path) -> dict[str, str]:
    reasons = {}
    for name, (data, reason) in corpus().items():
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "model.onnx").write_bytes(data)
        reasons[name] = reason
    return reasons


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def add_works(server: RunningServer) -> bool:
    ones = [1.0] * 16
    tensors = [{"name": n, "shape": [1, 16], "datatype": "FP32", "data": ones} for n in ("a", "b")]
    answer = httpx.post(f"{server.http_url}/v2/models/add/infer", json={"inputs": tensors}, timeout=30)
    return answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [2.0] * 16


@pytest.fixture
def serve() -> Iterator[Any]:
    running: list[RunningServer] = []

    def start(repository: Path, **settings: Any) -> RunningServer:
        server = start_in_background(
            scan_repository(repository),
            ServerSettings(http_port=0, grpc_port=0, log_level="error", **settings),
            Catalog(repository=repository),
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def test_a_repository_with_hostile_models_is_refused_at_start_up_naming_each(tmp_path: Path, serve: Any) -> None:
    models.write_version(tmp_path, "add", 1, models.add_model())
    reasons = write_corpus(tmp_path)
    with pytest.raises(ConfigError) as refused:
        serve(tmp_path)
    for reason in reasons.values():
        assert reason in refused.value.message


def test_hostile_models_found_by_a_poll_fail_cleanly_and_the_good_model_keeps_serving(
    tmp_path: Path, serve: Any
) -> None:
    models.write_version(tmp_path, "add", 1, models.add_model())
    server = serve(tmp_path, model_control_mode="poll", repository_poll_secs=0.1)
    before = rss()
    reasons = write_corpus(tmp_path)
    (tmp_path / "huge_input" / "1").mkdir(parents=True)
    (tmp_path / "huge_input" / "1" / "model.onnx").write_bytes(huge_input_model())
    deadline = time.monotonic() + 60
    while True:
        listed = {e["name"]: e for e in httpx.post(f"{server.http_url}/v2/repository/index").json()}
        found = [listed.get(name, {}).get("state") for name in [*reasons, "huge_input"]]
        if all(state not in (None, "LOADING") for state in found) or time.monotonic() > deadline:
            break
        assert add_works(server)
        time.sleep(0.05)
    for name, reason in reasons.items():
        assert listed[name]["state"] == "UNAVAILABLE", name
        assert reason in listed[name]["reason"], (name, listed[name]["reason"])
    assert listed["add"]["state"] == "READY"
    assert listed["huge_input"]["state"] == "READY"  # valid: it loads, warm-up skipped
    assert rss() - before < 1024**3, "loading the corpus allocated what the models declare"
    assert add_works(server)
    assert httpx.get(f"{server.http_url}/v2/health/live").status_code == 200


def test_hostile_models_named_by_the_load_api_are_refused_with_their_reason(tmp_path: Path, serve: Any) -> None:
    models.write_version(tmp_path, "add", 1, models.add_model())
    reasons = write_corpus(tmp_path)
    server = serve(tmp_path, model_control_mode="explicit", load_models=("add",))
    for name, reason in reasons.items():
        answer = httpx.post(f"{server.http_url}/v2/repository/models/{name}/load", timeout=30)
        assert answer.status_code == 400, name
        assert f"model {name!r} failed to load" in answer.json()["error"]
        assert reason in answer.json()["error"], (name, answer.json()["error"])
        assert add_works(server)
