"""The OpenAI-compatible embeddings API, judged by the real ``openai`` client and LangChain's
``OpenAIEmbeddings`` against real servers on ephemeral ports.

The demo model (all-MiniLM-L6-v2) must give sentence-transformers' own embeddings; a tiny BERT with a
tensor model beside it, behind bearer tokens, carries the refusals (each in OpenAI's error shape,
each followed by a request that still works).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest
from tokenizers import Tokenizer

import models
from demo_reference import SENTENCES, cosines, sentence_transformers_encoding
from onnxserve.config import ServerConfig, parse_config
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

TOKEN = "openai-token-0123456789abcdef"
METRICS_ONLY = "metrics-token-0123456789abcd"


@pytest.fixture(scope="module")
def reference() -> npt.NDArray[np.float32]:
    return sentence_transformers_encoding(SENTENCES)


_OPEN: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def client(server: RunningServer, key: str = "unused") -> openai.OpenAI:
    """A real OpenAI client for ``server`` (closed after the test)."""
    _OPEN.append(openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=key, max_retries=0, timeout=60))
    return _OPEN[-1]


def vectors(result: Any) -> npt.NDArray[np.float32]:
    return np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)], dtype=np.float32)


@pytest.fixture(scope="module")
def secured(tiny_text_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny BERT (``tiny``, pooled, max_batch_size 4) and a tensor model (``add``) behind tokens."""
    repo = tmp_path_factory.mktemp("openai-repo")
    shutil.copytree(tiny_text_version, repo / "tiny" / "1")
    models.write_version(repo, "add", 1, models.add_model())
    config = parse_config(
        {
            "model_config_list": [
                {"name": "tiny", "base_path": "tiny", "max_batch_size": 4},
                {"name": "add", "base_path": "add", "max_batch_size": 8},
            ]
        },
        "test config",
        repo,
    )
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(f"{TOKEN} infer\n{METRICS_ONLY} metrics\n")
    tokens.chmod(0o600)
    server = start_in_background(
        config, ServerSettings(http_port=0, grpc_port=0, log_level="warning", auth_tokens_file=tokens)
    )
    yield server
    server.stop()


def post(server: RunningServer, body: Any, key: str = TOKEN) -> httpx.Response:
    return httpx.post(
        f"{server.http_url}/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )


def still_serving(server: RunningServer) -> None:
    answer = post(server, {"model": "tiny", "input": ["still here"]})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"][0]["embedding"]) == 32


def demo_tokenizer(demo_repository: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(demo_repository / "minilm" / "1" / "tokenizer.json"))
    tokenizer.no_padding()
    return tokenizer


# --- the demo model through the real clients --------------------------------------------------------


@pytest.mark.slow
def test_openai_client_gives_sentence_transformers_embeddings(
    demo_server: RunningServer, demo_repository: Path, reference: npt.NDArray[np.float32]
) -> None:
    api = client(demo_server)
    listed = api.embeddings.create(model="minilm", input=SENTENCES)  # the client asks for base64 by default
    assert listed.model == "minilm"
    assert [d.index for d in listed.data] == [0, 1, 2]
    assert cosines(vectors(listed), reference).min() >= 0.9999
    as_floats = api.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert cosines(vectors(as_floats), reference).min() >= 0.9999
    single = api.embeddings.create(model="minilm", input=SENTENCES[1])
    assert len(single.data) == 1
    assert cosines(vectors(single), reference[1:2]).min() >= 0.9999
    tokenizer = demo_tokenizer(demo_repository)
    expected = sum(len(e.ids) for e in tokenizer.encode_batch(SENTENCES))
    assert listed.usage.prompt_tokens == listed.usage.total_tokens == expected


@pytest.mark.slow
def test_base64_is_little_endian_float32_of_the_float_answer(demo_server: RunningServer) -> None:
    def raw(encoding: str) -> list[Any]:
        response = httpx.post(
            f"{demo_server.http_url}/v1/embeddings",
            json={"model": "minilm", "input": SENTENCES, "encoding_format": encoding, "user": "someone"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return [d["embedding"] for d in response.json()["data"]]

    decoded = np.array([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in raw("base64")])
    assert np.array_equal(decoded, np.array(raw("float"), dtype=np.float32))


@pytest.mark.slow
def test_dimensions_truncates_and_renormalizes(demo_server: RunningServer, reference: npt.NDArray[np.float32]) -> None:
    short = vectors(client(demo_server).embeddings.create(model="minilm", input=SENTENCES, dimensions=64))
    assert short.shape == (3, 64)
    assert np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    cut = reference[:, :64] / np.linalg.norm(reference[:, :64], axis=1, keepdims=True)
    assert cosines(short, cut).min() >= 0.9999
    with pytest.raises(openai.BadRequestError, match="between 1 and"):
        client(demo_server).embeddings.create(model="minilm", input="x", dimensions=385)


@pytest.mark.slow
def test_langchain_openai_embeddings(demo_server: RunningServer, reference: npt.NDArray[np.float32]) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length would tokenize with tiktoken, whose encoding file cannot be downloaded here
    embeddings = OpenAIEmbeddings(
        model="minilm", base_url=f"{demo_server.http_url}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    documents = np.array(embeddings.embed_documents(SENTENCES), dtype=np.float32)
    assert cosines(documents, reference).min() >= 0.9999
    query = np.array([embeddings.embed_query(SENTENCES[0])], dtype=np.float32)
    assert cosines(query, reference[:1]).min() >= 0.9999


@pytest.mark.slow
def test_more_inputs_than_max_batch_size_come_back_in_order(demo_server: RunningServer) -> None:
    texts = [f"sentence number {i} about batching" for i in range(70)]  # max_batch_size 32: three requests
    api = client(demo_server)
    together = vectors(api.embeddings.create(model="minilm", input=texts))
    alone = vectors(api.embeddings.create(model="minilm", input=texts[45]))
    assert together.shape == (70, 384)
    assert cosines(together[45:46], alone).min() >= 0.9999


@pytest.mark.slow
def test_token_ids_equal_the_text_they_encode(demo_server: RunningServer, demo_repository: Path) -> None:
    tokenizer = demo_tokenizer(demo_repository)
    ids = [e.ids for e in tokenizer.encode_batch(SENTENCES)]
    api = client(demo_server)
    from_ids = api.embeddings.create(model="minilm", input=ids)
    from_text = api.embeddings.create(model="minilm", input=SENTENCES)
    assert cosines(vectors(from_ids), vectors(from_text)).min() >= 0.9999
    assert from_ids.usage.prompt_tokens == sum(len(x) for x in ids)
    one = api.embeddings.create(model="minilm", input=ids[0])
    assert cosines(vectors(one), vectors(from_text)[:1]).min() >= 0.9999


# --- models, versions and tokens --------------------------------------------------------------------


def test_models_lists_text_models_and_retrieve_keeps_tf_serving_status(secured: RunningServer) -> None:
    api = client(secured, TOKEN)
    assert [m.id for m in api.models.list()] == ["tiny"]
    model = api.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "onnxserve")
    headers = {"authorization": f"Bearer {TOKEN}"}
    both = httpx.get(f"{secured.http_url}/v1/models/tiny", headers=headers).json()
    assert both["model_version_status"][0]["state"] == "AVAILABLE"  # TF Serving's keys beside OpenAI's
    assert both["id"] == "tiny"
    tensors = httpx.get(f"{secured.http_url}/v1/models/add", headers=headers).json()
    assert list(tensors) == ["model_version_status"]  # a tensor model: TF Serving's status alone
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("nope")


def test_a_version_is_picked_with_a_colon(secured: RunningServer) -> None:
    api = client(secured, TOKEN)
    default = vectors(api.embeddings.create(model="tiny", input=SENTENCES))
    pinned = vectors(api.embeddings.create(model="tiny:1", input=SENTENCES))
    assert np.array_equal(default, pinned)
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="tiny:7", input="x")
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="tiny@nolabel", input="x")


def test_client_error_classes(secured: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(secured, "wrong-token").embeddings.create(model="tiny", input="x")
    assert refused.value.status_code == 401
    assert isinstance(refused.value.body, dict)
    assert "message" in refused.value.body
    with pytest.raises(openai.PermissionDeniedError):
        client(secured, METRICS_ONLY).embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.NotFoundError) as missing:
        client(secured, TOKEN).embeddings.create(model="nope", input="x")
    assert isinstance(missing.value.body, dict)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="takes tensors"):
        client(secured, TOKEN).embeddings.create(model="add", input="x")
    still_serving(secured)


def test_refusal_without_token_has_openai_shape(secured: RunningServer) -> None:
    response = httpx.post(f"{secured.http_url}/v1/embeddings", json={"model": "tiny", "input": "x"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    still_serving(secured)


BAD_BODIES: list[tuple[Any, str | None, str]] = [
    ({"input": "x"}, "model", "required"),
    ({"model": "tiny"}, "input", "required"),
    ({"model": "tiny", "input": []}, "input", "not empty"),
    ({"model": "tiny", "input": [1, "a"]}, "input", "do not mix"),
    ({"model": "tiny", "input": [[1, 2], "a"]}, "input", "do not mix"),
    ({"model": "tiny", "input": [True, False]}, "input", "token ids"),
    ({"model": "tiny", "input": {"text": "a"}}, "input", "must be"),
    ({"model": "tiny", "input": None}, "input", "must be"),
    ({"model": 3, "input": "x"}, "model", "name"),
    ({"model": "", "input": "x"}, "model", "name"),
    ({"model": "tiny:v1", "input": "x"}, None, "label goes after '@'"),
    ({"model": "tiny", "input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"model": "tiny", "input": "x", "dimensions": 0}, "dimensions", "positive integer"),
    ({"model": "tiny", "input": "x", "dimensions": "8"}, "dimensions", "positive integer"),
    ({"model": "tiny", "input": "x", "dimensions": 33}, None, "between 1 and"),
    ({"model": "tiny", "input": "x", "user": 5}, "user", "string"),
    ({"model": "tiny", "input": "x", "temperature": 1}, "temperature", "unrecognized"),
    ({"model": "tiny", "input": [[]]}, None, "no token ids"),
    ({"model": "tiny", "input": [[1, 10**6]]}, None, "outside"),
    ({"model": "tiny", "input": [[-1]]}, None, "outside"),
    ({"model": "tiny", "input": [list(range(5, 200))]}, None, "more than"),
    ({"model": "tiny", "input": ["x"] * 2049}, None, "at most 2048"),
    ([1, 2], None, "JSON object"),
    ("text", None, "JSON object"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_bodies_are_refused_in_openai_shape(
    secured: RunningServer, body: Any, param: str | None, message: str
) -> None:
    response = post(secured, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]
    still_serving(secured)


def test_malformed_json_is_refused_in_openai_shape(secured: RunningServer) -> None:
    response = httpx.post(
        f"{secured.http_url}/v1/embeddings",
        content=b'{"model": "tiny", "input": ',
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
    still_serving(secured)


def test_a_refused_body_is_answered_in_openai_shape(secured: RunningServer) -> None:
    """Body refusals made before the route runs (media type) take the route's protocol shape and status."""
    response = httpx.post(
        f"{secured.http_url}/v1/embeddings",
        content=b"x",
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/pickle"},
    )
    assert response.status_code == 415
    error = response.json()["error"]
    assert "unsupported Content-Type" in error["message"]
    assert error["type"] == "invalid_request_error"
    still_serving(secured)


def test_openai_and_v2_text_requests_share_batches(
    tiny_text_version: Path, tmp_path: Path, start_server: Callable[[ServerConfig], RunningServer]
) -> None:
    shutil.copytree(tiny_text_version, tmp_path / "tiny" / "1")
    entry = {
        "name": "tiny",
        "base_path": "tiny",
        "max_batch_size": 8,
        "dynamic_batching": {"max_queue_delay_us": 500_000},
    }
    server = start_server(parse_config({"model_config_list": [entry]}, "test config", tmp_path))
    texts = [f"the quick brown fox {i}" for i in range(3)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
            v2 = [
                http.post(
                    "/v2/models/tiny/infer",
                    json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}]},
                )
                for t in texts
            ]
            openai_calls = [http.post("/v1/embeddings", json={"model": "tiny", "input": t}) for t in texts]
            return list(await asyncio.gather(*v2, *openai_calls))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    from_v2 = np.array([r.json()["outputs"][0]["data"] for r in responses[:3]], dtype=np.float32)
    from_openai = np.array([r.json()["data"][0]["embedding"] for r in responses[3:]], dtype=np.float32)
    assert np.allclose(from_v2, from_openai, atol=1e-5)
    (stats,) = server.service.model_statistics("tiny")
    assert stats.statistics.inference_count == 6
    # all six rows queue within the 2 s window: one execution, unless the two kinds could not share it
    assert stats.statistics.execution_count == 1, "V2 and OpenAI requests did not share a batch"


def test_a_full_queue_is_429_with_retry_after_in_openai_shape(
    tiny_text_version: Path, tmp_path: Path, start_server: Callable[[ServerConfig], RunningServer]
) -> None:
    shutil.copytree(tiny_text_version, tmp_path / "tiny" / "1")
    batching = {"max_queue_delay_us": 2_000_000, "max_queue_size": 2}  # two rows wait for a fuller batch
    entry = {"name": "tiny", "base_path": "tiny", "max_batch_size": 8, "dynamic_batching": batching}
    server = start_server(parse_config({"model_config_list": [entry]}, "test config", tmp_path))

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
            calls = [http.post("/v1/embeddings", json={"model": "tiny", "input": f"text {i}"}) for i in range(6)]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(fire())
    refused = [r for r in responses if r.status_code == 429]
    assert refused, [r.status_code for r in responses]
    assert {r.status_code for r in responses} <= {200, 429}
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):  # what the client's retry logic keys on
        asyncio.run(fire_one_more(server))


async def fire_one_more(server: RunningServer) -> None:
    """Fill the queue with two waiting texts, then ask through the real client while they wait."""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
        waiting = [
            asyncio.ensure_future(http.post("/v1/embeddings", json={"model": "tiny", "input": f"w {i}"}))
            for i in range(2)
        ]
        scheduler = server.service.registry.resolve("tiny", None).scheduler
        deadline = time.monotonic() + 30
        while scheduler.queued() < 2 and time.monotonic() < deadline:  # both are waiting in the queue
            await asyncio.sleep(0.005)
        api = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
        try:
            await api.embeddings.create(model="tiny", input="one too many")
        finally:
            await api.close()
            await asyncio.gather(*waiting)
