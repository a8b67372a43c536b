"""One huge request of a text model must neither take gigabytes in attention nor hold the model for
everyone else. Token tensors sent directly (``input_ids`` [64, 512]) used to run as one execution whose
attention took gigabytes, and a request of many long texts held its model slot until it was done. Now
a text model's request above the token budget (rows x tokens) runs in chunks, one after another, that
other requests can run between; a token tensor longer than the model reads is refused.

The model: a tiny BERT whose attention is wide (8 heads, 512 positions), so that its attention, not its
weights, takes the memory, as in a real encoder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
from harness import CappedServer, serve_config
from watch import Watch

import tiny_text_models
from onnxserve.core.attention_memory import MAX_EXECUTION_BYTES, ExecutionMemory
from onnxserve.core.pipeline import MAX_REQUEST_TEXTS
from onnxserve.core.registry import ADAPTIVE_MAX_TOKENS
from onnxserve.core.runtime import ModelSession

CAP = 4 * 1024**3
PROBE_BOUND = 2.0  # generous: the box running the suite is loaded
ROWS, TOKENS = 64, 512  # TOKENS: the positions of the wide tiny BERT (conftest.wide_version)
WIDE = ExecutionMemory(heads=8, widest=64)  # the model's attention: 8 heads, a feed-forward layer of 64
# rows of 512 tokens one execution may take: within the token budget and the estimated memory of one execution
CHUNK_ROWS = min(
    ADAPTIVE_MAX_TOKENS // TOKENS, max(r for r in range(1, ROWS) if WIDE.bytes(r, TOKENS) <= MAX_EXECUTION_BYTES)
)
SECONDS = 120


@pytest.fixture(scope="module")
def server(wide_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    """``wide``: the default layout; ``single``: the same model on one instance (one run at a time)."""
    models = [{"name": "wide", "base_path": str(wide_version.parent)}]
    models.append({"name": "single", "base_path": str(wide_version.parent), "instance_count": 1})
    with serve_config(tmp_path_factory.mktemp("config"), models, cap_bytes=CAP) as running:
        yield running


def _token_body(ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {
        "inputs": [
            {"name": name, "shape": list(array.shape), "datatype": "INT64", "data": array.ravel().tolist()}
            for name, array in arrays.items()
        ],
        "outputs": [{"name": "last_hidden_state"}, {"name": "sentence_embedding"}],
    }


def _outputs(response: requests.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text[:500]
    return {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in response.json()["outputs"]}


def _executions(server: CappedServer, model: str) -> int:
    stats = requests.get(f"{server.http_url}/v2/models/{model}/stats", timeout=30).json()
    return int(stats["model_stats"][0]["execution_count"])


def _long_texts(count: int) -> list[str]:
    words = tiny_text_models.vocabulary()[5:]
    return [" ".join(words[(row + i) % len(words)] for i in range(600)) for row in range(count)]


def test_token_tensors_of_64x512_run_in_chunks_equal_to_row_by_row_with_bounded_memory(
    server: CappedServer, wide_version: Path
) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, len(tiny_text_models.vocabulary()), size=(ROWS, TOKENS), dtype=np.int64)
    lengths = rng.integers(1, TOKENS + 1, size=ROWS)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    before = _executions(server, "wide")
    with Watch(server) as watch:
        rest = watch.peak_rss
        answer = _outputs(
            requests.post(f"{server.http_url}/v2/models/wide/infer", json=_token_body(ids, mask), timeout=SECONDS)
        )
    # Measured: one execution of [64, 512] took 2.3 GB above the server's resting size in this model's
    # attention (8 heads); four chunks of 16 rows, run one after another, 0.6 GB (the estimated memory of one
    # execution, core.attention_memory, now cuts them smaller).
    assert watch.peak_rss - rest < 1024**3, (rest, watch.peak_rss)
    assert not watch.failures, watch.failures
    assert watch.worst_probe < PROBE_BOUND
    assert _executions(server, "wide") - before == -(-ROWS // CHUNK_ROWS)
    assert ModelSession(wide_version / "model.onnx").attention == (WIDE.heads, WIDE.widest)
    session = ort.InferenceSession(str(wide_version / "model.onnx"), providers=["CPUExecutionProvider"])
    for row in range(ROWS):
        feeds = {"input_ids": ids[row : row + 1], "attention_mask": mask[row : row + 1]}
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        hidden, pooled = session.run(["last_hidden_state", "sentence_embedding"], feeds)
        np.testing.assert_allclose(answer["last_hidden_state"][row], hidden[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(answer["sentence_embedding"][row], pooled[0], rtol=1e-4, atol=1e-4)


def test_texts_in_chunks_are_answered_as_one_by_one(server: CappedServer) -> None:
    texts = _long_texts(CHUNK_ROWS + 3) + ["a short one"] * 3  # chunks of unequal longest rows
    body = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "embedding"}, {"name": "last_hidden_state"}, {"name": "token_count"}],
    }
    response = requests.post(f"{server.http_url}/v2/models/wide/infer", json=body, timeout=SECONDS)
    assert response.status_code == 200, response.text[:500]
    answer = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}
    assert response.json()["parameters"]["truncated"] == CHUNK_ROWS + 3
    for row in (0, CHUNK_ROWS - 1, CHUNK_ROWS, len(texts) - 1):
        body["inputs"] = [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [texts[row]]}]
        alone = requests.post(f"{server.http_url}/v2/models/wide/infer", json=body, timeout=SECONDS).json()
        one = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in alone["outputs"]}
        tokens = int(one["token_count"][0])
        assert answer["token_count"][row] == tokens
        np.testing.assert_allclose(answer["embedding"][row], one["embedding"][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            answer["last_hidden_state"][row][:tokens], one["last_hidden_state"][0], rtol=1e-4, atol=1e-4
        )


def test_a_token_tensor_longer_than_the_model_reads_is_refused(server: CappedServer) -> None:
    ids = np.full((2, TOKENS + 1), 7, dtype=np.int64)
    with Watch(server) as watch:
        response = requests.post(
            f"{server.http_url}/v2/models/wide/infer", json=_token_body(ids, np.ones_like(ids)), timeout=SECONDS
        )
    assert response.status_code == 400, response.text[:500]
    assert (
        f"input 'input_ids' has {TOKENS + 1} tokens per row, more than the {TOKENS} model 'wide' reads"
        in response.json()["error"]
    )
    assert server.alive()
    assert not watch.failures
    ids = ids[:, :TOKENS]
    assert _outputs(
        requests.post(f"{server.http_url}/v2/models/wide/infer", json=_token_body(ids, np.ones_like(ids)), timeout=60)
    )


def test_a_small_request_runs_between_the_chunks_of_a_huge_one(server: CappedServer) -> None:
    """On one instance (one run at a time) a small request sent while a huge one runs finishes first."""
    texts = _long_texts(16 * CHUNK_ROWS)  # 16 chunks
    huge_body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    small_body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a short one"]}]}
    finished: list[str] = []
    statuses: list[int] = []

    def huge() -> None:
        response = requests.post(f"{server.http_url}/v2/models/single/infer", json=huge_body, timeout=SECONDS)
        statuses.append(response.status_code)
        finished.append("huge")

    before = _executions(server, "single")
    thread = threading.Thread(target=huge)
    thread.start()
    deadline = time.monotonic() + SECONDS
    while _executions(server, "single") == before and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # until the huge request's first chunk has run
    small = requests.post(f"{server.http_url}/v2/models/single/infer", json=small_body, timeout=SECONDS)
    assert small.status_code == 200, small.text[:500]
    finished.append("small")
    thread.join(SECONDS)
    assert statuses == [200]
    assert finished == ["small", "huge"]


def test_a_huge_request_that_times_out_stops_running_its_chunks(server: CappedServer) -> None:
    texts = _long_texts(16 * CHUNK_ROWS)  # 16 chunks
    body = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "parameters": {"timeout": 1_000_000},  # 1 s
    }
    before = _executions(server, "single")
    response = requests.post(f"{server.http_url}/v2/models/single/infer", json=body, timeout=SECONDS)
    assert response.status_code == 504, response.text[:500]
    answered = _executions(server, "single")
    counted, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline:  # until no more chunk runs
        now = _executions(server, "single")
        if now == counted:
            break
        counted = now
        time.sleep(0.5)
    # How many chunks ran within the second depends on the machine; once it is answered, at most the chunks
    # already running and queued (one at a time, two on four or more slots) still finish.
    assert counted - answered <= 2, "the chunks went on running after the request was dropped"
    assert counted - before < 16, "every chunk ran"
    assert server.alive()
    small = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a short one"]}]}
    assert requests.post(f"{server.http_url}/v2/models/single/infer", json=small, timeout=60).status_code == 200


def test_an_answer_over_the_response_limit_is_refused_after_its_first_chunk(wide_version: Path) -> None:
    # Outside attack: a [200, 256] request for last_hidden_state (78.6 MB) ran all its chunks, 40 s, before
    # its 400. After the first chunk its rows show what the whole answer takes: the rest never run.
    probe = np.ones((1, TOKENS), dtype=np.int64)
    session = ort.InferenceSession(str(wide_version / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = session.run(
        ["last_hidden_state"], {"input_ids": probe, "attention_mask": probe, "token_type_ids": 0 * probe}
    )
    chunk_bytes = CHUNK_ROWS * hidden[0][0].nbytes
    limit = 2 * chunk_bytes  # the first chunk fits, the four do not
    with CappedServer(
        ["--model-repository", str(wide_version.parent.parent), "--max-response-bytes", str(limit)], cap_bytes=CAP
    ) as server:
        ids = np.full((ROWS, TOKENS), 7, dtype=np.int64)
        body = _token_body(ids, np.ones_like(ids))
        body["outputs"] = [{"name": "last_hidden_state", "parameters": {"binary_data": True}}]
        response = requests.post(f"{server.http_url}/v2/models/wide/infer", json=body, timeout=SECONDS)
        assert response.status_code == 400, response.text[:300]
        assert "--max-response-bytes" in response.json()["error"]
        assert _executions(server, "wide") == 1
        assert server.alive()


def test_empty_texts_then_a_long_one_are_refused_before_their_padded_join_is_built(server: CappedServer) -> None:
    # Outside attack: 10,000 empty texts then one long text, asking for last_hidden_state (a 43 KB body). The
    # chunks of empty texts were counted at their own 2 tokens, then joined padded to the long one's length:
    # gigabytes built before the size check, a 500 on allocation failure, probes held 11-17 s. Now the
    # first chunk, counted at the joined length, refuses it (over the default --max-response-bytes). As many
    # empty texts as a request may hold beside the long one (2,048 in all).
    texts = [""] * (MAX_REQUEST_TEXTS - 1) + _long_texts(1)
    body = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "last_hidden_state", "parameters": {"binary_data": True}}],
    }
    before = _executions(server, "wide")
    response = requests.post(f"{server.http_url}/v2/models/wide/infer", json=body, timeout=SECONDS)
    assert response.status_code == 400, response.text[:300]
    assert "--max-response-bytes" in response.json()["error"]
    assert _executions(server, "wide") - before == 1  # the first chunk showed it; the others never ran
    assert server.alive()
    body["inputs"] = [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["", "a short one"]}]
    assert requests.post(f"{server.http_url}/v2/models/wide/infer", json=body, timeout=SECONDS).status_code == 200
