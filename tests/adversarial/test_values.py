"""Finding 5: values that are not the numbers the code expects. A 5,000-digit version answered 500 on
every HTTP route that takes one and UNKNOWN ("Exceeds the limit (4300 digits)...") on gRPC. Every version
string now goes through one parser (``core.repository.version_number``): an unknown version, 404 /
NOT_FOUND, with the string cut short in the message. Other client numbers (the ``timeout`` parameter,
the web API's counts) are refused with 400, never a 5xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from harness import CappedServer, model_infer, serve_capped

from models import add_model, write_version
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

HUGE = "9" * 5000
CAP = 3 * 1024**3

VERSION_ROUTES = [
    ("GET", "/v2/models/m/versions/{v}/ready"),
    ("GET", "/v2/models/m/versions/{v}"),
    ("GET", "/v2/models/m/versions/{v}/config"),
    ("GET", "/v2/models/m/versions/{v}/stats"),
    ("POST", "/v2/models/m/versions/{v}/infer"),
    ("GET", "/v1/models/m/versions/{v}"),
    ("GET", "/v1/models/m/versions/{v}/metadata"),
    ("POST", "/v1/models/m/versions/{v}:predict"),
    ("GET", "/models/m/versions/{v}"),
    ("GET", "/web/api/models/m/versions/{v}/graph"),
    ("GET", "/web/api/models/m/versions/{v}/weights"),
    ("GET", "/web/api/models/m/diff?a=1&b={v}"),
]

V2_BODY = {"inputs": [{"name": n, "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16} for n in ("a", "b")]}
TFS_BODY = {"inputs": {"a": [[0.0] * 16], "b": [[0.0] * 16]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root: Path = tmp_path_factory.mktemp("values")
    write_version(root, "m", 1, add_model())
    with serve_capped(root, cap_bytes=CAP) as running:
        yield running


@pytest.mark.parametrize("version", [HUGE, str(2**63), "0" * 4400 + "1"])
def test_every_http_route_answers_an_unparseable_version_with_404(server: CappedServer, version: str) -> None:
    for method, route in VERSION_ROUTES:
        path = route.format(v=version)
        body = TFS_BODY if path.startswith("/v1/") else V2_BODY
        response = requests.request(method, server.http_url + path, json=body if method == "POST" else None, timeout=30)
        assert "Exceeds the limit" not in response.text
        if version.startswith("0"):  # leading zeros: version 1, which exists (never a 5xx)
            assert response.status_code < 500, (path[:80], response.text[:200])
            continue
        assert response.status_code == 404, (path[:80], response.status_code, response.text[:200])
        assert "has no version" in response.text
        assert len(response.content) < 2000  # the 5,000 digits are not echoed back
    assert server.alive()
    assert server.probe_seconds() < 1


def _unary(channel: grpc.Channel, method: str, response: type) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        f"/inference.GRPCInferenceService/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString,
    )


def test_grpc_answers_an_unparseable_version_with_not_found(server: CappedServer) -> None:
    infer = pb.ModelInferRequest(
        model_name="m",
        model_version=HUGE,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=n, datatype="FP32", shape=[1, 16], contents=pb.InferTensorContents(fp32_contents=[0.0] * 16)
            )
            for n in ("a", "b")
        ],
    )
    calls = [
        ("ModelReady", pb.ModelReadyRequest(name="m", version=HUGE), pb.ModelReadyResponse),
        ("ModelMetadata", pb.ModelMetadataRequest(name="m", version=HUGE), pb.ModelMetadataResponse),
        ("ModelConfig", pb.ModelConfigRequest(name="m", version=HUGE), pb.ModelConfigResponse),
        ("ModelStatistics", pb.ModelStatisticsRequest(name="m", version=HUGE), pb.ModelStatisticsResponse),
        ("ModelInfer", infer, pb.ModelInferResponse),
    ]
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method, request, response in calls:
            with pytest.raises(grpc.RpcError) as refused:
                _unary(channel, method, response)(request, timeout=30)
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND, (method, refused.value.details())
            assert "has no version" in (refused.value.details() or "")
    assert server.alive()


@pytest.mark.parametrize("timeout", [-1, 1.5, "soon", True, 10**30])
def test_a_bad_timeout_parameter_is_refused_with_400(server: CappedServer, timeout: object) -> None:
    body = {**V2_BODY, "parameters": {"timeout": timeout}}
    response = requests.post(f"{server.http_url}/v2/models/m/infer", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "timeout" in response.json()["error"]


def test_web_api_counts_are_bounded(server: CappedServer) -> None:
    response = requests.get(f"{server.http_url}/web/api/models/m/versions/1/weights?name=x&offset={HUGE}", timeout=30)
    assert response.status_code == 400
    assert "offset must be a whole number" in response.json()["error"]
    normal = requests.post(f"{server.http_url}/v2/models/m/infer", json=V2_BODY, timeout=30)
    assert normal.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/m/versions/" + "a" * 5000,  # no route takes a non-number version there
        "/no/such/" + "b" * 5000,
        "/v2/models/" + "c" * 300 + "/ready",
        "/v1/models/" + "d" * 300 + "/labels/" + "7" * 5000,
    ],
)
def test_error_messages_repeat_client_text_only_in_part(server: CappedServer, path: str) -> None:
    response = requests.get(server.http_url + path, timeout=30)
    assert 400 <= response.status_code < 500, response.text[:200]
    assert len(response.text) < 600, response.text[:600]
    assert "characters)" in response.text  # says how long the text it cut was
    assert server.alive()


@pytest.mark.parametrize("path", ["/metrics/", "/v2/health/ready/", "/v2/models/m/"])
def test_a_trailing_slash_is_not_redirected_to_the_clients_host(server: CappedServer, path: str) -> None:
    # Outside attack: Starlette redirected "/metrics/" to "http://<the Host header>/metrics". (A server on
    # loopback now answers no other host name at all: 403, see test_browser_guard.)
    response = requests.get(server.http_url + path, headers={"Host": "evil.example"}, allow_redirects=False, timeout=30)
    assert response.status_code in (403, 404), response.text[:200]
    assert "location" not in response.headers
    assert "evil.example" not in response.text


BIG_NAME = "n" * 5_000_000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/m/infer", {"inputs": [{"name": BIG_NAME, "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
        ("/v2/models/m/infer", {"inputs": [{"name": "a", "shape": [1], "datatype": BIG_NAME, "data": [1.0]}]}),
        ("/v2/models/m/infer", {**V2_BODY, "parameters": {"timeout": BIG_NAME}}),
        ("/v1/models/m:predict", {"signature_name": BIG_NAME, **TFS_BODY}),
        ("/v1/embeddings", {"model": "m", "input": "x", BIG_NAME: 1}),
    ],
)
def test_an_error_repeats_at_most_a_thousand_characters_of_what_was_sent(
    server: CappedServer, path: str, body: dict[str, object]
) -> None:
    # Outside attack: a 5 MB unknown key came back twice (a 10 MB answer from a 5 MB body); unread, such
    # echoes pushed a capped server into a crash.
    response = requests.post(server.http_url + path, json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text[:300]
    assert len(response.content) < 2_000, response.text[:300]
    assert "characters)" in response.text  # it says how long the text it cut was
    assert server.alive()


def test_a_grpc_error_repeats_at_most_a_thousand_characters(server: CappedServer) -> None:
    # Outside attack: 20 KB of a bad input name came back in the trailers, above grpc's metadata limit, and
    # the client saw RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT.
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x" * 20_000, datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as refused:
        model_infer(server.grpc_target, request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert len(refused.value.details() or "") < 2_000


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"instances": [NaN, ' + b"9" * 5000 + b"]}", "more digits than any datatype holds"),
        (b'{"instances": [NaN, "\xff"]}', "not UTF-8"),
    ],
)
def test_tf_serving_bodies_the_slow_parser_refuses_are_refused_in_our_words(
    server: CappedServer, body: bytes, said: str
) -> None:
    # Outside attack: Python's own messages came back ("use sys.set_int_max_str_digits() ...", "'utf-8' codec
    # can't decode byte 0xff in position 19").
    response = requests.post(
        server.http_url + "/v1/models/m:predict", data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text[:300]
    assert said in response.json()["error"]
    assert "sys." not in response.text
    assert "codec" not in response.text
