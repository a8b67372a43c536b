"""The default layout adapts to the load (issue #18): a config that sets none of ``max_batch_size``,
``instance_count``, ``dynamic_batching`` and the intra-op threads gets ONE session per version, run by up
to as many threads at once as the process has CPUs, and (a text model whose graph has one dynamic batch
dimension) a batcher that takes whatever is queued the moment a slot frees, without waiting. Tensor-only
models run side by side but never merge: their rows may depend on each other. A config that sets any
of those keeps exactly what it set.

What ran is read from the scheduler (which session each slot runs) and from the V2 statistics
(``batch_stats`` counts every execution once, by its rows); nothing here is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
import pytest

import models
from onnxserve.config import DynamicBatching, ServerConfig, parse_config
from onnxserve.core.batching import DirectScheduler, DynamicBatcher, InstancePool
from onnxserve.core.cpu import cpu_budget
from onnxserve.core.execution import Work, run_batch
from onnxserve.core.pipeline import TextBatch
from onnxserve.core.registry import ADAPTIVE_GATHER_US, ADAPTIVE_MAX_ROWS, ADAPTIVE_MAX_TOKENS
from onnxserve.core.runtime import ModelSession
from onnxserve.core.service import INLINE_TOKENIZE_CHARACTERS
from onnxserve.server.lifecycle import RunningServer
from waiting import until

FOREVER = 1e9
"""A blocker's value: more products than any test waits for (it is always cancelled)."""


def unnamed_batch_model() -> onnx.ModelProto:
    """y = x + 1 whose input and output first dims are dynamic but named differently: not provably a batch."""
    return models.parse(
        """
        unnamed (float[n, 2] x) => (float[m, 2] y) {
            one = Constant <value = float {1.0}> ()
            y = Add(x, one)
        }
        """
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("adaptive")
    models.write_version(repo, "paced", 1, models.value_paced_model("paced", 64))
    models.write_version(repo, "unnamed", 1, unnamed_batch_model())
    return repo


StartServer = Callable[[ServerConfig], RunningServer]


@pytest.fixture
def serve(repository: Path, start_server: StartServer) -> Callable[..., RunningServer]:
    """Serve one model of ``repository`` with the given config entry (conftest's ``start_server``)."""

    def start(name: str = "paced", **entry: Any) -> RunningServer:
        document = {"model_config_list": [{"name": name, "base_path": name, **entry}]}
        return start_server(parse_config(document, "adaptive layout test", repository))

    return start


def body(*values: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [len(values), 1], "datatype": "FP32", "data": list(values)}]}


def batch_sizes(server: RunningServer, model: str = "paced") -> Counter[int]:
    doc = httpx.get(f"{server.http_url}/v2/models/{model}/stats").json()["model_stats"][0]
    return Counter({b["batch_size"]: b["compute_infer"]["count"] for b in doc["batch_stats"]})


def test_the_default_is_one_session_run_side_by_side(serve: Callable[..., RunningServer]) -> None:
    """A tensor model: one session, one slot per CPU, and requests never merged (its graph's rows may
    depend on each other, which the server cannot see)."""
    server = serve()
    version = server.service.registry.resolve("paced", None)
    scheduler = version.scheduler
    assert isinstance(scheduler, DirectScheduler), "a tensor-only model's requests are not merged by default"
    sessions = scheduler.pool.sessions
    assert len(sessions) == cpu_budget(), "one slot per CPU"
    assert all(s is sessions[0] for s in sessions), "every slot runs the same session: the weights are loaded once"
    spinning = sessions[0].ort_options.get_session_config_entry("session.intra_op.allow_spinning")
    assert spinning == "0", "runs side by side share the pool: its threads must not spin-wait"
    # Clients see the model as the config left it: no batch dimension, so a large request is not refused.
    assert httpx.get(f"{server.http_url}/v2/models/paced/config").json()["max_batch_size"] == 0
    rows = [float(i % 3) for i in range(ADAPTIVE_MAX_ROWS + 8)]
    answer = httpx.post(f"{server.http_url}/v2/models/paced/infer", json=body(*rows), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == rows


def test_a_text_model_merges_by_default(tiny_text_version: Path, start_server: StartServer) -> None:
    """A text model (a tokenizer beside an encoder whose inputs and outputs share the batch dimension):
    the same session and slots, and a zero-delay batcher of up to 32 rows and a token budget; texts sent
    side by side get the embedding each gets alone."""
    document = {"model_config_list": [{"name": "tiny", "base_path": str(tiny_text_version.parent)}]}
    server = start_server(parse_config(document, "adaptive layout test", tiny_text_version.parent))
    scheduler = server.service.registry.resolve("tiny", None).scheduler
    assert isinstance(scheduler, DynamicBatcher)
    assert scheduler.max_batch_size == ADAPTIVE_MAX_ROWS
    assert scheduler.settings.max_queue_delay_us == 0
    assert scheduler.settings.max_batch_tokens == ADAPTIVE_MAX_TOKENS
    assert scheduler.gather_us == ADAPTIVE_GATHER_US
    assert not scheduler.settings.preferred_batch_sizes
    assert all(s is scheduler.pool.sessions[0] for s in scheduler.pool.sessions)
    assert httpx.get(f"{server.http_url}/v2/models/tiny/config").json()["max_batch_size"] == 0
    url = f"{server.http_url}/v2/models/tiny/infer"
    texts = ["hello", "the quick brown fox jumps over the lazy dog " * 3, "a", "what is this?"]

    def embed(client: httpx.Client, text: str) -> list[float]:
        answer = client.post(
            url, json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        )
        assert answer.status_code == 200, answer.text
        data: list[float] = answer.json()["outputs"][0]["data"]
        return data

    with httpx.Client(timeout=60) as client:
        alone = {t: np.array(embed(client, t)) for t in texts}

    async def side_by_side() -> list[list[float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}]} for t in texts]
            answers = await asyncio.gather(*(client.post(url, json=b) for b in bodies * 8))
            return [a.json()["outputs"][0]["data"] for a in answers]

    for text, got in zip(texts * 8, asyncio.run(side_by_side()), strict=True):
        np.testing.assert_allclose(np.array(got), alone[text], atol=1e-5)


def test_short_texts_are_tokenized_on_the_event_loop_long_ones_on_the_inference_threads(
    tiny_text_version: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request of at most INLINE_TOKENIZE_CHARACTERS characters is tokenized on the event loop, where it
    was decoded (no thread hop; it queues at once); a longer one on the service's threads, so that the
    loop never stalls on it. Either way each text gets what it gets alone."""
    document = {"model_config_list": [{"name": "tiny", "base_path": str(tiny_text_version.parent)}]}
    server = start_server(parse_config(document, "adaptive layout test", tiny_text_version.parent))
    pipeline = server.service.registry.resolve("tiny", None).pipeline
    assert pipeline is not None
    where: list[tuple[int, bool]] = []  # (characters, tokenized on the event loop)
    tokenize = pipeline.tokenize

    def recording(batch: TextBatch) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        where.append((sum(map(len, batch.texts)), on_loop))
        return tokenize(batch)

    monkeypatch.setattr(pipeline, "tokenize", recording)
    url = f"{server.http_url}/v2/models/tiny/infer"
    short = "the quick brown fox jumps over the lazy dog"
    long = "a sentence that goes on and on, " * (INLINE_TOKENIZE_CHARACTERS // 32 + 1)
    assert len(long) > INLINE_TOKENIZE_CHARACTERS
    edge = "x" * INLINE_TOKENIZE_CHARACTERS

    def embed(client: httpx.Client, *texts: str) -> list[list[float]]:
        inputs = [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]
        answer = client.post(url, json={"inputs": inputs})
        assert answer.status_code == 200, answer.text
        output = answer.json()["outputs"][0]
        rows: list[list[float]] = np.array(output["data"]).reshape(output["shape"]).tolist()
        return rows

    with httpx.Client(timeout=60) as client:
        (short_alone,) = embed(client, short)
        (edge_alone,) = embed(client, edge)
        (long_alone,) = embed(client, long)
        together = embed(client, short, long)  # more than the limit in all
        two_short = embed(client, short, short)
    assert where == [
        (len(short), True),
        (len(edge), True),
        (len(long), False),
        (len(short) + len(long), False),
        (2 * len(short), True),
    ]
    np.testing.assert_allclose(together[0], short_alone, atol=1e-5)
    np.testing.assert_allclose(together[1], long_alone, atol=1e-5)
    np.testing.assert_allclose(two_short[1], short_alone, atol=1e-5)
    assert not np.allclose(edge_alone, short_alone)


def test_a_lone_request_runs_alone_at_once(serve: Callable[..., RunningServer]) -> None:
    """One client, one request at a time: every request is an execution of its own (nothing waits for
    company that is not coming)."""
    server = serve()
    with httpx.Client(timeout=60) as client:
        for value in (1.0, 2.0, 3.0, 4.0, 5.0):
            answer = client.post(f"{server.http_url}/v2/models/paced/infer", json=body(value))
            assert answer.json()["outputs"][0]["data"] == [value]
    assert batch_sizes(server) == Counter({1: 5})
    scheduler = server.service.registry.resolve("paced", None).scheduler
    assert scheduler.pool.executions[0] == 5, "under light load every run comes from the same thread"


def test_a_queue_that_built_up_behind_busy_slots_runs_merged(repository: Path) -> None:
    """The adaptive batcher over one session with two slots, both held by blockers, 6 one-row requests
    queue; when the blockers' callers leave (their runs are stopped), the freed slots take the whole queue
    in merged runs, and each caller gets its own row."""
    session = ModelSession(repository / "paced" / "1" / "model.onnx", name="paced")
    slots = 2
    pool = InstancePool([session] * slots, "paced", sticky=True)
    sizes: list[int] = []
    run = partial(run_batch, pipeline=None, output_specs=session.outputs)
    batcher = DynamicBatcher(
        pool, run, lambda size, _: sizes.append(size), ADAPTIVE_MAX_ROWS, DynamicBatching(), "paced"
    )
    count = 6

    def work(value: float) -> Work:
        return Work(["y"], 1, feeds={"x": np.array([[value]], dtype=np.float32)})

    async def scenario() -> list[float]:
        blockers = []
        for _ in range(slots):
            blockers.append(asyncio.create_task(batcher.submit(work(FOREVER))))
            await until(lambda: sum(pool.busy) == len(blockers))
        burst = [asyncio.create_task(batcher.submit(work(float(i)))) for i in range(1, count + 1)]
        await until(lambda: batcher.queued() == count)
        assert all(pool.busy), "a blocker ended before the burst had queued"
        for blocker in blockers:
            blocker.cancel()
        answers = await asyncio.gather(*burst)
        await batcher.stop()
        return [float(a.outcome.outputs["y"][0, 0]) for a in answers]

    try:
        assert asyncio.run(scenario()) == [float(i) for i in range(1, count + 1)]
    finally:
        pool.close()
    assert sum(sizes) == count, "the stopped blockers are not executions"
    assert len(sizes) <= slots, f"the queue should go in at most one run per slot: {sizes}"
    assert max(sizes) >= count // slots


@pytest.mark.parametrize(
    "entry",
    [
        {"max_batch_size": 0},
        {"instance_count": 1},
        {"session_options": {"intra_op_num_threads": 1}},
        {"dynamic_batching": {"max_queue_size": 4}},
    ],
)
def test_a_layout_set_by_hand_is_kept(serve: Callable[..., RunningServer], entry: dict[str, Any]) -> None:
    server = serve(**entry)
    scheduler = server.service.registry.resolve("paced", None).scheduler
    assert isinstance(scheduler, DirectScheduler), "max_batch_size unset or 0 set by hand: no batching"
    assert len(scheduler.pool.sessions) == 1, "instance_count 1: one instance, one run at a time"


def test_instance_count_by_hand_gets_its_own_sessions(serve: Callable[..., RunningServer]) -> None:
    server = serve(instance_count=2, max_batch_size=8)
    scheduler = server.service.registry.resolve("paced", None).scheduler
    assert isinstance(scheduler, DynamicBatcher)
    assert scheduler.max_batch_size == 8
    first, second = scheduler.pool.sessions
    assert first is not second


def test_a_graph_without_one_named_batch_dimension_is_not_merged(serve: Callable[..., RunningServer]) -> None:
    """Dynamic first dims named differently on input and output: the server cannot tell they are one
    batch, so requests run side by side on the one session but never merge."""
    server = serve("unnamed")
    scheduler = server.service.registry.resolve("unnamed", None).scheduler
    assert isinstance(scheduler, DirectScheduler)
    assert all(s is scheduler.pool.sessions[0] for s in scheduler.pool.sessions)
    data = [1.0, 2.0, 3.0, 4.0]
    answer = httpx.post(
        f"{server.http_url}/v2/models/unnamed/infer",
        json={"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": data}]},
        timeout=60,
    )
    assert answer.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]


def test_spinning_set_by_hand_keeps_the_default_layout(serve: Callable[..., RunningServer]) -> None:
    server = serve(session_options={"intra_op_allow_spinning": True})
    scheduler = server.service.registry.resolve("paced", None).scheduler
    assert len(scheduler.pool.sessions) == cpu_budget()
    session = scheduler.pool.sessions[0]
    assert session.ort_options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_a_batch_waits_for_a_request_on_its_way_while_another_run_keeps_the_cores_busy(repository: Path) -> None:
    """One slot runs a blocker; a request queues while another is still on its way (being tokenized): the
    free slot waits for it, and the two run as one batch. With nothing on its way it would have gone alone."""
    session = ModelSession(repository / "paced" / "1" / "model.onnx", name="paced")
    pool = InstancePool([session, session], "paced", sticky=True)
    sizes: list[int] = []
    run = partial(run_batch, pipeline=None, output_specs=session.outputs)
    batcher = DynamicBatcher(
        pool, run, lambda size, _: sizes.append(size), 32, DynamicBatching(), "paced", gather_us=60_000_000
    )

    def work(value: float) -> Work:
        return Work(["y"], 1, feeds={"x": np.array([[value]], dtype=np.float32)})

    async def scenario() -> list[float]:
        blocker = asyncio.create_task(batcher.submit(work(FOREVER)))
        await until(lambda: sum(pool.busy) == 1)
        batcher.incoming = 1  # a request being tokenized
        first = asyncio.create_task(batcher.submit(work(1.0)))
        assert batcher._arrived is not None
        arrived = batcher._arrived
        await until(lambda: batcher.queued() == 1 and not arrived.is_set())  # the batcher looked, and waits
        assert pool.busy.count(1) == 1, "the free slot should wait for the request on its way"
        batcher.incoming = 0
        second = asyncio.create_task(batcher.submit(work(2.0)))
        answers = await asyncio.gather(first, second)
        blocker.cancel()
        await batcher.stop()
        return [float(a.outcome.outputs["y"][0, 0]) for a in answers]

    try:
        assert asyncio.run(scenario()) == [1.0, 2.0]
    finally:
        pool.close()
    assert sizes == [2], "the stopped blocker is no execution; the two requests ran as one batch"


def test_large_text_requests_tokenize_within_the_text_budget(
    tiny_text_version: Path, start_server: StartServer
) -> None:
    """Text requests above the inline size hold their characters in their model's room from tokenizing until
    they have run, and in the server-wide budget while they are tokenized: six concurrent requests of 30,000
    characters under rooms of 70,000 are never more than two at once, and each gets the answer it gets alone
    (outside attack: 4 M characters of '!' per request, several at once, made the tokenizer fail to allocate
    and abort the process)."""
    document = {"model_config_list": [{"name": "tiny", "base_path": str(tiny_text_version.parent)}]}
    server = start_server(parse_config(document, "text budget test", tiny_text_version.parent))
    shared = server.service.text_budget.small  # requests of 30,000 characters are small (at most 64 Ki)
    room = server.service.registry.resolve("tiny", None).text_room.small
    shared.limit = room.limit = 70_000
    url = f"{server.http_url}/v2/models/tiny/infer"

    def infer(text: str) -> httpx.Response:
        inputs = [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]
        return httpx.post(url, json={"inputs": inputs}, timeout=120)

    texts = [f"{i} {'! ' * 15_000}" for i in range(6)]  # 30,000+ characters each, under the per-text cut
    alone = [infer(t) for t in texts]
    assert shared.peak <= 31_000
    assert room.peak <= 31_000
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(infer, texts))
    assert [r.status_code for r in alone + together] == [200] * 12, [r.text[:200] for r in together]
    for one, merged in zip(alone, together, strict=True):  # merged runs may round differently
        assert np.allclose(one.json()["outputs"][0]["data"], merged.json()["outputs"][0]["data"], atol=1e-5)
    assert 30_000 < room.peak <= room.limit
    assert shared.peak <= shared.limit
    assert room.used == shared.used == 0


def test_a_tokenize_request_whose_client_leaves_is_dropped(tiny_text_version: Path, start_server: StartServer) -> None:
    """Outside attack: /tokenize requests went on after their clients had left (1 Mi characters each, reset
    after 0.5 s: 200 of them still running at SIGTERM, +1.2 GB); now they are cancelled like inference."""
    document = {"model_config_list": [{"name": "tiny", "base_path": str(tiny_text_version.parent)}]}
    server = start_server(parse_config(document, "tokenize disconnect test", tiny_text_version.parent))
    endings: list[str] = []
    tokenized = server.service.tokenized

    @contextlib.asynccontextmanager
    async def spied(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async with tokenized(*args, **kwargs) as encodings:
                yield encodings
        except asyncio.CancelledError:
            endings.append("cancelled")
            raise
        endings.append("finished")

    server.service.tokenized = spied  # type: ignore[method-assign]
    body = orjson.dumps({"inputs": ["! " * 8000] * 60})  # about 1 M characters: tokenizing takes a while
    head = (
        f"POST /tokenize HTTP/1.1\r\nHost: [::1]\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(server.http_url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while not endings and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endings == ["cancelled"]
    answer = httpx.post(f"{server.http_url}/tokenize", json={"inputs": "a few words"}, timeout=30)
    assert answer.status_code == 200


def test_a_tokenize_request_holds_its_model_room_until_its_answer_is_built(
    tiny_text_version: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside attack: 128 concurrent /tokenize requests of 2,048 texts grew the server by 45 MB each until it
    crashed, their encodings waiting for the answer's conversion uncounted. Now the characters of a
    /tokenize request stay in its model's room until its answer is built (tests/adversarial/
    test_tokenize_memory.py measures the memory, under the `long` marker)."""
    from onnxserve.protocols.tei import codec

    document = {"model_config_list": [{"name": "tiny", "base_path": str(tiny_text_version.parent)}]}
    server = start_server(parse_config(document, "tokenize room test", tiny_text_version.parent))
    room = server.service.registry.resolve("tiny", None).text_room.small  # small requests (at most 64 Ki)
    room.limit = 70_000
    held_while_built: list[int] = []
    build = codec.tokens

    def spied(*args: Any) -> Any:
        held_while_built.append(room.used)
        return build(*args)

    monkeypatch.setattr(codec, "tokens", spied)
    texts = [f"{i} {'! ' * 15_000}" for i in range(5)]  # 30,000+ characters each
    with ThreadPoolExecutor(5) as pool:
        answers = list(
            pool.map(lambda t: httpx.post(f"{server.http_url}/tokenize", json={"inputs": t}, timeout=120), texts)
        )
    assert [a.status_code for a in answers] == [200] * 5
    assert len(held_while_built) == 5
    cut = server.service.model_metadata("tiny").text_characters  # each text counts as cut for the tokenizer
    assert all(cut <= used <= 70_000 for used in held_while_built), held_while_built  # its own and others
    assert room.peak <= room.limit
    assert room.used == 0
