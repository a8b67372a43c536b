"""Dynamic batching and instances: every caller gets exactly its own rows, whatever it was batched with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

import models
from onnxserve import Pipeline
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.pipeline import TextBatch
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

Array = npt.NDArray[Any]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("batching")
    models.write_version(repo, "add", 1, models.add_model())
    models.write_version(repo, "rowsum", 1, models.rowsum_model())
    models.write_version(repo, "lookup", 1, models.lookup_model())
    models.write_version(repo, "slowb", 1, models.slow_batch_model(50000))
    models.write_version(repo, "fixed", 1, models.fixed_model())
    return repo


def config(repository: Path, *entries: dict[str, Any]) -> ServerConfig:
    return parse_config({"model_config_list": list(entries)}, "test", repository)


@pytest.fixture
def serve() -> Iterator[Any]:
    running: list[RunningServer] = []

    def start(cfg: ServerConfig, threads: int = 16) -> RunningServer:
        server = start_in_background(
            cfg, ServerSettings(http_port=0, grpc_port=0, inference_threads=threads, log_level="warning")
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def tensor(name: str, array: Array) -> dict[str, Any]:
    datatype = {"float32": "FP32", "int64": "INT64"}[str(array.dtype)]
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}


def outputs(response: httpx.Response) -> dict[str, Array]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


async def fire(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send every body at once (one connection each) and wait for every answer."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return list(await asyncio.gather(*(client.post(url, json=body) for body in bodies)))


def stats(server: RunningServer, model: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{server.http_url}/v2/models/{model}/stats").json()["model_stats"][0]
    return doc


def test_concurrent_clients_with_different_batch_sizes_get_their_own_rows(repository: Path, serve: Any) -> None:
    server = serve(
        config(
            repository,
            {
                "name": "add",
                "base_path": "add",
                "max_batch_size": 8,
                "dynamic_batching": {"max_queue_delay_us": 50_000},
            },
        )
    )
    rng = np.random.default_rng(7)
    sizes = [int(rng.integers(1, 4)) for _ in range(24)]
    feeds = [
        (rng.standard_normal((n, 16)).astype(np.float32), rng.standard_normal((n, 16)).astype(np.float32))
        for n in sizes
    ]
    bodies = [{"id": str(i), "inputs": [tensor("a", a), tensor("b", b)]} for i, (a, b) in enumerate(feeds)]
    responses = asyncio.run(fire(f"{server.http_url}/v2/models/add/infer", bodies))
    for i, ((a, b), response) in enumerate(zip(feeds, responses, strict=True)):
        assert response.json()["id"] == str(i)
        got = outputs(response)
        np.testing.assert_allclose(got["sum"], a + b, rtol=1e-6)
        np.testing.assert_allclose(got["diff"], a - b, rtol=1e-6)
    s = stats(server, "add")
    assert s["inference_count"] == sum(sizes)
    assert s["execution_count"] < len(sizes), "requests were never merged into batches"
    assert max(b["batch_size"] for b in s["batch_stats"]) > 3
    assert all(b["batch_size"] <= 8 for b in s["batch_stats"])


def test_only_compatible_shapes_merge(repository: Path, serve: Any) -> None:
    server = serve(
        config(
            repository,
            {
                "name": "rowsum",
                "base_path": "rowsum",
                "max_batch_size": 16,
                "dynamic_batching": {"max_queue_delay_us": 50_000},
            },
        )
    )
    rng = np.random.default_rng(3)
    arrays = [
        rng.standard_normal((int(rng.integers(1, 3)), int(rng.choice([3, 5, 8])))).astype(np.float32) for _ in range(18)
    ]
    bodies = [{"inputs": [tensor("x", x)]} for x in arrays]
    responses = asyncio.run(fire(f"{server.http_url}/v2/models/rowsum/infer", bodies))
    session = ort.InferenceSession(str(repository / "rowsum" / "1" / "model.onnx"))
    for x, response in zip(arrays, responses, strict=True):
        total, doubled = session.run(["total", "doubled"], {"x": x})
        got = outputs(response)
        np.testing.assert_allclose(got["total"], total, rtol=1e-5)
        np.testing.assert_allclose(got["doubled"], doubled, rtol=1e-6)
    s = stats(server, "rowsum")
    assert s["execution_count"] < len(arrays)  # merged, and only by width (or the sums above would be wrong)


def test_a_failing_request_fails_alone(repository: Path, serve: Any) -> None:
    server = serve(
        config(
            repository,
            {
                "name": "lookup",
                "base_path": "lookup",
                "max_batch_size": 8,
                "dynamic_batching": {"max_queue_delay_us": 200_000, "preferred_batch_sizes": [4]},
            },
        )
    )
    indices = [[[0]], [[2]], [[7]], [[3]]]  # 7 is outside the table: that request, and only it, fails
    bodies = [{"inputs": [tensor("index", np.array(i, dtype=np.int64))]} for i in indices]
    responses = asyncio.run(fire(f"{server.http_url}/v2/models/lookup/infer", bodies))
    assert [r.status_code for r in responses] == [200, 200, 400, 200]
    assert "out of data bounds" in responses[2].json()["error"] or "indices" in responses[2].json()["error"]
    for index, response in zip(indices, responses, strict=True):
        if response.status_code == 200:
            assert outputs(response)["value"].ravel().tolist() == [10.0 * (index[0][0] + 1)]
    good = httpx.post(
        f"{server.http_url}/v2/models/lookup/infer", json={"inputs": [tensor("index", np.array([[1]], dtype=np.int64))]}
    )
    assert outputs(good)["value"].ravel().tolist() == [20.0]


def test_full_queue_refuses_at_once_with_retry_after(repository: Path, serve: Any) -> None:
    server = serve(
        config(
            repository,
            {"name": "slowb", "base_path": "slowb", "max_batch_size": 1, "dynamic_batching": {"max_queue_size": 2}},
        )
    )
    url = f"{server.http_url}/v2/models/slowb/infer"
    body = {"inputs": [tensor("x", np.ones((1, 256), dtype=np.float32))]}
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(httpx.post(url, json=body, timeout=120)))
    first.start()
    batcher = server.service.registry.resolve("slowb", None).scheduler
    deadline = time.monotonic() + 30
    while batcher.pool.busy != [1] and time.monotonic() < deadline:  # the first request is running
        time.sleep(0.005)
    k = 3
    responses = asyncio.run(fire(url, [body] * (2 + k)))  # 2 fit the queue, k do not
    first.join()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200] + [503] * k
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert "max_queue_size 2" in r.json()["error"]
    assert results[0].status_code == 200


def test_tf_serving_answers_429_when_the_queue_is_full(repository: Path, serve: Any) -> None:
    server = serve(
        config(
            repository,
            {"name": "slowb", "base_path": "slowb", "max_batch_size": 1, "dynamic_batching": {"max_queue_size": 1}},
        )
    )
    url = f"{server.http_url}/v1/models/slowb:predict"
    body = {"instances": [[1.0] * 256]}
    responses = asyncio.run(fire(url, [body] * 4))  # one runs, one waits, two are refused
    codes = sorted(r.status_code for r in responses)
    assert codes.count(429) >= 1
    assert set(codes) <= {200, 429}
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 429)


def test_instances_run_side_by_side(repository: Path, serve: Any) -> None:
    server = serve(config(repository, {"name": "slowb", "base_path": "slowb", "instance_count": 2}))
    model = server.service.registry.resolve("slowb", None)
    assert len(model.scheduler.pool.sessions) == 2
    threads = model.config.instance_count
    url = f"{server.http_url}/v2/models/slowb/infer"
    body = {"inputs": [tensor("x", np.ones((1, 256), dtype=np.float32))]}
    seen: list[list[int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(list(model.scheduler.pool.busy))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        responses = asyncio.run(fire(url, [body, body]))
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in responses] == [200, 200]
    assert [1, 1] in seen, "the two requests never ran on both instances at once"
    assert threads == 2


@pytest.mark.slow
def test_text_requests_of_different_lengths_batch_correctly(demo_repository: Path, serve: Any) -> None:
    cfg = parse_config(
        {
            "model_config_list": [
                {
                    "name": "minilm",
                    "base_path": "minilm",
                    "max_batch_size": 32,
                    "dynamic_batching": {"max_queue_delay_us": 50_000, "max_batch_tokens": 2048},
                }
            ]
        },
        "test",
        demo_repository,
    )
    server = serve(cfg)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "onnx",
        "serves",
        "many",
        "models",
    ]
    rng = np.random.default_rng(11)
    requests = [
        [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(int(rng.integers(1, 4)))]
        for _ in range(20)
    ]
    bodies = [{"inputs": [{"name": "text", "shape": [len(t)], "datatype": "BYTES", "data": t}]} for t in requests]
    responses = asyncio.run(fire(f"{server.http_url}/v2/models/minilm/infer", bodies))
    local = Pipeline(demo_repository / "minilm" / "1")
    for texts, response in zip(requests, responses, strict=True):
        np.testing.assert_allclose(outputs(response)["embedding"], local(texts), atol=2e-5)
    s = stats(server, "minilm")
    assert s["execution_count"] < len(requests)


@pytest.mark.slow
def test_token_level_outputs_are_cut_to_each_callers_length(demo_repository: Path, serve: Any) -> None:
    cfg = parse_config(
        {
            "model_config_list": [
                {
                    "name": "minilm",
                    "base_path": "minilm",
                    "max_batch_size": 32,
                    "dynamic_batching": {"max_queue_delay_us": 100_000, "preferred_batch_sizes": [2]},
                }
            ]
        },
        "test",
        demo_repository,
    )
    server = serve(cfg)
    short, long = ["hi"], ["a much longer sentence with many more tokens than the other one"]
    bodies = [
        {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": t}],
            "outputs": [{"name": "last_hidden_state"}],
        }
        for t in (short, long)
    ]
    responses = asyncio.run(fire(f"{server.http_url}/v2/models/minilm/infer", bodies))
    local = Pipeline(demo_repository / "minilm" / "1")
    for texts, response in zip((short, long), responses, strict=True):
        hidden = outputs(response)["last_hidden_state"]
        encoded = local.text.encode(TextBatch(texts))
        expected = local.session.run(encoded.feeds, ["last_hidden_state"])["last_hidden_state"]
        assert hidden.shape == expected.shape
        np.testing.assert_allclose(hidden, expected, atol=2e-5)


def test_a_fixed_batch_dimension_turns_batching_off(
    repository: Path, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        server = serve(config(repository, {"name": "fixed", "base_path": "fixed", "max_batch_size": 4}))
    assert any("batching off" in r.getMessage() for r in caplog.records)
    assert httpx.get(f"{server.http_url}/v2/models/fixed/config").json()["max_batch_size"] == 0
