"""KServe V2 REST, spoken by hand with httpx against a real server on a loopback port.

Covers health, metadata, the model configuration extension, JSON and binary-extension inference on
every numeric test model (results checked against ONNX Runtime run in-process on the same inputs),
every kind of bad request (each must answer 400 ``{"error": ...}`` naming what is wrong, and leave
the server serving), and that a slow inference does not hold up health checks or other requests.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import FrameType
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

import models
import onnxserve
from error_documents import assert_error as _assert_error
from models import mixed_arrays
from onnxserve.config import ServerConfig
from onnxserve.server.lifecycle import RunningServer
from vocabulary import ONNX_V2, V2_NUMPY, decode_raw, encode_raw, v2_datatype

Array = npt.NDArray[Any]
StartServer = Callable[[ServerConfig], RunningServer]

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_NAMES = ("add", "mixed", "fixed", "strings", "slow")
MODEL_BUILDERS = models.NUMERIC_MODELS


# --- in-process reference ------------------------------------------------------------------------


@cache
def reference_session(model: str) -> ort.InferenceSession:
    proto = MODEL_BUILDERS[model]()
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def reference(model: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
    """Every output of ``model`` run by ONNX Runtime in this process (BYTES as ``str`` objects)."""
    session = reference_session(model)
    ort_feeds = {
        name: (np.vectorize(_text, otypes=[object])(a) if a.dtype == np.object_ else a) for name, a in feeds.items()
    }
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, ort_feeds), strict=True))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def graph_tensors(model: str, which: str) -> list[dict[str, Any]]:
    """V2 tensor metadata computed from the ONNX graph: -1 for every dim that is not a fixed size."""
    graph = MODEL_BUILDERS[model]().graph
    out = []
    for value in graph.input if which == "inputs" else graph.output:
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        out.append({"name": value.name, "datatype": ONNX_V2[tensor_type.elem_type], "shape": shape})
    return out


# --- wire helpers ----------------------------------------------------------------------------------


def tensor_json(name: str, array: Array, *, nested: bool = True) -> dict[str, Any]:
    data: Any
    if array.dtype == np.object_:
        data = [_text(v) for v in array.reshape(-1)]
        if nested and array.ndim > 1:
            data = np.array(data, dtype=object).reshape(array.shape).tolist()
    else:
        data = array.tolist() if nested else array.reshape(-1).tolist()
    return {"name": name, "shape": list(array.shape), "datatype": v2_datatype(array), "data": data}


def decode_text_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> Array:
    """``decode_raw``, with BYTES elements as text."""
    array = decode_raw(raw, datatype, shape)
    if datatype == "BYTES":
        return np.array([v.decode("utf-8") for v in array.reshape(-1)], dtype=object).reshape(shape)
    return array


def tensor_binary(name: str, array: Array) -> tuple[dict[str, Any], bytes]:
    raw = encode_raw(array)
    doc = {
        "name": name,
        "shape": list(array.shape),
        "datatype": v2_datatype(array),
        "parameters": {"binary_data_size": len(raw)},
    }
    return doc, raw


def binary_body(header: Mapping[str, Any], chunks: Sequence[bytes]) -> tuple[bytes, int]:
    head = json.dumps(header).encode("utf-8")
    return head + b"".join(chunks), len(head)


def post_json(client: httpx.Client, path: str, doc: Any) -> httpx.Response:
    content = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def post_binary(client: httpx.Client, path: str, header: Mapping[str, Any], chunks: Sequence[bytes]) -> httpx.Response:
    body, length = binary_body(header, chunks)
    return client.post(
        path,
        content=body,
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(length)},
    )


def infer_ok(client: httpx.Client, model: str, doc: Any, version: str | None = None) -> dict[str, Any]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    response = post_json(client, path, doc)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert HEADER_LENGTH.lower() not in response.headers
    body: dict[str, Any] = response.json()
    assert body["model_name"] == model
    assert body["model_version"] == "1"
    return body


def json_outputs(body: Mapping[str, Any]) -> dict[str, Array]:
    """The response's outputs as arrays of their declared datatype and shape (BYTES as ``str``)."""
    out: dict[str, Array] = {}
    for tensor in body["outputs"]:
        assert "data" in tensor, tensor
        dtype = V2_NUMPY[tensor["datatype"]]
        array = np.array(tensor["data"], dtype=dtype)
        assert array.ndim == 1, "V2 response data is expected flat"
        out[tensor["name"]] = array.reshape(tensor["shape"])
    return out


def binary_outputs(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Array]]:
    """The JSON header and every output (binary or JSON) of a binary-extension response."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/octet-stream")
    length = int(response.headers[HEADER_LENGTH])
    raw = response.content
    header: dict[str, Any] = json.loads(raw[:length])
    offset = length
    arrays: dict[str, Array] = {}
    for tensor in header["outputs"]:
        params = tensor.get("parameters", {})
        if "binary_data_size" in params:
            assert "data" not in tensor
            size = params["binary_data_size"]
            arrays[tensor["name"]] = decode_text_raw(raw[offset : offset + size], tensor["datatype"], tensor["shape"])
            offset += size
        else:
            arrays.update(json_outputs({"outputs": [tensor]}))
    assert offset == len(raw), "the binary section holds exactly the declared output bytes"
    return header, arrays


def assert_outputs_match(got: Mapping[str, Array], expected: Mapping[str, Array]) -> None:
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape, name
        if want.dtype == np.object_:
            assert [_text(v) for v in have.reshape(-1)] == [_text(v) for v in want.reshape(-1)], name
        else:
            assert have.dtype == want.dtype, name
            np.testing.assert_array_equal(have, want, err_msg=name)


def add_arrays(batch: int = 3, seed: int = 0) -> tuple[Array, Array]:
    arrays = models.add_arrays(batch, seed)
    return arrays["a"], arrays["b"]


def check_good_add_request(client: httpx.Client) -> None:
    """A valid request answers 200 with the right values (the server still serves after an error)."""
    a, b = add_arrays(batch=2, seed=99)
    body = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]})
    assert_outputs_match(json_outputs(body), reference("add", {"a": a, "b": b}))


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(numeric_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=numeric_server.http_url, timeout=60) as c:
        yield c


# --- health, metadata, configuration -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_health(client: httpx.Client, path: str) -> None:
    assert client.get(path).status_code == 200


def test_server_metadata(client: httpx.Client) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    doc = response.json()
    assert doc["name"] == "onnxserve"
    assert doc["version"] == onnxserve.__version__
    assert "binary_tensor_data" in doc["extensions"]
    assert "model_configuration" in doc["extensions"]


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_model_metadata_matches_graph(client: httpx.Client, model: str, suffix: str) -> None:
    response = client.get(f"/v2/models/{model}{suffix}")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["name"] == model
    assert doc["versions"] == ["1"]
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == graph_tensors(model, "inputs")
    assert doc["outputs"] == graph_tensors(model, "outputs")


def test_model_metadata_spelled_out(client: httpx.Client) -> None:
    """The graph-derived comparison above, pinned for a few tensors so a shared mistake shows."""
    add = client.get("/v2/models/add").json()
    assert add["inputs"][0] == {"name": "a", "datatype": "FP32", "shape": [-1, 16]}
    mixed = client.get("/v2/models/mixed").json()
    assert [t["datatype"] for t in mixed["inputs"]] == ["INT64", "BOOL", "FP16", "UINT8", "INT8", "FP64"]
    assert mixed["inputs"][2]["shape"] == [-1, 2]
    slow = client.get("/v2/models/slow").json()
    assert slow["inputs"][0] == {"name": "iterations", "datatype": "INT64", "shape": []}
    strings = client.get("/v2/models/strings").json()
    assert strings["outputs"] == [
        {"name": "echo", "datatype": "BYTES", "shape": [-1]},
        {"name": "count", "datatype": "INT64", "shape": [1]},
    ]


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_model_ready(client: httpx.Client, model: str, suffix: str) -> None:
    assert client.get(f"/v2/models/{model}{suffix}/ready").status_code == 200


def test_model_ready_unknown_version_is_not_ready(client: httpx.Client) -> None:
    status = client.get("/v2/models/add/versions/7/ready").status_code
    assert status == 404 or status == 503


@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_config_of_batched_model(client: httpx.Client, suffix: str) -> None:
    response = client.get(f"/v2/models/add{suffix}/config")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["name"] == "add"
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["max_batch_size"] == 8
    # dims leave out the batch dimension when max_batch_size > 0
    expected_in = [
        {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"][1:]}
        for t in graph_tensors("add", "inputs")
    ]
    expected_out = [
        {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"][1:]}
        for t in graph_tensors("add", "outputs")
    ]
    assert [{k: i[k] for k in ("name", "data_type", "dims")} for i in doc["input"]] == expected_in
    assert [{k: o[k] for k in ("name", "data_type", "dims")} for o in doc["output"]] == expected_out
    assert [i["dims"] for i in doc["input"]] == [[16], [16]]


def test_config_of_fixed_shape_model_does_not_batch(client: httpx.Client) -> None:
    """The config asked max_batch_size 4, but the graph's first dim is a fixed 2: no batching."""
    doc = client.get("/v2/models/fixed/config").json()
    assert doc["max_batch_size"] == 0
    assert [(i["name"], i["data_type"], i["dims"]) for i in doc["input"]] == [("x", "TYPE_FP32", [2, 3])]
    assert [(o["name"], o["dims"]) for o in doc["output"]] == [("y", [2, 3])]


def test_config_of_unbatched_model_keeps_dynamic_dims(client: httpx.Client) -> None:
    doc = client.get("/v2/models/mixed/config").json()
    assert doc["max_batch_size"] == 0
    assert [(i["name"], i["dims"]) for i in doc["input"]] == [
        (t["name"], t["shape"]) for t in graph_tensors("mixed", "inputs")
    ]
    strings = client.get("/v2/models/strings/config").json()
    assert strings["input"][0]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/no_such_model"),
        ("GET", "/v2/models/no_such_model/versions/1"),
        ("GET", "/v2/models/no_such_model/ready"),
        ("GET", "/v2/models/no_such_model/config"),
        ("POST", "/v2/models/no_such_model/infer"),
        ("POST", "/v2/models/no_such_model/versions/1/infer"),
    ],
)
def test_unknown_model_is_404(client: httpx.Client, method: str, path: str) -> None:
    a, b = add_arrays()
    body = {"inputs": [tensor_json("a", a), tensor_json("b", b)]}
    response = post_json(client, path, body) if method == "POST" else client.get(path)
    _assert_error(response, 404, "no_such_model")


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("GET", "/v2/models/add/versions/7", ("'add'", "version 7")),
        ("GET", "/v2/models/add/versions/7/config", ("'add'", "version 7")),
        ("POST", "/v2/models/add/versions/7/infer", ("'add'", "version 7")),
        ("GET", "/v2/models/add/versions/stable", ("'add'", "stable")),
    ],
)
def test_unknown_version_is_404(client: httpx.Client, method: str, path: str, words: tuple[str, ...]) -> None:
    a, b = add_arrays()
    body = {"inputs": [tensor_json("a", a), tensor_json("b", b)]}
    response = post_json(client, path, body) if method == "POST" else client.get(path)
    _assert_error(response, 404, *words)


def test_unknown_endpoint_is_404_json(client: httpx.Client) -> None:
    _assert_error(client.get("/v2/no/such/thing"), 404, "/v2/no/such/thing")
    _assert_error(client.get("/v2/models/add/statistics/extra"), 404)


def test_get_on_infer_is_405_json(client: httpx.Client) -> None:
    _assert_error(client.get("/v2/models/add/infer"), 405, "GET", "/v2/models/add/infer")


# --- JSON inference ---------------------------------------------------------------------------------


def test_infer_add(client: httpx.Client) -> None:
    a, b = add_arrays(batch=5)
    body = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]})
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("sum", "FP32", [5, 16]),
        ("diff", "FP32", [5, 16]),
    ]
    got = json_outputs(body)
    assert_outputs_match(got, reference("add", {"a": a, "b": b}))
    np.testing.assert_array_equal(got["sum"], a + b)
    np.testing.assert_array_equal(got["diff"], a - b)


def test_infer_add_at_max_batch_size(client: httpx.Client) -> None:
    a, b = add_arrays(batch=8, seed=3)
    body = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]})
    assert_outputs_match(json_outputs(body), reference("add", {"a": a, "b": b}))


def test_infer_mixed_datatypes(client: httpx.Client) -> None:
    feeds = mixed_arrays()
    body = infer_ok(client, "mixed", {"inputs": [tensor_json(n, a) for n, a in feeds.items()]})
    expected = reference("mixed", feeds)
    assert {o["name"]: o["datatype"] for o in body["outputs"]} == {
        name: v2_datatype(array) for name, array in expected.items()
    }
    got = json_outputs(body)
    assert_outputs_match(got, expected)
    assert got["ids_x3"][0] == (2**61 + 1) * 3  # exact beyond float64's 53 bits
    np.testing.assert_array_equal(got["not_flags"], ~feeds["flags"])
    np.testing.assert_array_equal(got["wide_neg"], -feeds["wide"])


def test_infer_strings_non_ascii(client: httpx.Client) -> None:
    text = np.array(["héllo wörld", "日本語のテキスト", "", "emoji 🚀", "plain"], dtype=object)
    body = infer_ok(client, "strings", {"inputs": [tensor_json("text", text)]})
    assert {o["name"]: o["datatype"] for o in body["outputs"]} == {"echo": "BYTES", "count": "INT64"}
    echo = next(o for o in body["outputs"] if o["name"] == "echo")
    assert echo["data"] == list(text)  # strings in JSON, not base64 or byte lists
    assert_outputs_match(json_outputs(body), reference("strings", {"text": text}))


def test_infer_fixed(client: httpx.Client) -> None:
    x = np.random.default_rng(5).standard_normal((2, 3), dtype=np.float32)
    body = infer_ok(client, "fixed", {"inputs": [tensor_json("x", x)]})
    got = json_outputs(body)
    assert_outputs_match(got, reference("fixed", {"x": x}))
    np.testing.assert_array_equal(got["y"], x * np.float32(2))


def test_infer_slow_model_few_iterations(client: httpx.Client) -> None:
    feeds = {
        "iterations": np.array(3, dtype=np.int64),
        "x": np.random.default_rng(6).random((256, 256), dtype=np.float32),
    }
    body = infer_ok(client, "slow", {"inputs": [tensor_json(n, a) for n, a in feeds.items()]})
    got = json_outputs(body)
    want = reference("slow", feeds)["y"]
    assert got["y"].shape == (256, 256)
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-30)


def test_flat_and_nested_data_give_the_same_result(client: httpx.Client) -> None:
    a, b = add_arrays(batch=4, seed=7)
    nested = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]})
    flat = infer_ok(client, "add", {"inputs": [tensor_json("a", a, nested=False), tensor_json("b", b, nested=False)]})
    mixed = infer_ok(client, "add", {"inputs": [tensor_json("a", a, nested=False), tensor_json("b", b)]})
    assert nested["outputs"] == flat["outputs"] == mixed["outputs"]
    assert_outputs_match(json_outputs(flat), reference("add", {"a": a, "b": b}))
    feeds = mixed_arrays(seed=4)  # "half" is [4, 2]: send it flat, the rest as they are
    inputs = [tensor_json(n, v, nested=(n != "half")) for n, v in feeds.items()]
    assert_outputs_match(json_outputs(infer_ok(client, "mixed", {"inputs": inputs})), reference("mixed", feeds))


@pytest.mark.parametrize("requested", [["sum"], ["diff"], ["diff", "sum"]])
def test_requested_outputs_subset(client: httpx.Client, requested: list[str]) -> None:
    a, b = add_arrays(seed=8)
    doc = {"inputs": [tensor_json("a", a), tensor_json("b", b)], "outputs": [{"name": n} for n in requested]}
    got = json_outputs(infer_ok(client, "add", doc))
    expected = reference("add", {"a": a, "b": b})
    assert_outputs_match(got, {n: expected[n] for n in requested})


def test_requested_outputs_subset_mixed(client: httpx.Client) -> None:
    feeds = mixed_arrays(seed=2)
    doc = {
        "inputs": [tensor_json(n, a) for n, a in feeds.items()],
        "outputs": [{"name": "half_x2"}, {"name": "not_flags"}],
    }
    expected = reference("mixed", feeds)
    got = json_outputs(infer_ok(client, "mixed", doc))
    assert_outputs_match(got, {"half_x2": expected["half_x2"], "not_flags": expected["not_flags"]})


def test_no_outputs_means_all(client: httpx.Client) -> None:
    a, b = add_arrays(seed=9)
    body = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]})
    assert [o["name"] for o in body["outputs"]] == [o.name for o in reference_session("add").get_outputs()]


def test_id_is_echoed(client: httpx.Client) -> None:
    a, b = add_arrays()
    body = infer_ok(client, "add", {"id": "req-42 ✓", "inputs": [tensor_json("a", a), tensor_json("b", b)]})
    assert body["id"] == "req-42 ✓"


def test_id_absent_when_not_sent(client: httpx.Client) -> None:
    a, b = add_arrays()
    body = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]})
    assert "id" not in body


def test_infer_with_version_path(client: httpx.Client) -> None:
    a, b = add_arrays(seed=10)
    body = infer_ok(client, "add", {"inputs": [tensor_json("a", a), tensor_json("b", b)]}, version="1")
    assert_outputs_match(json_outputs(body), reference("add", {"a": a, "b": b}))


# --- binary tensor extension --------------------------------------------------------------------------


def test_binary_inputs_and_binary_outputs(client: httpx.Client) -> None:
    a, b = add_arrays(batch=6, seed=11)
    (a_doc, a_raw), (b_doc, b_raw) = tensor_binary("a", a), tensor_binary("b", b)
    header = {
        "id": "bin-1",
        "inputs": [a_doc, b_doc],
        "outputs": [{"name": "sum", "parameters": {"binary_data": True}}, {"name": "diff"}],
    }
    response = post_binary(client, "/v2/models/add/infer", header, [a_raw, b_raw])
    doc, got = binary_outputs(response)
    assert doc["id"] == "bin-1"
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["sum"]["parameters"]["binary_data_size"] == a.nbytes
    assert "data" not in by_name["sum"]
    assert "data" in by_name["diff"]  # not asked for binary: JSON data in the header
    assert_outputs_match(got, reference("add", {"a": a, "b": b}))


def test_binary_and_json_inputs_together(client: httpx.Client) -> None:
    a, b = add_arrays(batch=2, seed=12)
    b_doc, b_raw = tensor_binary("b", b)
    header = {
        "inputs": [tensor_json("a", a), b_doc],
        "outputs": [{"name": "diff", "parameters": {"binary_data": True}}],
    }
    doc, got = binary_outputs(post_binary(client, "/v2/models/add/versions/1/infer", header, [b_raw]))
    assert doc["model_version"] == "1"
    assert_outputs_match(got, {"diff": reference("add", {"a": a, "b": b})["diff"]})


def test_binary_inputs_with_json_response(client: httpx.Client) -> None:
    """Binary in, nothing asked in binary: the answer is plain JSON without the length header."""
    a, b = add_arrays(batch=3, seed=13)
    (a_doc, a_raw), (b_doc, b_raw) = tensor_binary("a", a), tensor_binary("b", b)
    response = post_binary(client, "/v2/models/add/infer", {"inputs": [a_doc, b_doc]}, [a_raw, b_raw])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert HEADER_LENGTH.lower() not in response.headers
    assert_outputs_match(json_outputs(response.json()), reference("add", {"a": a, "b": b}))


def test_binary_data_output_request_level(client: httpx.Client) -> None:
    """Every datatype of the mixed model in and out in binary (BOOL one byte, FP16 two)."""
    feeds = mixed_arrays(seed=14)
    docs, chunks = zip(*(tensor_binary(n, a) for n, a in feeds.items()), strict=True)
    assert len(chunks[1]) == len(feeds["flags"])  # BOOL: one byte per element
    header = {"inputs": list(docs), "parameters": {"binary_data_output": True}}
    doc, got = binary_outputs(post_binary(client, "/v2/models/mixed/infer", header, list(chunks)))
    expected = reference("mixed", feeds)
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in doc["outputs"])
    assert [o["name"] for o in doc["outputs"]] == list(expected)
    assert "binary_data_output" not in doc.get("parameters", {})
    assert_outputs_match(got, expected)


def test_binary_bytes_tensors(client: httpx.Client) -> None:
    text = np.array(["ünïcödé", "", "日本", "a longer plain ascii string"], dtype=object)
    text_doc, text_raw = tensor_binary("text", text)
    header = {
        "inputs": [text_doc],
        "outputs": [{"name": "echo", "parameters": {"binary_data": True}}, {"name": "count"}],
    }
    doc, got = binary_outputs(post_binary(client, "/v2/models/strings/infer", header, [text_raw]))
    echo = next(o for o in doc["outputs"] if o["name"] == "echo")
    assert echo["parameters"]["binary_data_size"] == len(text_raw)
    assert_outputs_match(got, reference("strings", {"text": text}))


def test_header_length_with_json_only_body(client: httpx.Client) -> None:
    """The length header may cover the whole body when no input is binary."""
    a, b = add_arrays(seed=15)
    body, length = binary_body({"inputs": [tensor_json("a", a), tensor_json("b", b)]}, [])
    response = client.post("/v2/models/add/infer", content=body, headers={HEADER_LENGTH: str(length)})
    assert response.status_code == 200, response.text
    assert_outputs_match(json_outputs(response.json()), reference("add", {"a": a, "b": b}))


# --- bad requests ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    model: str
    content: bytes
    words: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict)


def _bad_json(model: str, doc: Any, *words: str) -> Bad:
    return Bad(model, json.dumps(doc).encode("utf-8"), words, {"Content-Type": "application/json"})


def _bad_binary(
    model: str, header: Mapping[str, Any], chunks: Sequence[bytes], *words: str, length_delta: int = 0
) -> Bad:
    body, length = binary_body(header, chunks)
    return Bad(model, body, words, {HEADER_LENGTH: str(length + length_delta)})


def _add_inputs(batch: int = 2) -> list[dict[str, Any]]:
    a, b = add_arrays(batch=batch, seed=20)
    return [tensor_json("a", a), tensor_json("b", b)]


def _with(tensor: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**tensor, **changes}
    return {k: v for k, v in out.items() if v is not None}


def _mixed_with(name: str, data: list[Any]) -> list[dict[str, Any]]:
    inputs = [tensor_json(n, a) for n, a in mixed_arrays().items()]
    return [_with(t, data=data) if t["name"] == name else t for t in inputs]


def _bad_cases() -> list[Any]:
    a_doc, b_doc = _add_inputs()
    a, b = add_arrays(batch=2, seed=20)
    a_bin, a_raw = tensor_binary("a", a)
    b_bin, b_raw = tensor_binary("b", b)
    ragged = [a[0].tolist(), a[1].tolist()[:-1]]
    text_doc, text_raw = tensor_binary("text", np.array(["abc", "de"], dtype=object))
    cases: dict[str, Bad] = {
        # the body as a whole
        "malformed_json": Bad("add", b'{"inputs": [', ("not valid json",)),
        "body_not_object": _bad_json("add", [a_doc, b_doc], "inference request", "json object"),
        "missing_inputs": _bad_json("add", {"id": "x"}, "'inputs'", "non-empty list"),
        "empty_inputs": _bad_json("add", {"inputs": []}, "'inputs'", "non-empty list"),
        "inputs_not_list": _bad_json("add", {"inputs": {"a": a_doc}}, "'inputs'", "list"),
        "input_not_object": _bad_json("add", {"inputs": ["a", b_doc]}, "inputs[0]", "json object"),
        "unknown_top_level_key": _bad_json(
            "add", {"inputs": [a_doc, b_doc], "input_data": 1}, "unknown key 'input_data'", "inputs"
        ),
        "unknown_input_key": _bad_json(
            "add", {"inputs": [_with(a_doc, dtype="FP32"), b_doc]}, "unknown key 'dtype'", "input 'a'"
        ),
        "id_not_string": _bad_json("add", {"id": 7, "inputs": [a_doc, b_doc]}, "'id'", "string"),
        "parameters_not_object": _bad_json(
            "add", {"parameters": [1], "inputs": [a_doc, b_doc]}, "'parameters'", "json object"
        ),
        "outputs_not_list": _bad_json("add", {"inputs": [a_doc, b_doc], "outputs": "sum"}, "'outputs'", "list"),
        # which inputs
        "unknown_input": _bad_json(
            "add",
            {"inputs": [a_doc, b_doc, _with(a_doc, name="c")]},
            "unknown input 'c'",
            "'add'",
            "'a' (fp32 [-1, 16])",
            "'b' (fp32 [-1, 16])",
        ),
        "missing_input": _bad_json("add", {"inputs": [a_doc]}, "missing input", "'b'", "fp32 [-1, 16]"),
        "duplicate_input": _bad_json("add", {"inputs": [a_doc, a_doc, b_doc]}, "'a'", "more than once"),
        "missing_shape": _bad_json("add", {"inputs": [_with(a_doc, shape=None), b_doc]}, "'a'", "'shape'"),
        "missing_data": _bad_json("add", {"inputs": [_with(a_doc, data=None), b_doc]}, "'a'", "'data'"),
        # datatypes
        "wrong_datatype": _bad_json(
            "add", {"inputs": [_with(a_doc, datatype="FP64"), b_doc]}, "'a'", "fp64", "expects fp32"
        ),
        "unknown_datatype_name": _bad_json(
            "add",
            {"inputs": [_with(a_doc, datatype="FLOAT32"), b_doc]},
            "'a'",
            "unknown datatype 'float32'",
            "fp32",
        ),
        # shapes
        "shape_vs_data_count": _bad_json(
            "add", {"inputs": [_with(a_doc, shape=[3, 16]), b_doc]}, "'a'", "32 elements", "[3, 16]", "48"
        ),
        "shape_rank_vs_model": _bad_json(
            "add",
            {"inputs": [_with(a_doc, shape=[32]), _with(b_doc, shape=[32])]},
            "'a'",
            "[32]",
            "expects [-1, 16]",
        ),
        "shape_fixed_dim_vs_model": _bad_json(
            "add",
            {"inputs": [_with(a_doc, shape=[4, 8]), _with(b_doc, shape=[4, 8])]},
            "'a'",
            "[4, 8]",
            "expects [-1, 16]",
        ),
        "shape_vs_fixed_model": _bad_json(
            "fixed",
            {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1.0] * 6}]},
            "'x'",
            "[3, 2]",
            "'fixed' expects [2, 3]",
        ),
        "negative_dim": _bad_json(
            "add", {"inputs": [_with(a_doc, shape=[-2, 16]), b_doc]}, "'a'", "negative", "[-2, 16]"
        ),
        "shape_not_integers": _bad_json(
            "add", {"inputs": [_with(a_doc, shape=[2.0, 16]), b_doc]}, "'a'", "'shape'", "list of integers"
        ),
        "batch_above_max_batch_size": _bad_json(
            "add", {"inputs": _add_inputs(batch=9)}, "'a'", "batch size 9", "max_batch_size 8"
        ),
        "batch_sizes_disagree": _bad_json(
            "add",
            {"inputs": [a_doc, tensor_json("b", add_arrays(batch=3)[1])]},
            "'b'",
            "batch=3",
            "'a'",
            "batch=2",
        ),
        # data values
        "non_numeric_data": _bad_json(
            "add", {"inputs": [_with(a_doc, data=["x"] * 32), b_doc]}, "'a'", "fp32", "numbers", "strings"
        ),
        "null_data": _bad_json(
            "add", {"inputs": [_with(a_doc, data=[None] * 32), b_doc]}, "'a'", "numbers", "non-numeric"
        ),
        "float_data_for_int64": _bad_json(
            "mixed", {"inputs": _mixed_with("ids", [1.5, 2, 3, 4])}, "'ids'", "int64", "integers"
        ),
        "out_of_range_uint8": _bad_json(
            "mixed", {"inputs": _mixed_with("small", [0, 256, 3, 4])}, "'small'", "256", "uint8", "range"
        ),
        "negative_uint8": _bad_json(
            "mixed", {"inputs": _mixed_with("small", [0, -1, 3, 4])}, "'small'", "-1", "uint8", "range"
        ),
        "out_of_range_int8": _bad_json(
            "mixed", {"inputs": _mixed_with("signed", [0, 128, 3, 4])}, "'signed'", "128", "int8", "range"
        ),
        "ragged_nested_data": _bad_json("add", {"inputs": [_with(a_doc, data=ragged), b_doc]}, "'a'", "evenly nested"),
        "bytes_data_not_strings": _bad_json(
            "strings",
            {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [1, 2]}]},
            "'text'",
            "bytes",
            "strings",
        ),
        # outputs
        "unknown_output": _bad_json(
            "add",
            {"inputs": [a_doc, b_doc], "outputs": [{"name": "product"}]},
            "unknown output 'product'",
            "'add'",
            "sum",
            "diff",
        ),
        "duplicate_output": _bad_json(
            "add", {"inputs": [a_doc, b_doc], "outputs": [{"name": "sum"}, {"name": "sum"}]}, "'sum'", "more than once"
        ),
        # binary tensor extension
        "binary_data_size_larger_than_body": _bad_binary(
            "add",
            {"inputs": [a_bin, _with(b_bin, parameters={"binary_data_size": len(b_raw) * 2})]},
            [a_raw, b_raw],
            "'b'",
            f"binary_data_size is {len(b_raw) * 2}",
            f"only {len(b_raw)} bytes",
        ),
        "binary_data_size_wrong_for_shape": _bad_binary(
            "add",
            {"inputs": [_with(a_bin, parameters={"binary_data_size": 64}), b_bin]},
            [a_raw[:64], b_raw],
            "'a'",
            "64 bytes",
            f"needs {len(a_raw)}",
        ),
        "binary_data_size_negative": _bad_binary(
            "add",
            {"inputs": [_with(a_bin, parameters={"binary_data_size": -1}), b_bin]},
            [a_raw, b_raw],
            "'a'",
            "binary_data_size",
            "non-negative",
        ),
        "binary_data_size_and_data": _bad_binary(
            "add", {"inputs": [_with(a_bin, data=a.tolist()), b_bin]}, [a_raw, b_raw], "'a'", "both"
        ),
        "binary_trailing_bytes": _bad_binary(
            "add",
            {"inputs": [a_bin, b_bin]},
            [a_raw, b_raw, b"\0" * 8],
            f"{len(a_raw) + len(b_raw) + 8} bytes",
            "declare",
        ),
        "binary_without_header_length": Bad(
            "add", binary_body({"inputs": [a_bin, b_bin]}, [])[0], ("'a'", "binary_data_size", "0 bytes")
        ),
        "binary_bytes_element_runs_past": _bad_binary(
            "strings",
            {"inputs": [_with(text_doc, parameters={"binary_data_size": len(text_raw) - 1})]},
            [text_raw[:-1]],
            "'text'",
            "runs past",
        ),
        "header_length_beyond_body": _bad_binary(
            "add", {"inputs": [a_bin, b_bin]}, [a_raw, b_raw], HEADER_LENGTH, "body has only", length_delta=10**6
        ),
        "header_length_too_short": _bad_binary(
            "add", {"inputs": [a_bin, b_bin]}, [a_raw, b_raw], "not valid json", length_delta=-3
        ),
        "header_length_not_integer": Bad(
            "add",
            binary_body({"inputs": [a_bin, b_bin]}, [a_raw, b_raw])[0],
            (HEADER_LENGTH, "integer"),
            {HEADER_LENGTH: "lots"},
        ),
        "header_length_negative": Bad(
            "add", binary_body({"inputs": [a_bin, b_bin]}, [a_raw, b_raw])[0], (HEADER_LENGTH,), {HEADER_LENGTH: "-5"}
        ),
    }
    return [pytest.param(case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("case", _bad_cases())
def test_bad_request_is_400_naming_the_problem(client: httpx.Client, case: Bad) -> None:
    response = client.post(f"/v2/models/{case.model}/infer", content=case.content, headers=case.headers)
    _assert_error(response, 400, *case.words)
    check_good_add_request(client)


# --- concurrency ------------------------------------------------------------------------------------------


def _slow_request(iterations: int, x: Array) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "iterations", "shape": [], "datatype": "INT64", "data": [iterations]},
            tensor_json("x", x, nested=False),
        ]
    }


def _slow_iterations(client: httpx.Client, x: Array, target_seconds: float) -> int:
    """Iterations of the slow model that take about ``target_seconds`` on this server (sized, not asserted).

    Two probes of different lengths, so the fixed cost of a request (a 256x256 tensor in JSON each
    way) cancels out of the per-iteration cost.
    """
    seconds: list[float] = []
    for iterations in (100, 1_100):
        started = time.perf_counter()
        infer_ok(client, "slow", _slow_request(iterations, x))
        seconds.append(time.perf_counter() - started)
    per_iteration = max((seconds[1] - seconds[0]) / 1_000, 1e-7)
    return int(min(max(target_seconds / per_iteration, 5_000), 5_000_000))


def _onnxruntime_running(exclude: set[int]) -> bool:
    """Whether some thread (other than ``exclude``) is running a model: inside ``ModelSession.run``, whose
    call into ONNX Runtime (its binding's ``run_with_ort_values``) has no Python frame of its own."""
    for ident, frame in sys._current_frames().items():
        if ident in exclude:
            continue
        current: FrameType | None = frame
        while current is not None:
            code = current.f_code
            if code.co_name == "run" and code.co_filename.endswith(
                ("onnxruntime_inference_collection.py", "runtime.py")
            ):
                return True
            current = current.f_back
    return False


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def test_slow_inference_does_not_block_health_or_other_models(
    start_server: StartServer, numeric_config: ServerConfig
) -> None:
    server = start_server(numeric_config)  # its own server: nothing else runs a model there meanwhile
    x = np.zeros((256, 256), dtype=np.float32)
    assert np.array_equal(x @ x * np.float32(0.001), x)  # zeros are the loop's fixed point: y must equal x
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        slow_doc = _slow_request(_slow_iterations(client, x, target_seconds=2.5), x)
    slow_done = threading.Event()
    slow_result: dict[str, httpx.Response] = {}

    def run_slow() -> None:
        try:
            with httpx.Client(base_url=server.http_url, timeout=120) as slow_client:
                slow_result["response"] = post_json(slow_client, "/v2/models/slow/infer", slow_doc)
        finally:
            slow_done.set()

    slow_thread = threading.Thread(target=run_slow, name="slow-request", daemon=True)
    slow_thread.start()
    try:
        running = _wait_for(lambda: _onnxruntime_running({threading.get_ident()}), timeout=15)
        assert running, "the slow request never started running in ONNX Runtime"
        assert not slow_done.is_set(), "the slow request finished before it could be overlapped; size it up"
        with httpx.Client(base_url=server.http_url, timeout=60) as client:
            for _ in range(3):
                assert client.get("/v2/health/live").status_code == 200
                assert client.get("/v2/health/ready").status_code == 200
                assert client.get("/v2/models/add/ready").status_code == 200
                check_good_add_request(client)
            # ordering, not timing: all of the above answered while the slow request was still running
            assert not slow_done.is_set(), "health checks and other inferences waited for the slow model"
            assert slow_thread.is_alive()
    finally:
        slow_thread.join(timeout=120)
    assert not slow_thread.is_alive()
    response = slow_result["response"]
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(json_outputs(response.json())["y"], x)
