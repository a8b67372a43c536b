"""How the dynamic batcher cuts its queue into batches: preferred sizes (Triton's rule) and the balance
between idle instances. Batch sizes are read from the V2 statistics (``batch_stats``), which count
every execution once.

The model is ``paced``: y = x, after max(x) chained 64x64 products, so a request chooses how long its
batch runs. A "blocker" request with a huge value holds the only instance while a burst queues up, and
is then cancelled by its client: the server stops that run (ONNX Runtime's terminate flag) and the
instance forms batches from the full queue at once, with no timing to win.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest

import models
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.batching import DynamicBatcher
from onnxserve.server.lifecycle import RunningServer
from waiting import until

FOREVER = 1e9
"""A blocker's value: more products than any test waits for (it is always cancelled)."""


def paced_model() -> onnx.ModelProto:
    """y = x, after max(x) chained 64x64 products."""
    return models.value_paced_model("paced", 64)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("batch_forming")
    models.write_version(repo, "paced", 1, paced_model())
    return repo


@pytest.fixture
def serve(repository: Path, start_server: Callable[[ServerConfig], RunningServer]) -> Callable[..., RunningServer]:
    """Start a server of ``paced`` with these settings of its model (conftest's ``start_server``)."""

    def start(**entry: Any) -> RunningServer:
        document = {"model_config_list": [{"name": "paced", "base_path": "paced", **entry}]}
        return start_server(parse_config(document, "batch forming test", repository))

    return start


def body(*values: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [len(values), 1], "datatype": "FP32", "data": list(values)}]}


def batcher(server: RunningServer) -> DynamicBatcher:
    scheduler = server.service.registry.resolve("paced", None).scheduler
    assert isinstance(scheduler, DynamicBatcher)
    return scheduler


def batch_sizes(server: RunningServer) -> Counter[int]:
    """Executions per batch size, from the V2 statistics extension."""
    doc = httpx.get(f"{server.http_url}/v2/models/paced/stats").json()["model_stats"][0]
    return Counter({b["batch_size"]: b["compute_infer"]["count"] for b in doc["batch_stats"]})


async def burst_behind_a_blocker(server: RunningServer, blocker_rows: int, count: int) -> list[httpx.Response]:
    """Occupy the only instance with a blocker, queue ``count`` one-row requests (values 1..count), then
    cancel the blocker; every answer of the burst."""
    url = f"{server.http_url}/v2/models/paced/infer"
    scheduler = batcher(server)
    limits = httpx.Limits(max_connections=count + 1)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        blocker = asyncio.create_task(client.post(url, json=body(FOREVER, *[0.0] * (blocker_rows - 1))))
        await until(lambda: scheduler.pool.busy == [1])
        burst = [asyncio.create_task(client.post(url, json=body(float(i)))) for i in range(1, count + 1)]
        await until(lambda: scheduler.queued() == count)
        assert scheduler.pool.busy == [1], "the blocker ended before the burst had queued"
        blocker.cancel()  # the client hangs up: the server stops the run and frees the instance
        return list(await asyncio.gather(*burst))


@pytest.mark.parametrize(("count", "expected"), [(19, {8: 2, 3: 1}), (11, {8: 1, 3: 1}), (14, {8: 1, 4: 1, 2: 1})])
def test_a_queue_is_cut_into_the_largest_preferred_sizes(
    serve: Callable[..., RunningServer], count: int, expected: dict[int, int]
) -> None:
    """Preferred sizes [4, 8], max_batch_size 16: a full queue goes out as 8s (not one 16), then 4s; what
    is left (no preferred size) goes when the delay expires."""
    server = serve(
        max_batch_size=16,
        dynamic_batching={"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 300_000},
    )
    responses = asyncio.run(burst_behind_a_blocker(server, 4, count))
    for i, response in enumerate(responses, start=1):
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [i]  # each caller got its own row
    assert batch_sizes(server) == Counter(expected)  # the blocker was stopped, so it is not counted


def test_without_preferred_sizes_a_full_queue_goes_up_to_max_batch_size(serve: Callable[..., RunningServer]) -> None:
    server = serve(max_batch_size=16, dynamic_batching={"max_queue_delay_us": 300_000})
    responses = asyncio.run(burst_behind_a_blocker(server, 1, 19))
    assert [r.status_code for r in responses] == [200] * 19
    assert batch_sizes(server) == Counter({16: 1, 3: 1})


def test_a_preferred_size_goes_at_once_without_waiting_for_the_delay(serve: Callable[..., RunningServer]) -> None:
    server = serve(max_batch_size=16, dynamic_batching={"preferred_batch_sizes": [4], "max_queue_delay_us": 30_000_000})
    started = time.perf_counter()
    response = httpx.post(f"{server.http_url}/v2/models/paced/infer", json=body(1, 2, 3, 4), timeout=60)
    assert response.status_code == 200
    assert time.perf_counter() - started < 10, "a preferred size waited for the 30 s delay"
    assert batch_sizes(server) == Counter({4: 1})


async def burst(server: RunningServer, count: int, value: float) -> list[httpx.Response]:
    url = f"{server.http_url}/v2/models/paced/infer"
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return list(await asyncio.gather(*(client.post(url, json=body(value)) for _ in range(count))))


def test_two_idle_instances_split_a_burst_evenly(serve: Callable[..., RunningServer]) -> None:
    """instance_count 2, max_batch_size 16, a 30 s delay: the 16th request fills the batch while both
    instances are idle, so each instance gets 8 (before: one batch of 16, the other instance idle)."""
    server = serve(
        max_batch_size=16,
        instance_count=2,
        session_options={"intra_op_num_threads": 1},
        dynamic_batching={"max_queue_delay_us": 30_000_000},
    )
    responses = asyncio.run(burst(server, 16, 5.0))
    assert [r.status_code for r in responses] == [200] * 16
    assert all(r.json()["outputs"][0]["data"] == [5.0] for r in responses)
    assert batch_sizes(server) == Counter({8: 2})
    assert batcher(server).pool.executions == [1, 1], "both instances should have run one batch"


def test_when_the_delay_expires_idle_instances_share_the_queue(serve: Callable[..., RunningServer]) -> None:
    """instance_count 2, 10 requests, a 1 s delay: when it expires both instances are idle, so 5 + 5."""
    server = serve(
        max_batch_size=16,
        instance_count=2,
        session_options={"intra_op_num_threads": 1},
        dynamic_batching={"max_queue_delay_us": 1_000_000},
    )
    responses = asyncio.run(burst(server, 10, 3.0))
    assert [r.status_code for r in responses] == [200] * 10
    assert batch_sizes(server) == Counter({5: 2})
    assert batcher(server).pool.executions == [1, 1]
