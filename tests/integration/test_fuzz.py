"""Fuzzing the real server: no input, however malformed, gets a 5xx, a gRPC INTERNAL/UNKNOWN, or a crash.

Three fuzzers, each run twice: a fast pass in ``make test`` (a few hundred requests, seconds) and a long
pass of more than 10,000 requests in all, marked ``long`` (``make fuzz``):

- structured bodies (hypothesis): KServe V2 JSON (valid-ish and invalid shapes, datatypes, data), TF
  Serving bodies, and binary-extension bodies whose header lengths and sizes lie;
- a raw-socket HTTP fuzzer: malformed request lines, bad headers, broken chunked encoding, lying and
  truncated bodies, huge headers;
- a malformed-protobuf fuzzer for gRPC: random bytes and mutated valid ``ModelInferRequest``s sent with
  identity serializers.

After each fuzzer the server must still answer a valid request correctly, and no ERROR was logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
import raw_http
from onnxserve.config import parse_config
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

LIMIT = 1024 * 1024
FAST = {"v2": 100, "tfserving": 60, "binary": 60, "socket": 60, "grpc": 150}
LONG = {"v2": 3000, "tfserving": 1500, "binary": 1500, "socket": 2500, "grpc": 2500}
"""Requests per fuzzer; the long pass sends 11,000 in all."""

SERVICE = "/inference.GRPCInferenceService/"
HEADER_LENGTH = "Inference-Header-Content-Length"

sent: Counter[str] = Counter()


def examples(fuzzer: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "count",
        [pytest.param(FAST[fuzzer], id="fast"), pytest.param(LONG[fuzzer], id="long", marks=pytest.mark.long)],
    )


def fuzz_settings(count: int) -> settings:
    """The fast pass is derandomized (the same requests every run); the long pass draws new ones each time."""
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=count < 1000,
        suppress_health_check=list(HealthCheck),
    )


class Errors(logging.Handler):
    """ERROR records from the server: an unexpected exception anywhere shows up here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("fuzz")
    models.write_version(repo, "add", 1, models.add_model())
    models.write_version(repo, "mixed", 1, models.mixed_model())
    models.write_version(repo, "strings", 1, models.strings_model())
    config = parse_config(
        {
            "model_config_list": [
                {
                    "name": "add",
                    "base_path": "add",
                    "max_batch_size": 8,
                    "dynamic_batching": {"max_queue_delay_us": 500},
                },
                {"name": "mixed", "base_path": "mixed"},
                {"name": "strings", "base_path": "strings"},
            ]
        },
        "fuzz",
        repo,
    )
    running = start_in_background(
        config, ServerSettings(http_port=0, grpc_port=0, log_level="warning", max_request_bytes=LIMIT)
    )
    started = time.monotonic()
    yield running
    running.stop()
    if sum(sent.values()):
        print(f"\nfuzz: {sum(sent.values())} requests {dict(sent)} in {time.monotonic() - started:.1f} s")


@pytest.fixture
def errors() -> Iterator[Errors]:
    handler = Errors()
    for name in ("onnxserve", "uvicorn", "grpc"):
        logging.getLogger(name).addHandler(handler)
    yield handler
    for name in ("onnxserve", "uvicorn", "grpc"):
        logging.getLogger(name).removeHandler(handler)


def serves_correctly(server: RunningServer, errors: Errors) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    body = {
        "inputs": [{"name": n, "shape": [2, 16], "datatype": "FP32", "data": a.ravel().tolist()} for n in ("a", "b")]
    }
    response = httpx.post(f"{server.http_url}/v2/models/add/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == (a + a).ravel().tolist()
    with grpc.insecure_channel(server.grpc_address) as channel:
        live = channel.unary_unary(f"{SERVICE}ServerLive", response_deserializer=pb.ServerLiveResponse.FromString)
        assert live(pb.ServerLiveRequest().SerializeToString(), timeout=10).live
    assert not errors.records, errors.records


def check_http(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)


# --- strategies ----------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)
dims = st.integers(-3, 20) | st.sampled_from([0, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63), 10**20])
shapes = st.lists(dims, max_size=4) | json_values
datatypes = st.sampled_from(
    ["FP32", "FP16", "FP64", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "BF16", "fp32", "", "X"]
)
names = st.sampled_from(["a", "b", "ids", "flags", "half", "text", "x", ""]) | st.text(max_size=4)
tensor_data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=8), max_leaves=64)


@st.composite
def honest_input(draw: st.DrawFn) -> dict[str, Any]:
    """An ``add`` input that is right, or almost right (one count off)."""
    batch = draw(st.integers(0, 3))
    count = batch * 16 + draw(st.sampled_from([0, 0, 0, -1, 1]))
    values = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=max(count, 0), max_size=max(count, 0)))
    return {"name": draw(st.sampled_from(["a", "b"])), "shape": [batch, 16], "datatype": "FP32", "data": values}


random_input = st.fixed_dictionaries(
    {"name": names, "datatype": datatypes, "shape": shapes},
    optional={"data": tensor_data, "parameters": st.dictionaries(st.text(max_size=5), json_values, max_size=2)},
)
v2_bodies = (
    st.fixed_dictionaries(
        {"inputs": st.lists(honest_input() | random_input, max_size=3) | json_values},
        optional={
            "outputs": st.lists(st.fixed_dictionaries({"name": names}), max_size=2) | json_values,
            "parameters": st.dictionaries(st.text(max_size=8), json_values, max_size=2),
            "id": st.text(max_size=8) | st.integers(),
        },
    )
    | json_values
)
models_and_versions = st.sampled_from(["add", "mixed", "strings", "nope", "add/versions/1", "add/versions/9"])

tf_bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "instances": json_values
            | st.lists(st.fixed_dictionaries({"a": tensor_data, "b": tensor_data}), max_size=3),
            "inputs": json_values | st.fixed_dictionaries({"a": tensor_data}, optional={"b": tensor_data}),
            "signature_name": st.sampled_from(["serving_default", "other"]) | st.text(max_size=4),
            "examples": json_values,
        },
    )
    | json_values
)
tf_paths = st.sampled_from(
    ["add", "strings", "mixed", "nope", "add/versions/1", "add/labels/stable", "add/labels/7"]
).flatmap(lambda m: st.sampled_from([f"/v1/models/{m}:predict", f"/v1/models/{m}:classify", f"/v1/models/{m}:regress"]))


# --- (a) structured bodies -----------------------------------------------------------------------------


@examples("v2")
def test_v2_json_bodies(server: RunningServer, errors: Errors, count: int) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:

        @fuzz_settings(count)
        @given(body=v2_bodies, target=models_and_versions)
        def check(body: Any, target: str) -> None:
            sent["v2 json"] += 1
            check_http(client.post(f"/v2/models/{target}/infer", content=json.dumps(body).encode()))

        check()
    serves_correctly(server, errors)


@examples("tfserving")
def test_tf_serving_bodies(server: RunningServer, errors: Errors, count: int) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:

        @fuzz_settings(count)
        @given(body=tf_bodies, path=tf_paths)
        def check(body: Any, path: str) -> None:
            sent["tf serving json"] += 1
            response = client.post(
                path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            check_http(response)

        check()
    serves_correctly(server, errors)


@st.composite
def binary_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        item = draw(random_input | honest_input())
        item.pop("data", None)
        size = draw(st.integers(-5, 400) | st.sampled_from([2**31, 2**64]) | json_values)
        item["parameters"] = {"binary_data_size": size}
        inputs.append(item)
    header = json.dumps({"inputs": inputs}).encode()
    raw = draw(st.binary(max_size=400))
    length = draw(
        st.sampled_from([str(len(header))] * 3) | st.integers(-10, len(header) + 500).map(str) | st.text(max_size=5)
    )
    headers = {HEADER_LENGTH: length}
    if draw(st.booleans()):
        headers["Content-Type"] = "application/octet-stream"
    return header + raw, headers


@examples("binary")
def test_binary_extension_bodies_that_lie(server: RunningServer, errors: Errors, count: int) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:

        @fuzz_settings(count)
        @given(body=binary_bodies(), target=models_and_versions)
        def check(body: tuple[bytes, dict[str, str]], target: str) -> None:
            sent["binary extension"] += 1
            content, headers = body
            printable = {k: v for k, v in headers.items() if v.isprintable() and v.isascii()}
            check_http(client.post(f"/v2/models/{target}/infer", content=content, headers=printable))

        check()
    serves_correctly(server, errors)


# --- (b) raw-socket HTTP ------------------------------------------------------------------------------

methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "P0ST", "post", "", "GET GET"])
paths = st.sampled_from(
    [
        "/v2/models/add/infer",
        "/v1/models/add:predict",
        "/v2/health/ready",
        "/v2",
        "/metrics",
        "*",
        "",
        "/%",
        "/v2/../..",
        "/v2/models/%00/infer",
        "http://x/v2",
    ]
) | st.text(max_size=20).map(lambda t: "/" + t)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", "HTTP/1.1x", "", "http/1.1"])
header_bytes = st.binary(max_size=30).filter(lambda b: b"\r\n\r\n" not in b)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A request's bytes and whether the server may wait for more (a body shorter than announced)."""
    body = draw(st.sampled_from([b"", b"{}", b'{"inputs": []}', b"{not json"]) | st.binary(max_size=200))
    line = f"{draw(methods)} {draw(paths)} {draw(versions)}".encode("utf-8", "surrogateescape")
    headers: list[bytes] = [b"Host: [::1]"]
    for _ in range(draw(st.integers(0, 3))):
        headers.append(draw(header_bytes) + b": " + draw(header_bytes))
    if draw(st.integers(0, 19)) == 0:
        headers.append(b"X-Huge: " + b"h" * draw(st.sampled_from([10_000, 100_000, 1_000_000])))
    framing = draw(
        st.sampled_from(["length", "length", "chunked", "bad-chunked", "both", "lying-long", "lying-short", "none"])
    )
    may_hang = False
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "lying-short":
        headers.append(b"Content-Length: %d" % max(len(body) - 3, 0))
    elif framing == "lying-long":
        headers.append(b"Content-Length: %d" % (len(body) + 5))
        may_hang = True
    elif framing in ("chunked", "both"):
        headers.append(b"Transfer-Encoding: chunked")
        if framing == "both":
            headers.append(b"Content-Length: 3")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "bad-chunked":
        headers.append(b"Transfer-Encoding: chunked")
        body = draw(
            st.sampled_from(
                [
                    b"zz\r\nabc\r\n0\r\n\r\n",
                    b"-5\r\nabc\r\n0\r\n\r\n",
                    b"3\r\nabcdef\r\n0\r\n\r\n",
                    b"ffffffffffffffffffff\r\nab\r\n",
                    b"3\r\nab",
                    b"3;ext=\x00\r\nabc\r\n0\r\n\r\n",
                ]
            )
        )
        may_hang = True
    if draw(st.integers(0, 9)) == 0:
        headers.append(
            draw(
                st.sampled_from(
                    [
                        b"Content-Encoding: gzip",
                        b"Content-Type: application/x-python-pickle",
                        b"Content-Length: -1",
                        b"Content-Length: 1e3",
                        b"Expect: 100-continue",
                    ]
                )
            )
        )
    return line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body, may_hang


@examples("socket")
def test_raw_socket_http(server: RunningServer, errors: Errors, count: int) -> None:
    @fuzz_settings(count)
    @given(request=raw_requests())
    def check(request: tuple[bytes, bool]) -> None:
        sent["raw socket"] += 1
        data, may_hang = request
        response = raw_http.exchange(server.host, server.http_port, data, timeout=0.2 if may_hang else 10)
        assert response.status < 500, (data[:300], response)

    check()
    serves_correctly(server, errors)


# --- (c) malformed protobuf over gRPC -----------------------------------------------------------------


def valid_infer_request() -> bytes:
    message = pb.ModelInferRequest(model_name="add", model_version="1", id="fuzz")
    for name in ("a", "b"):
        message.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        message.raw_input_contents.append(np.ones(16, np.float32).tobytes())
    message.outputs.add(name="sum")
    return message.SerializeToString()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(valid_infer_request())
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        else:
            data += data[at : at + draw(st.integers(1, 60))]
    return bytes(data)


rpcs = st.sampled_from(
    ["ModelInfer"] * 6 + ["ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics", "RepositoryIndex"]
)


@examples("grpc")
def test_malformed_protobuf(server: RunningServer, errors: Errors, count: int) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:

        @fuzz_settings(count)
        @given(data=mutated() | st.binary(max_size=300), rpc=rpcs)
        def check(data: bytes, rpc: str) -> None:
            sent["grpc protobuf"] += 1
            call = channel.unary_unary(SERVICE + rpc)  # identity serializers: the bytes go out as they are
            outcome = call.future(data, timeout=30).exception()
            if isinstance(outcome, grpc.RpcError):
                assert outcome.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (rpc, data, outcome)

        check()
    serves_correctly(server, errors)
