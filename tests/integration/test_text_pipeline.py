"""Text in, embeddings out: a model folder that carries its tokenizer tokenizes what clients send."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import requests
import tritonclient.grpc as grpcclient

from demo_reference import SENTENCES, cosines, sentence_transformers_encoding
from onnxserve.server.lifecycle import RunningServer


@pytest.fixture(scope="module")
def reference() -> npt.NDArray[np.float32]:
    return sentence_transformers_encoding(SENTENCES)


def v2_text(server: RunningServer, texts: list[str], **extra: Any) -> httpx.Response:
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **extra}
    return httpx.post(f"{server.http_url}/v2/models/minilm/infer", json=body, timeout=60)


@pytest.mark.slow
def test_v2_text_gives_sentence_transformers_embeddings(
    demo_server: RunningServer, reference: npt.NDArray[np.float32]
) -> None:
    response = v2_text(demo_server, SENTENCES)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("embedding", "FP32", [3, 384])
    served = np.array(out["data"], dtype=np.float32).reshape(3, 384)
    assert cosines(served, reference).min() >= 0.9999


@pytest.mark.slow
def test_batched_texts_equal_texts_sent_one_by_one(demo_server: RunningServer) -> None:
    together = np.array(v2_text(demo_server, SENTENCES).json()["outputs"][0]["data"]).reshape(3, 384)
    for i, sentence in enumerate(SENTENCES):
        alone = np.array(v2_text(demo_server, [sentence]).json()["outputs"][0]["data"])
        np.testing.assert_allclose(together[i], alone, atol=1e-5)  # padding never leaks into a row


@pytest.mark.slow
def test_seed_client_snippet_verbatim(demo_server: RunningServer, reference: npt.NDArray[np.float32]) -> None:
    url = f"{demo_server.http_url}/v1/models/huggingface_model:predict"
    # The seed document's client, as written there (only the host and port differ):
    response = requests.post(url, json={"inputs": {"input_ids": ["This is a test sentence."]}}, timeout=60)
    embedding = json.loads(response.content)["outputs"][0]
    assert len(embedding) == 384
    assert cosines(np.array([embedding]), reference[:1])[0] >= 0.9999


@pytest.mark.slow
def test_tf_serving_row_form_with_bare_text(demo_server: RunningServer, reference: npt.NDArray[np.float32]) -> None:
    response = requests.post(
        f"{demo_server.http_url}/v1/models/minilm:predict", json={"instances": SENTENCES}, timeout=60
    )
    assert response.status_code == 200, response.text
    predictions = np.array(response.json()["predictions"], dtype=np.float32)
    assert predictions.shape == (3, 384)
    assert cosines(predictions, reference).min() >= 0.9999


@pytest.mark.slow
def test_grpc_text_input(demo_server: RunningServer, reference: npt.NDArray[np.float32]) -> None:
    client = grpcclient.InferenceServerClient(demo_server.grpc_address)
    try:
        text = grpcclient.InferInput("text", [len(SENTENCES)], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=np.object_))
        result = client.infer("minilm", [text])
    finally:
        client.close()
    assert cosines(result.as_numpy("embedding"), reference).min() >= 0.9999


@pytest.mark.slow
def test_text_request_may_ask_for_graph_outputs(demo_server: RunningServer) -> None:
    response = v2_text(demo_server, ["hello world"], outputs=[{"name": "last_hidden_state"}, {"name": "embedding"}])
    assert response.status_code == 200, response.text
    shapes = {o["name"]: o["shape"] for o in response.json()["outputs"]}
    assert shapes == {"last_hidden_state": [1, 4, 384], "embedding": [1, 384]}  # [CLS] hello world [SEP]


@pytest.mark.slow
def test_truncation_is_reported(demo_server: RunningServer) -> None:
    response = v2_text(demo_server, ["word " * 400, "short"])
    assert response.status_code == 200, response.text
    assert response.json()["parameters"] == {"truncated": 1}
    assert "parameters" not in v2_text(demo_server, ["short"]).json()


BAD_TEXT_REQUESTS = [
    (
        "text-with-token-tensors",
        {
            "inputs": [
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                {"name": "attention_mask", "shape": [1, 1], "datatype": "INT64", "data": [1]},
            ]
        },
        ("tokenized", "attention_mask"),
    ),
    ("text-not-bytes", {"inputs": [{"name": "text", "shape": [1], "datatype": "INT64", "data": [1]}]}, ("BYTES",)),
    (
        "text-2d",
        {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}]},
        ("shape [N]",),
    ),
    (
        "unknown-output",
        {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
            "outputs": [{"name": "logits"}],
        },
        ("unknown output 'logits'", "embedding"),
    ),
    (
        "text-twice",  # the last one won, silently (an outside attack)
        {
            "inputs": [
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["there"]},
            ]
        },
        ("input 'text' is given more than once",),
    ),
    (
        "output-twice",
        {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
            "outputs": [{"name": "embedding"}, {"name": "embedding"}],
        },
        ("output 'embedding' is requested more than once",),
    ),
    (
        "no-texts",
        {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]},
        ("no text", "at least one"),
    ),
    (
        "too-many-texts",
        {"inputs": [{"name": "text", "shape": [33], "datatype": "BYTES", "data": ["hi"] * 33}]},
        ("max_batch_size 32",),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "words"), [c[1:] for c in BAD_TEXT_REQUESTS], ids=[c[0] for c in BAD_TEXT_REQUESTS])
def test_bad_text_requests_are_refused_and_serving_goes_on(
    demo_server: RunningServer, body: dict[str, Any], words: tuple[str, ...]
) -> None:
    response = httpx.post(f"{demo_server.http_url}/v2/models/minilm/infer", json=body, timeout=60)
    assert response.status_code == 400
    message = response.json()["error"]
    for word in words:
        assert word in message
    assert v2_text(demo_server, ["still serving"]).status_code == 200


@pytest.mark.slow
def test_non_utf8_text_is_refused(demo_server: RunningServer) -> None:
    header = json.dumps(
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}
    ).encode()
    body = header + (2).to_bytes(4, "little") + b"\xff\xfe"
    response = httpx.post(
        f"{demo_server.http_url}/v2/models/minilm/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "UTF-8" in response.json()["error"]


def test_pipeline_spec_without_tokenizer_fails_to_load(tmp_path: Path, demo_repository: Path) -> None:
    from onnxserve.config import parse_config
    from onnxserve.core.registry import ModelRegistry
    from onnxserve.errors import ConfigError

    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    for name in ("model.onnx", "onnxserve.json"):
        (folder / name).write_bytes((demo_repository / "minilm" / "1" / name).read_bytes())
    with pytest.raises(ConfigError, match=r"tokenizer\.json is missing"):
        ModelRegistry.load(parse_config({"model_config_list": [{"name": "m", "base_path": "m"}]}, "t", tmp_path))
