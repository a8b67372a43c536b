"""Request limits: body size (also decompressed and chunked), media types, JSON depth, shapes and byte counts.

Every refused request is checked for its status, a message that says what is wrong, and a server that
keeps serving afterwards. The server runs with a small body limit so the edges are cheap to reach.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

import models
import raw_http
from onnxserve.config import parse_config
from onnxserve.protocols.context import current_request_id
from onnxserve.protocols.json_depth import MAX_JSON_DEPTH
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("collect_tritonclients")

LIMIT = 256 * 1024
HEADER_LENGTH = "Inference-Header-Content-Length"
INFER = "/v2/models/add/infer"
LEAKS = re.compile(r"Traceback|File \"|(?<![\w.])/(?!v[12]/)[\w.-]+/[\w./-]+|onnxruntime::|\.py\b|\.(?:h|cc|cpp):\d+")
"""What an error body must never show: tracebacks, file-system paths, C++ or Python source names."""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("limits")
    models.write_version(repo, "add", 1, models.add_model())
    models.write_version(repo, "strings", 1, models.strings_model())
    models.write_version(
        repo,
        "broadcast",
        1,
        models.parse("broadcast (float[n] a, float[m] b) => (float[k] c) {\n c = Add(a, b)\n}"),
    )
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    config = parse_config(
        {
            "model_config_list": [
                {"name": "add", "base_path": "add", "max_batch_size": 8},
                {"name": "strings", "base_path": "strings"},
                {"name": "broadcast", "base_path": "broadcast"},
            ]
        },
        "limits test",
        repository,
    )
    running = start_in_background(
        config, ServerSettings(http_port=0, grpc_port=0, log_level="warning", max_request_bytes=LIMIT)
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30) as c:
        yield c


def add_body(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": n, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            for n, x in (("a", a), ("b", b))
        ],
        "outputs": [{"name": "sum"}],
    }


def rows(n: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 16), dtype=np.float32), rng.random((n, 16), dtype=np.float32)


def expected_sum(repository: Path, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repository / "add" / "1" / "model.onnx"))
    result: np.ndarray = session.run(["sum"], {"a": a, "b": b})[0]
    return result


def still_serves(server: RunningServer) -> None:
    """A valid request over HTTP and gRPC still gets its answer."""
    a, b = rows()
    response = httpx.post(f"{server.http_url}{INFER}", json=add_body(a, b), timeout=30)
    assert response.status_code == 200, response.text
    assert np.allclose(np.array(response.json()["outputs"][0]["data"]), (a + b).ravel())
    with grpc.insecure_channel(server.grpc_address) as channel:
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        assert live(pb.ServerLiveRequest(), timeout=10).live


def refused(response: httpx.Response | raw_http.RawResponse, status: int, *words: str) -> str:
    body = response.content if isinstance(response, httpx.Response) else response.body
    actual = response.status_code if isinstance(response, httpx.Response) else response.status
    assert actual == status, (actual, body)
    message: str = json.loads(body)["error"]
    for word in words:
        assert word in message, message
    assert not LEAKS.search(message), message
    return message


def padded(doc: dict[str, Any], size: int) -> bytes:
    """``doc`` as JSON followed by spaces up to exactly ``size`` bytes."""
    text = json.dumps(doc).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


# --- body size ---------------------------------------------------------------------------------------


def test_a_body_of_exactly_the_limit_is_served_and_one_byte_more_is_413(
    server: RunningServer, client: httpx.Client
) -> None:
    a, b = rows()
    at_limit = client.post(INFER, content=padded(add_body(a, b), LIMIT), headers={"Content-Type": "application/json"})
    assert at_limit.status_code == 200, at_limit.text
    over = client.post(INFER, content=padded(add_body(a, b), LIMIT + 1), headers={"Content-Type": "application/json"})
    refused(over, 413, f"limit of {LIMIT} bytes", "--max-request-bytes")
    still_serves(server)


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_is_sent(server: RunningServer) -> None:
    head = raw_http.request_bytes("POST", INFER, {"Content-Type": "application/json", "Content-Length": str(LIMIT + 1)})
    response = raw_http.exchange(server.host, server.http_port, head, timeout=10)  # no body ever follows
    refused(response, 413, f"limit of {LIMIT} bytes")
    still_serves(server)


def test_a_chunked_body_is_counted_while_it_streams(server: RunningServer, client: httpx.Client) -> None:
    a, b = rows()
    body = json.dumps(add_body(a, b)).encode()

    def pieces(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 100):
            yield data[i : i + 100]

    chunked = client.post(INFER, content=pieces(body), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 200, chunked.text
    # LIMIT + 1 bytes in chunks and then nothing more (no final chunk): refused without waiting for the end.
    with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
        sock.sendall(
            raw_http.request_bytes("POST", INFER, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        )
        chunk = b" " * 4096
        sent = 0
        while sent <= LIMIT:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        started = time.monotonic()
        response = raw_http.read_response(sock)
        assert time.monotonic() - started < 5
    refused(response, 413, f"limit of {LIMIT} bytes")
    still_serves(server)


def test_gzip_and_deflate_bodies_from_tritonclient_are_served(server: RunningServer, repository: Path) -> None:
    a, b = rows(3, seed=4)
    triton = httpclient.InferenceServerClient(url=f"{server.host}:{server.http_port}")
    try:
        for algorithm in ("gzip", "deflate"):
            inputs = [httpclient.InferInput("a", [3, 16], "FP32"), httpclient.InferInput("b", [3, 16], "FP32")]
            inputs[0].set_data_from_numpy(a, binary_data=True)
            inputs[1].set_data_from_numpy(b, binary_data=False)
            result = triton.infer("add", inputs, request_compression_algorithm=algorithm)
            assert np.array_equal(result.as_numpy("sum"), expected_sum(repository, a, b))
    finally:
        triton.close()


def test_the_limit_applies_to_the_decompressed_body(server: RunningServer, client: httpx.Client) -> None:
    a, b = rows()
    doc = add_body(a, b)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert client.post(INFER, content=gzip.compress(padded(doc, LIMIT)), headers=headers).status_code == 200
    over = client.post(INFER, content=gzip.compress(padded(doc, LIMIT + 1)), headers=headers)
    refused(over, 413, "after decompression", f"limit of {LIMIT} bytes")
    still_serves(server)


def test_a_gzip_body_of_several_members_is_served_and_of_too_many_refused(
    server: RunningServer, client: httpx.Client
) -> None:
    """gzip may hold several members, each decoded afresh: a body of thousands of empty 20-byte members took
    time by the square of its size (outside attack rt33 F4: eight 32 MiB ones, 43 s each, probes 0.9 s)."""
    doc = json.dumps(add_body(*rows())).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    members = b"".join(gzip.compress(doc[i : i + 400]) for i in range(0, len(doc), 400))
    assert client.post(INFER, content=members, headers=headers).status_code == 200
    empty = gzip.compress(b"", mtime=0) * 64 + gzip.compress(doc)  # 65 members
    refused(client.post(INFER, content=empty, headers=headers), 400, "holds more than 64 members; compress it as one")
    started = time.monotonic()
    flood = gzip.compress(b"", mtime=0) * (LIMIT // 20)  # a million empty members, within the limit on the wire
    refused(client.post(INFER, content=flood, headers=headers), 400, "more than 64 members")
    assert time.monotonic() - started < 5  # refused at the 65th member, not after decoding each
    still_serves(server)


def test_a_zip_bomb_stops_at_the_limit(server: RunningServer, client: httpx.Client) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"[" * (1024 * 1024)
    bomb = b"".join(packer.compress(block) for _ in range(200)) + packer.flush()  # 200 MiB of "["
    assert len(bomb) < LIMIT  # fits on the wire; only its decompressed size is too large
    started = time.monotonic()
    response = client.post(
        INFER, content=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    refused(response, 413, "after decompression")
    assert time.monotonic() - started < 5  # it did not inflate 200 MiB first
    still_serves(server)


ONE_INPUT = {"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}
TWO_INPUTS = [ONE_INPUT, {**ONE_INPUT, "name": "b"}]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": [*TWO_INPUTS, ONE_INPUT]}, ("input 'a' is given more than once",)),
        ({"inputs": TWO_INPUTS, "outputs": [{"name": "sum"}, {"name": "sum"}]}, ("output 'sum' is requested more",)),
        (
            {"inputs": TWO_INPUTS, "outputs": [{"name": "sum", "parameters": {"shared_memory_region": "r"}}]},
            ("output 'sum'", "'shared_memory_region'", "shared-memory extension is not supported"),
        ),
        (
            {"inputs": TWO_INPUTS, "outputs": [{"name": "sum", "parameters": {"shared_memory_byte_size": 4}}]},
            ("'shared_memory_byte_size'", "not supported"),
        ),
        (
            {"inputs": TWO_INPUTS, "outputs": [{"name": "sum", "parameters": {"classification": 2}}]},
            ("output 'sum'", "'classification' is not supported"),
        ),
        (
            {"inputs": [{**ONE_INPUT, "parameters": {"shared_memory_region": "r"}}, TWO_INPUTS[1]]},
            ("input 'a'", "'shared_memory_region'", "not supported"),
        ),
        ({"inputs": TWO_INPUTS, "parameters": {"priority": "high"}}, ("'priority' must be a non-negative integer",)),
        ({"inputs": TWO_INPUTS, "parameters": {"priority": -1}}, ("'priority' must be a non-negative integer",)),
        ({"inputs": TWO_INPUTS, "parameters": {"sequence_id": 7}}, ("'sequence_id'", "sequence batching")),
        ({"inputs": TWO_INPUTS, "parameters": {"sequence_id": [1]}}, ("'sequence_id'", "sequence batching")),
        ({"inputs": TWO_INPUTS, "parameters": {"sequence_start": True}}, ("'sequence_start'", "not supported")),
        (
            {"inputs": TWO_INPUTS, "parameters": {"binary_data_output": 1.5}},
            ("'binary_data_output' must be true or false",),
        ),
        (
            {"inputs": TWO_INPUTS, "outputs": [{"name": "sum", "parameters": {"binary_data": "3"}}]},
            ("output 'sum'", "'binary_data' must be true or false"),
        ),
    ],
    ids=[
        "input-twice",
        "output-twice",
        "output-shm-region",
        "output-shm-size",
        "classification",
        "input-shm",
        "priority-string",
        "priority-negative",
        "sequence-id",
        "sequence-id-list",
        "sequence-start",
        "binary-data-output-number",
        "binary-data-string",
    ],
)
def test_what_a_v2_request_cannot_ask_for_is_refused_not_ignored(
    server: RunningServer, client: httpx.Client, body: dict[str, Any], words: tuple[str, ...]
) -> None:
    response = client.post(INFER, json=body)
    assert response.status_code == 400, response.text
    refused(response, 400, *words)
    still_serves(server)


def test_what_tritonclient_sends_by_default_is_served(server: RunningServer, client: httpx.Client) -> None:
    """No sequence (sequence_id 0, start/end false) and a priority are served: one priority level."""
    params = {"sequence_id": 0, "sequence_start": False, "sequence_end": False, "priority": 3}
    response = client.post(INFER, json={"inputs": TWO_INPUTS, "parameters": params})
    assert response.status_code == 200, response.text


def test_what_a_grpc_request_cannot_ask_for_is_invalid_argument(server: RunningServer) -> None:
    def request() -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="add")
        for name in ("a", "b"):
            message.inputs.add(name=name, datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 16)
        return message

    twice = request()
    twice.inputs.add(name="a", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([2.0] * 16)
    shm_output = request()
    shm_output.outputs.add(name="sum").parameters["shared_memory_region"].string_param = "r"
    classification = request()
    classification.outputs.add(name="sum").parameters["classification"].int64_param = 2
    shm_input = request()
    shm_input.inputs[0].parameters["shared_memory_byte_size"].int64_param = 4
    sequence = request()
    sequence.parameters["sequence_id"].int64_param = 7
    outputs_twice = request()
    outputs_twice.outputs.add(name="sum")
    outputs_twice.outputs.add(name="sum")
    cases = [
        (twice, "input 'a' is given more than once"),
        (shm_output, "shared-memory extension is not supported"),
        (classification, "'classification' is not supported"),
        (shm_input, "input 'a': parameter 'shared_memory_byte_size'"),
        (sequence, "sequence batching is not supported"),
        (outputs_twice, "output 'sum' is requested more than once"),
    ]
    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for message, words in cases:
            with pytest.raises(grpc.RpcError) as error:
                infer(message, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
            assert words in (error.value.details() or ""), error.value.details()
        assert infer(request(), timeout=30).model_name == "add"


def _bomb_with_a_long_tail() -> bytes:
    """A gzip body within LIMIT on the wire that inflates past it at once, then goes on for most of LIMIT
    with incompressible bytes: the server answers 413 long before the body is all sent."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    tail = np.random.default_rng(0).integers(0, 256, LIMIT - 16 * 1024, dtype=np.uint8).tobytes()
    body = packer.compress(b"[" * (4 * LIMIT)) + packer.compress(tail) + packer.flush()
    assert len(body) < LIMIT
    return body


@pytest.mark.parametrize("close", [True, False], ids=["connection-close", "keep-alive"])
def test_a_refused_bomb_reaches_the_client_as_413_not_a_reset(server: RunningServer, close: bool) -> None:
    """The 413 comes before the rest of the body was read; a connection then closed at once made the
    kernel reset it over the unread bytes, so the client saw ECONNRESET instead of the 413 (an outside
    attack: 8 of 16 clients). The server now reads and drops the rest before closing."""
    body = _bomb_with_a_long_tail()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", "Content-Length": str(len(body))}
    if close:
        headers["Connection"] = "close"
    host, port = server.http_url.removeprefix("http://").split(":")
    for _ in range(5):  # a reset depends on timing: several tries
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # the body goes out in pieces
            sock.sendall(raw_http.request_bytes("POST", INFER, headers, body))
            answer = raw_http.read_response(sock)
        refused(answer, 413, "after decompression")
    still_serves(server)


@pytest.mark.parametrize(
    ("encoding", "content", "status", "words"),
    [
        ("gzip", b"this is not gzip at all", 400, ("not valid gzip data",)),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-12], 400, ("ends before its compressed data",)),
        ("deflate", b"\x00\x01\x02 nonsense", 400, ("not valid deflate data",)),
        ("deflate", zlib.compress(b"{}") + b"trailing", 400, ("data after its end",)),
        ("br", b"{}", 415, ("unsupported Content-Encoding 'br'", "gzip, deflate")),
        ("gzip, br", b"{}", 415, ("unsupported Content-Encoding",)),
    ],
)
def test_bad_compressed_bodies_are_refused(
    server: RunningServer, client: httpx.Client, encoding: str, content: bytes, status: int, words: tuple[str, ...]
) -> None:
    response = client.post(
        INFER, content=content, headers={"Content-Type": "application/json", "Content-Encoding": encoding}
    )
    refused(response, status, *words)
    still_serves(server)


# --- media types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-python-pickle",
        "application/python-pickle",
        "multipart/form-data; boundary=xyz",
        "text/xml",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/x-protobuf",
    ],
)
def test_other_media_types_are_415(server: RunningServer, client: httpx.Client, content_type: str) -> None:
    import pickle

    payload = pickle.dumps({"inputs": []})
    for path in (INFER, "/v1/models/add:predict", "/v2/repository/index"):
        response = client.post(path, content=payload, headers={"Content-Type": content_type})
        refused(response, 415, "unsupported Content-Type", "application/json")
    still_serves(server)


def test_a_body_refused_before_it_is_read_closes_its_connection_and_says_so(server: RunningServer) -> None:
    """Outside attack rt26: a 415 answered before the body had arrived closed the keep-alive connection without
    ``Connection: close``, so the client sent its next request on it and got no answer (2,195 of 15,975)."""
    port = int(server.http_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", INFER)
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", "100000")
        connection.endheaders()  # the head alone: the body would come in later reads
        response = connection.getresponse()
        response.read()
        assert response.status == 415
        assert response.getheader("connection") == "close"  # before: none, and the connection closed
    finally:
        connection.close()
    still_serves(server)


def test_octet_stream_needs_the_binary_header_length(server: RunningServer, client: httpx.Client) -> None:
    a, b = rows()
    response = client.post(
        INFER, content=json.dumps(add_body(a, b)), headers={"Content-Type": "application/octet-stream"}
    )
    refused(response, 415, "Inference-Header-Content-Length")
    still_serves(server)


@pytest.mark.parametrize(
    "headers", [{}, {"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "APPLICATION/JSON"}]
)
def test_json_with_or_without_a_content_type_is_served(client: httpx.Client, headers: dict[str, str]) -> None:
    a, b = rows()
    response = client.post(INFER, content=json.dumps(add_body(a, b)).encode(), headers=headers)
    assert response.status_code == 200, response.text
    assert np.allclose(response.json()["outputs"][0]["data"], (a + b).ravel())


# --- JSON depth ----------------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 200, 1000, 1024, 5000, 100_000])
def test_deeply_nested_v2_bodies_are_refused(server: RunningServer, client: httpx.Client, depth: int) -> None:
    for field in ("data", "shape"):
        doc = {"inputs": [{"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
        doc["inputs"][0][field] = "@"
        body = json.dumps(doc).replace('"@"', "[" * depth + "1" + "]" * depth).encode()
        response = client.post(INFER, content=body, headers={"Content-Type": "application/json"})
        message = refused(response, 400)
        assert f"more than {MAX_JSON_DEPTH} levels deep" in message or "not valid JSON" in message
    still_serves(server)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 5000, 100_000])
@pytest.mark.parametrize("value", [b"1", b"NaN"])
def test_deeply_nested_tf_serving_bodies_are_refused(
    server: RunningServer, client: httpx.Client, depth: int, value: bytes
) -> None:
    body = b'{"instances": ' + b"[" * depth + value + b"]" * depth + b"}"
    response = client.post("/v1/models/add:predict", content=body, headers={"Content-Type": "application/json"})
    message = refused(response, 400)
    assert f"more than {MAX_JSON_DEPTH} levels deep" in message  # the project's words, never Python's
    assert "recursion" not in message
    still_serves(server)


def test_the_depth_limit_is_exact(server: RunningServer, client: httpx.Client) -> None:
    """The request object is level 1, ``inputs`` 2, an input 3, so ``parameters`` values may nest to the limit."""
    a, b = rows()
    doc = add_body(a, b)
    doc["parameters"] = {"deep": nested(MAX_JSON_DEPTH - 2)}  # request object + parameters object + these lists
    assert client.post(INFER, json=doc).status_code == 200
    doc["parameters"] = {"deep": nested(MAX_JSON_DEPTH - 1)}
    refused(client.post(INFER, json=doc), 400, f"more than {MAX_JSON_DEPTH} levels deep")
    still_serves(server)


# --- shapes and byte counts ----------------------------------------------------------------------------


def one_input(shape: Any, data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "a", "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (one_input([-1, 16], [0.0] * 16), ("negative dimension",)),
        (one_input([1, -16], [0.0] * 16), ("negative dimension",)),
        (one_input([2**40, 2**40], [0.0]), ("too many elements",)),
        (one_input([2**63, 1], [0.0]), ("too many elements",)),
        (one_input([10**30, 16], [0.0]), ("'shape' must be a list of integers",)),  # JSON reads 1e30 as a float
        (one_input([1.5, 16], [0.0]), ("'shape' must be a list of integers",)),
        (one_input("1,16", [0.0]), ("'shape' must be a list of integers",)),
        (one_input([4, 16], [0.0] * 48), ("has 48 elements", "[4, 16] needs 64")),
        (one_input([1, 16], [0.0] * 17), ("has 17 elements", "needs 16")),
        (one_input([1, 16], [[0.0] * 8, [0.0] * 9]), ("evenly nested",)),
        (one_input([2], ["x"], "BYTES"), ("has 1 elements", "needs 2")),
        (one_input([1], [None], "BYTES"), ("must be strings, found null",)),
        (one_input([1], [{"a": 1}], "BYTES"), ("must be strings, found an object",)),
        (one_input([1, 16], [0.0] * 16, "FP128"), ("unknown datatype 'FP128'",)),
    ],
)
def test_bad_shapes_and_counts_in_json_are_400(
    server: RunningServer, client: httpx.Client, doc: dict[str, Any], words: tuple[str, ...]
) -> None:
    refused(client.post(INFER, json=doc), 400, *words)
    still_serves(server)


def binary_request(
    declared: list[int], raw: bytes, header_length: int | None = None, datatype: str = "FP32"
) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": declared, "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}
            ]
        }
    ).encode()
    return header + raw, len(header) if header_length is None else header_length


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (binary_request([4, 16], np.zeros((3, 16), np.float32).tobytes()), ("192 bytes of binary data", "needs 256")),
        (binary_request([1, 16], np.zeros((2, 16), np.float32).tobytes()), ("128 bytes of binary data", "needs 64")),
        (binary_request([1, 16], b"\x00" * 63), ("63 bytes", "needs 64")),
        (binary_request([2], struct.pack("<I", 1) + b"x", datatype="BYTES"), ("data has 1 elements", "needs 2")),
        (binary_request([1], struct.pack("<I", 99) + b"x", datatype="BYTES"), ("runs past the data",)),
        (binary_request([1], b"\x01\x00", datatype="BYTES"), ("inside an element's 4-byte length",)),
        (binary_request([1, 16], b"\x00" * 64, header_length=10**9), ("body has only",)),
        (binary_request([1, 16], b"\x00" * 64, header_length=5), ("not valid JSON",)),
    ],
)
def test_binary_bodies_that_lie_about_their_size_are_400(
    server: RunningServer, client: httpx.Client, body: tuple[bytes, int], words: tuple[str, ...]
) -> None:
    content, length = body
    response = client.post(
        INFER, content=content, headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(length)}
    )
    refused(response, 400, *words)
    still_serves(server)


@pytest.mark.parametrize("length", ["-5", "ten", "1e3", ""])
def test_a_malformed_header_length_is_400(server: RunningServer, client: httpx.Client, length: str) -> None:
    content, _ = binary_request([1, 16], b"\x00" * 64)
    response = client.post(INFER, content=content, headers={HEADER_LENGTH: length})
    refused(response, 400, "Inference-Header-Content-Length".lower())
    still_serves(server)


def grpc_infer(server: RunningServer, request: bytes) -> grpc.RpcError | pb.ModelInferResponse:
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", response_deserializer=pb.ModelInferResponse.FromString
        )
        try:
            result: pb.ModelInferResponse = call(request, timeout=30)
            return result
        except grpc.RpcError as e:
            return e


def raw_grpc_request(shape: list[int], raws: list[bytes], datatype: str = "FP32", inputs: int = 0) -> bytes:
    message = pb.ModelInferRequest(model_name="add")
    for name in ("a", "b")[: inputs or len(raws)]:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.extend(raws)
    return message.SerializeToString()


@pytest.mark.parametrize(
    ("request_bytes", "words"),
    [
        (raw_grpc_request([4, 16], [b"\x00" * 192, b"\x00" * 256]), ("192 bytes", "needs 256")),
        (raw_grpc_request([1, 16], [b"\x00" * 64, b"\x00" * 65]), ("65 bytes", "needs 64")),
        (raw_grpc_request([-1, 16], [b"", b""]), ("negative dimension",)),
        (raw_grpc_request([2**62, 2**62], [b"", b""]), ("too many elements",)),
        (raw_grpc_request([3], [struct.pack("<I", 1) + b"x"], "BYTES"), ("data has 1 elements", "needs 3")),
        (raw_grpc_request([1, 16], [b"\x00" * 64], inputs=2), ("raw_input_contents has 1 entries for 2 inputs",)),
        (b"\x0a\xff\xff\xff\xff\x0f", ("malformed ModelInferRequest",)),
    ],
)
def test_grpc_requests_that_lie_about_their_size_are_invalid_argument(
    server: RunningServer, request_bytes: bytes, words: tuple[str, ...]
) -> None:
    error = grpc_infer(server, request_bytes)
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert not LEAKS.search(error.details()), error.details()
    still_serves(server)


def test_a_grpc_message_over_its_limit_is_resource_exhausted(server: RunningServer) -> None:
    limit = ServerSettings().grpc_max_message_bytes
    error = grpc_infer(server, raw_grpc_request([1, 16], [b"\x00" * (limit + 1), b""]))
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serves(server)


# --- errors say what, not where ------------------------------------------------------------------------


class Captured(logging.Handler):
    """Log records with the request id that was current when each was made."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), current_request_id()))


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("onnxserve")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def broadcast_body() -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "a", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "b", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
        ]
    }


def test_a_kernel_failure_on_input_values_is_a_client_error_that_says_what(
    server: RunningServer, client: httpx.Client
) -> None:
    response = client.post("/v2/models/broadcast/infer", json=broadcast_body(), headers={"X-Request-ID": "leak-1"})
    message = refused(response, 400, "model broadcast/1 could not run on these input values")
    assert "3 by 4" in message  # what went wrong survives
    tf = client.post("/v1/models/broadcast:predict", json={"inputs": {"a": [1, 2, 3], "b": [1, 2, 3, 4]}})
    refused(tf, 400, "could not run on these input values")
    request = pb.ModelInferRequest(model_name="broadcast")
    for name, values in (("a", [1.0, 2.0, 3.0]), ("b", [1.0, 2.0, 3.0, 4.0])):
        request.inputs.add(name=name, datatype="FP32", shape=[len(values)]).contents.fp32_contents.extend(values)
    error = grpc_infer(server, request.SerializeToString())
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "could not run on these input values" in error.details()
    assert not LEAKS.search(error.details()), error.details()
    still_serves(server)


def test_a_failed_load_does_not_show_where_the_model_lives(tmp_path: Path, captured: Captured) -> None:
    from onnxserve.core.manager import Catalog

    repo = tmp_path / "private-repository"
    models.write_version(repo, "add", 1, models.add_model())
    for name in ("broken", "broken_too"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf")
    catalog = Catalog(repository=repo)
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("add",)
    )
    running = start_in_background(catalog.read(), settings, catalog)
    try:
        response = httpx.post(f"{running.http_url}/v2/repository/models/broken/load", timeout=30)
        message = refused(response, 400, "failed to load", "not an ONNX model")
        assert str(tmp_path) not in message
        assert "private-repository" not in message
        with grpc.insecure_channel(running.grpc_address) as channel:
            load = channel.unary_unary(
                "/inference.GRPCInferenceService/RepositoryModelLoad",
                request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
                response_deserializer=pb.RepositoryModelLoadResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as raised:
                load(pb.RepositoryModelLoadRequest(model_name="broken_too"), timeout=30)
        details = raised.value.details() or ""
        assert "not an ONNX model" in details
        assert str(tmp_path) not in details
        assert not LEAKS.search(details)
        assert any(str(repo / "broken" / "1") in line for line, _ in captured.lines)  # the operator learns where
        index = httpx.post(f"{running.http_url}/v2/repository/index", json={}, timeout=30).json()
        reasons = {entry["name"]: entry["reason"] for entry in index if entry["state"] == "UNAVAILABLE"}
        with grpc.insecure_channel(running.grpc_address) as channel:
            grpc_index = channel.unary_unary(
                "/inference.GRPCInferenceService/RepositoryIndex",
                request_serializer=pb.RepositoryIndexRequest.SerializeToString,
                response_deserializer=pb.RepositoryIndexResponse.FromString,
            )(pb.RepositoryIndexRequest(), timeout=30)
        reasons.update({f"grpc:{m.name}": m.reason for m in grpc_index.models if m.state == "UNAVAILABLE"})
        assert {"broken", "broken_too", "grpc:broken", "grpc:broken_too"} <= set(reasons)
        for reason in reasons.values():
            assert "not an ONNX model" in reason
            assert str(tmp_path) not in reason
            assert not LEAKS.search(reason), reason
        still_serves(running)
    finally:
        running.stop()


# --- a lying client cannot reach an honest one's batch ------------------------------------------------


def test_a_client_that_lies_about_its_shape_never_touches_an_honest_clients_batch(
    repository: Path, tmp_path: Path
) -> None:
    """Two honest clients and a liar hit a batching model at once, round after round.

    The liar declares [4, 16] and sends 3 rows (JSON), or binary bytes shorter or longer than declared,
    over REST and gRPC. Each honest answer must be exactly its own sum, computed here with ONNX Runtime.
    """
    config = parse_config(
        {
            "model_config_list": [
                {
                    "name": "add",
                    "base_path": str(repository / "add"),
                    "max_batch_size": 8,
                    "dynamic_batching": {"max_queue_delay_us": 20_000},
                }
            ]
        },
        "liar test",
        tmp_path,
    )
    running = start_in_background(config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    url = f"{running.http_url}{INFER}"
    lies: list[tuple[dict[str, str], bytes]] = []
    junk = np.full((3, 16), 1e6, np.float32)
    lies.append(({"Content-Type": "application/json"}, json.dumps(one_input([4, 16], junk.ravel().tolist())).encode()))
    for raw in (junk.tobytes(), np.full((5, 16), 1e6, np.float32).tobytes()):
        header = json.dumps(
            {
                "inputs": [
                    {"name": n, "shape": [4, 16], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
                    for n in ("a", "b")
                ]
            }
        ).encode()
        lies.append(({HEADER_LENGTH: str(len(header))}, header + raw + raw))
    grpc_lie = raw_grpc_request([4, 16], [junk.tobytes(), junk.tobytes()])

    async def round_trip(http: httpx.AsyncClient, stub: Any, seed: int) -> None:
        a1, b1 = rows(2, seed)
        a2, b2 = rows(3, seed + 10_000)
        headers, lie = lies[seed % len(lies)]
        honest1, honest2, liar, grpc_liar = await asyncio.gather(
            http.post(url, json=add_body(a1, b1)),
            http.post(url, json=add_body(a2, b2)),
            http.post(url, content=lie, headers=headers),
            stub(grpc_lie, timeout=30),
            return_exceptions=True,
        )
        for response, (a, b) in ((honest1, (a1, b1)), (honest2, (a2, b2))):
            assert isinstance(response, httpx.Response)
            assert response.status_code == 200, response.text
            got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(a.shape)
            assert np.array_equal(got, expected_sum(repository, a, b))
        assert isinstance(liar, httpx.Response)
        assert liar.status_code == 400, liar.text
        assert isinstance(grpc_liar, grpc.RpcError)
        assert grpc_liar.code() is grpc.StatusCode.INVALID_ARGUMENT

    async def rounds() -> None:
        async with (
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as http,
            grpc.aio.insecure_channel(running.grpc_address) as channel,
        ):
            stub = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer", response_deserializer=pb.ModelInferResponse.FromString
            )
            for seed in range(60):
                await round_trip(http, stub, seed)

    try:
        asyncio.run(rounds())
        stats = httpx.get(f"{running.http_url}/v2/models/add/stats").json()["model_stats"][0]
        assert stats["inference_count"] == 60 * 5  # 2 + 3 rows a round: only the honest requests ran
        assert stats["execution_count"] < 120  # and honest requests shared batches
    finally:
        running.stop()
