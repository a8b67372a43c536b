"""Exposure: loopback by default, bearer tokens with scopes, TLS and mutual TLS, over HTTP and gRPC.

Real servers on ephemeral ports, real clients (httpx, tritonclient, raw gRPC channels), real
certificates from a throw-away CA (trustme). Each refusal is checked for its status, its protocol's
error form, and that it changed nothing (a refused load loads nothing); each acceptance for the
answer the model computes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
import trustme

import models
from onnxserve.core.manager import Catalog
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("collect_tritonclients")

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]
SERVICE = "/inference.GRPCInferenceService"
INFER = "infer-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
METRICS = "metrics-token-0123456789abc"
WRONG = "wrong-token-0123456789abcdef"
TOKEN_LINES = f"""# tokens of the test server
{INFER} infer
{ADMIN} infer,control   # the operator
{METRICS} metrics
"""
REALM = 'Bearer realm="onnxserve"'

INFER_ENDPOINTS = [
    ("GET", "/v2"),
    ("GET", "/v2/models/a"),
    ("GET", "/v2/models/a/ready"),
    ("GET", "/v2/models/a/config"),
    ("GET", "/v2/models/a/stats"),
    ("GET", "/v2/models/stats"),
    ("POST", "/v2/models/a/infer"),
    ("GET", "/v2/models/a/versions/1"),
    ("POST", "/v2/models/a/versions/1/infer"),
    ("GET", "/v1/models/a"),
    ("GET", "/v1/models/a/metadata"),
    ("POST", "/v1/models/a:predict"),
    ("POST", "/v1/models/a/versions/1:predict"),
    ("POST", "/v1/models/a:classify"),
    ("GET", "/v2/no/such/endpoint"),
]
CONTROL_ENDPOINTS = [
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/b/load"),
    ("POST", "/v2/repository/models/b/unload"),
]
METRICS_ENDPOINTS = [("GET", "/metrics")]
PROTECTED = INFER_ENDPOINTS + CONTROL_ENDPOINTS + METRICS_ENDPOINTS


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}  # lower case: gRPC metadata keys must be


def v2_body(x: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [x]}]}


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("auth-repo")
    models.write_version(repo, "a", 1, models.offset_model(1.0))
    models.write_version(repo, "b", 1, models.offset_model(2.0))
    return repo


def start(repository: Path, **settings: Any) -> RunningServer:
    """A server on ephemeral ports over ``repository`` under explicit model control, with ``a`` loaded."""
    full = ServerSettings(
        http_port=0,
        grpc_port=0,
        log_level="warning",
        model_control_mode="explicit",
        load_models=("a",),
        **settings,
    )
    catalog = Catalog(repository=repository)
    return start_in_background(catalog.read(), full, catalog)


@pytest.fixture(scope="module")
def secured(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tokens = write_private(tmp_path_factory.mktemp("tokens") / "tokens.txt", TOKEN_LINES)
    server = start(repository, auth_tokens_file=tokens)
    yield server
    server.stop()


def states(server: RunningServer) -> dict[str, str]:
    response = httpx.post(f"{server.http_url}/v2/repository/index", json={}, headers=bearer(ADMIN))
    assert response.status_code == 200, response.text
    return {entry["name"]: entry["state"] for entry in response.json()}


# --- where the server listens ---------------------------------------------------------------------


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of each listening socket; IPv4-mapped IPv6 addresses (gRPC's) as IPv4."""
    found = set()
    for connection in psutil.Process(pid).net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(connection.laddr.ip)
            mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            found.add((str(mapped or address), connection.laddr.port))
    return found


def test_default_listeners_bind_loopback_only(repository: Path) -> None:
    """`onnxserve serve` without --host: every socket the process listens on is 127.0.0.1."""
    process = subprocess.Popen(
        [*ONNXSERVE, "serve", "--model-repository", str(repository), "--http-port", "0", "--grpc-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ONNXSERVE_AUTH_TOKENS"},
    )
    assert process.stderr is not None
    try:
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(ports) < 2 and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            if match := re.search(r"(HTTP|gRPC) \(.*\) on (?:http://)?127\.0\.0\.1:(\d+)", line):
                ports[match.group(1)] = int(match.group(2))
        assert set(ports) == {"HTTP", "gRPC"}, "the server did not say where it listens"
        listening = listening_addresses(process.pid)
        assert {port for _, port in listening} >= set(ports.values())
        assert {address for address, _ in listening} == {"127.0.0.1"}
        assert httpx.get(f"http://127.0.0.1:{ports['HTTP']}/v2/health/live").status_code == 200
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def test_start_in_background_binds_loopback_by_default(repository: Path) -> None:
    server = start(repository)
    try:
        listening = listening_addresses(os.getpid())
        for port in (server.http_port, server.grpc_port):
            assert {address for address, p in listening if p == port} == {"127.0.0.1"}
    finally:
        server.stop()


def test_binding_beyond_loopback_without_tokens_is_warned(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxserve.server.exposure"):
        server = start(repository, host="0.0.0.0")
        server.stop()
    [warning] = [r for r in caplog.records if r.name == "onnxserve.server.exposure"]
    assert "without authentication" in warning.getMessage()
    assert "--auth-tokens" in warning.getMessage()

    caplog.clear()
    tokens = write_private(tmp_path / "tokens.txt", TOKEN_LINES)
    with caplog.at_level(logging.WARNING, logger="onnxserve.server.exposure"):
        start(repository, host="0.0.0.0", auth_tokens_file=tokens).stop()
        start(repository, auth_tokens_file=tokens).stop()  # loopback: nothing to say
    [warning] = [r for r in caplog.records if r.name == "onnxserve.server.exposure"]
    assert "without TLS" in warning.getMessage()


# --- bearer tokens over HTTP ----------------------------------------------------------------------


def test_probes_stay_open(secured: RunningServer) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{secured.http_url}{path}").status_code == 200


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_no_token_is_401(secured: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{secured.http_url}{path}", json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM
    assert "bearer token" in response.json()["error"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_unknown_token_is_401(secured: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{secured.http_url}{path}", json={}, headers=bearer(WRONG))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == f'{REALM}, error="invalid_token"'
    assert response.json() == {"error": "the bearer token is not accepted"}


@pytest.mark.parametrize(
    "authorization",
    [
        f"Basic {INFER}",  # another scheme
        INFER,  # no scheme
        "Bearer",  # no token
        f"Bearer {INFER[:-1]}",  # a prefix of a real token
        f"Bearer {INFER}x",  # a real token and more
        f"Bearer {INFER.upper()}",
    ],
)
def test_malformed_or_near_miss_authorization_is_401(secured: RunningServer, authorization: str) -> None:
    response = httpx.post(
        f"{secured.http_url}/v2/models/a/infer", json=v2_body(1.0), headers={"Authorization": authorization}
    )
    assert response.status_code == 401, response.text


def test_two_authorization_headers_are_401(secured: RunningServer) -> None:
    headers = [("Authorization", f"Bearer {INFER}"), ("Authorization", f"Bearer {ADMIN}")]
    response = httpx.post(f"{secured.http_url}/v2/models/a/infer", json=v2_body(1.0), headers=headers)
    assert response.status_code == 401
    assert "one authorization header" in response.json()["error"]


def test_scheme_name_is_case_insensitive(secured: RunningServer) -> None:
    response = httpx.post(
        f"{secured.http_url}/v2/models/a/infer", json=v2_body(1.0), headers={"Authorization": f"bearer {INFER}"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(("method", "path"), CONTROL_ENDPOINTS + METRICS_ENDPOINTS)
def test_infer_token_outside_its_scope_is_403(secured: RunningServer, method: str, path: str) -> None:
    needed = "metrics" if path == "/metrics" else "control"
    response = httpx.request(method, f"{secured.http_url}{path}", json={}, headers=bearer(INFER))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == f'{REALM}, error="insufficient_scope", scope="{needed}"'
    assert f"scope '{needed}'" in response.json()["error"]


def test_metrics_token_may_only_scrape(secured: RunningServer) -> None:
    assert httpx.get(f"{secured.http_url}/metrics", headers=bearer(METRICS)).status_code == 200
    response = httpx.post(f"{secured.http_url}/v2/models/a/infer", json=v2_body(1.0), headers=bearer(METRICS))
    assert response.status_code == 403
    assert "scope 'infer'" in response.json()["error"]


@pytest.mark.parametrize(("method", "path"), INFER_ENDPOINTS)
def test_infer_token_reaches_every_inference_endpoint(secured: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{secured.http_url}{path}", json={}, headers=bearer(INFER))
    # the endpoint itself answers: 200, or its own complaint about the empty body or the unknown path
    assert response.status_code not in (401, 403), response.text
    if path == "/v2/no/such/endpoint":
        assert response.status_code == 404


def test_infer_token_runs_inference_on_both_http_protocols(secured: RunningServer) -> None:
    x = 0.25
    v2 = httpx.post(f"{secured.http_url}/v2/models/a/infer", json=v2_body(x), headers=bearer(INFER))
    assert v2.status_code == 200
    assert v2.json()["outputs"][0]["data"] == [x + 1.0]
    tfs = httpx.post(f"{secured.http_url}/v1/models/a:predict", json={"instances": [[x]]}, headers=bearer(INFER))
    assert tfs.status_code == 200
    assert tfs.json() == {"predictions": [[x + 1.0]]}


def test_infer_token_cannot_load_or_unload(secured: RunningServer) -> None:
    assert states(secured)["b"] == "UNAVAILABLE"
    refused = httpx.post(f"{secured.http_url}/v2/repository/models/b/load", headers=bearer(INFER))
    assert refused.status_code == 403
    assert states(secured)["b"] == "UNAVAILABLE"
    refused = httpx.post(f"{secured.http_url}/v2/repository/models/a/unload", headers=bearer(INFER))
    assert refused.status_code == 403
    assert states(secured)["a"] == "READY"


def test_control_token_loads_and_unloads(secured: RunningServer) -> None:
    url = secured.http_url
    assert httpx.post(f"{url}/v2/repository/models/b/load", headers=bearer(ADMIN)).status_code == 200
    try:
        answer = httpx.post(f"{url}/v2/models/b/infer", json=v2_body(0.5), headers=bearer(INFER))
        assert answer.json()["outputs"][0]["data"] == [2.5]
    finally:
        assert httpx.post(f"{url}/v2/repository/models/b/unload", headers=bearer(ADMIN)).status_code == 200
    assert states(secured)["b"] == "UNAVAILABLE"


def test_tritonclient_http_with_tokens(secured: RunningServer) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(secured.http_url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.get_model_metadata("a")
        assert client.get_model_metadata("a", headers=bearer(INFER))["name"] == "a"
        with pytest.raises(InferenceServerException, match="scope 'control'"):
            client.load_model("b", headers=bearer(INFER))
        client.load_model("b", headers=bearer(ADMIN))
        client.unload_model("b", headers=bearer(ADMIN))
    finally:
        client.close()


# --- bearer tokens over gRPC ----------------------------------------------------------------------


def grpc_call(
    channel: grpc.Channel, method: str, request: Any, response_type: type[Any], token: str | None = None
) -> Any:
    call = channel.unary_unary(
        f"{SERVICE}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return call(request, metadata=metadata, timeout=10)


def infer_request(model: str, x: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    tensor.contents.fp32_contents.append(x)
    return request


def grpc_code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error: Any = raised.value
    return error.code(), error.details()


def test_grpc_probes_stay_open(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.grpc_address) as channel:
        assert grpc_call(channel, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
        assert grpc_call(channel, "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready


def test_grpc_refuses_missing_and_unknown_tokens(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.grpc_address) as channel:
        call = channel.unary_unary(
            f"{SERVICE}/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            call(infer_request("a", 1.0), metadata=(("x-request-id", "my-id-1"),), timeout=10)
        error: Any = raised.value
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("x-request-id", "my-id-1") in tuple(error.trailing_metadata())
        for token in (None, WRONG):
            code, details = grpc_code(
                lambda: grpc_call(channel, "ModelInfer", infer_request("a", 1.0), pb.ModelInferResponse, token)  # noqa: B023
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in details
        code, _ = grpc_code(
            lambda: grpc_call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="a"), pb.ModelMetadataResponse)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = grpc_code(lambda: grpc_call(channel, "NoSuchMethod", pb.ServerLiveRequest(), pb.ServerLiveResponse))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = grpc_code(
            lambda: grpc_call(channel, "NoSuchMethod", pb.ServerLiveRequest(), pb.ServerLiveResponse, INFER)
        )
        assert code == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_refuses_streams_without_a_token(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.grpc_address) as channel:
        stream = channel.stream_stream(
            f"{SERVICE}/ModelStreamInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        code, _ = grpc_code(lambda: list(stream(iter([infer_request("a", 1.0)]), timeout=10)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {INFER}"),)
        [answer] = list(stream(iter([infer_request("a", 1.0)]), metadata=metadata, timeout=10))
        assert list(answer.infer_response.outputs[0].contents.fp32_contents) == [2.0]


def test_grpc_scopes(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.grpc_address) as channel:
        answer = grpc_call(channel, "ModelInfer", infer_request("a", 3.0), pb.ModelInferResponse, INFER)
        assert list(answer.outputs[0].contents.fp32_contents) == [4.0]
        for method, request, response in (
            ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="b"), pb.RepositoryModelLoadResponse),
            (
                "RepositoryModelUnload",
                pb.RepositoryModelUnloadRequest(model_name="a"),
                pb.RepositoryModelUnloadResponse,
            ),
            ("RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse),
        ):
            code, details = grpc_code(lambda: grpc_call(channel, method, request, response, INFER))  # noqa: B023
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "scope 'control'" in details
        assert states(secured) == {"a": "READY", "b": "UNAVAILABLE"}
        code, _ = grpc_code(
            lambda: grpc_call(channel, "ModelInfer", infer_request("a", 3.0), pb.ModelInferResponse, METRICS)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_tritonclient_grpc_with_tokens(secured: RunningServer) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(secured.grpc_address)
    try:
        assert client.is_server_live()
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.get_model_metadata("a")
        with pytest.raises(InferenceServerException, match="scope 'control'"):
            client.load_model("b", headers=bearer(INFER))
        client.load_model("b", headers=bearer(ADMIN))
        assert client.is_model_ready("b", headers=bearer(INFER))
        client.unload_model("b", headers=bearer(ADMIN))
        assert states(secured)["b"] == "UNAVAILABLE"
    finally:
        client.close()


# --- TLS and mutual TLS ---------------------------------------------------------------------------


def client_context(ca: trustme.CA, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


def grpc_live(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        response = channel.unary_unary(
            f"{SERVICE}/ServerLive",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ServerLiveResponse.FromString,
        )(pb.ServerLiveRequest(), timeout=5)
        return bool(response.live)


def test_tls_on_both_listeners(repository: Path, ca: trustme.CA, tls_files: dict[str, Path]) -> None:
    server = start(repository, tls_cert=tls_files["cert"], tls_key=tls_files["key"])
    try:
        assert server.http_url.startswith("https://")
        with httpx.Client(verify=client_context(ca)) as client:
            response = client.post(f"{server.http_url}/v2/models/a/infer", json=v2_body(1.0))
            assert response.json()["outputs"][0]["data"] == [2.0]
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.http_url}/v2/health/live", verify=client_context(trustme.CA()))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.http_port}/v2/health/live")

        trusted = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        assert grpc_live(server.grpc_address, trusted)
        stranger = grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes())
        assert grpc_code(lambda: grpc_live(server.grpc_address, stranger))[0] == grpc.StatusCode.UNAVAILABLE
        assert grpc_code(lambda: grpc_live(server.grpc_address, None))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    repository: Path, ca: trustme.CA, tls_files: dict[str, Path]
) -> None:
    server = start(repository, tls_cert=tls_files["cert"], tls_key=tls_files["key"], tls_client_ca=tls_files["ca"])
    member = ca.issue_cert("client@example.org")
    outsider = trustme.CA().issue_cert("client@example.org")
    try:
        # gRPC
        def credentials(client: trustme.LeafCert | None) -> grpc.ChannelCredentials:
            if client is None:
                return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
            return grpc.ssl_channel_credentials(
                root_certificates=ca.cert_pem.bytes(),
                private_key=client.private_key_pem.bytes(),
                certificate_chain=b"".join(blob.bytes() for blob in client.cert_chain_pems),
            )

        assert grpc_live(server.grpc_address, credentials(member))
        for refused in (None, outsider):
            assert grpc_code(lambda: grpc_live(server.grpc_address, credentials(refused)))[0] == (  # noqa: B023
                grpc.StatusCode.UNAVAILABLE
            )
        # HTTP
        with httpx.Client(verify=client_context(ca, member)) as client:
            assert client.get(f"{server.http_url}/v2/health/live").status_code == 200
        for refused in (None, outsider):
            with pytest.raises(httpx.HTTPError), httpx.Client(verify=client_context(ca, refused)) as client:
                client.get(f"{server.http_url}/v2/health/live")
    finally:
        server.stop()


def test_tokens_over_tls(repository: Path, ca: trustme.CA, tls_files: dict[str, Path], tmp_path: Path) -> None:
    tokens = write_private(tmp_path / "tokens.txt", TOKEN_LINES)
    server = start(repository, tls_cert=tls_files["cert"], tls_key=tls_files["key"], auth_tokens_file=tokens)
    try:
        with httpx.Client(verify=client_context(ca)) as client:
            assert client.post(f"{server.http_url}/v2/models/a/infer", json=v2_body(1.0)).status_code == 401
            answer = client.post(f"{server.http_url}/v2/models/a/infer", json=v2_body(1.0), headers=bearer(INFER))
            assert answer.json()["outputs"][0]["data"] == [2.0]
        with grpc.secure_channel(
            server.grpc_address, grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        ) as channel:
            answer = grpc_call(channel, "ModelInfer", infer_request("a", 1.0), pb.ModelInferResponse, INFER)
            assert list(answer.outputs[0].contents.fp32_contents) == [2.0]
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(server.grpc_address, ssl=True, root_certificates=str(tls_files["ca"]))
        try:
            assert client.get_model_metadata("a", headers=bearer(INFER)).name == "a"
        finally:
            client.close()
    finally:
        server.stop()


# --- model control stays off unless enabled -------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_model_control_is_off_unless_explicit(repository: Path, mode: str) -> None:
    """The CLI's path (a catalog is always there): load and unload are refused on both protocols."""
    assert ServerSettings().model_control_mode == "none"
    catalog = Catalog(repository=repository)
    settings = ServerSettings(http_port=0, grpc_port=0, log_level="warning", model_control_mode=mode)
    server = start_in_background(catalog.read(), settings, catalog)
    try:
        for verb, model in (("load", "b"), ("unload", "a")):
            response = httpx.post(f"{server.http_url}/v2/repository/models/{model}/{verb}")
            assert response.status_code == 400
            assert "--model-control-mode explicit" in response.json()["error"]
        with grpc.insecure_channel(server.grpc_address) as channel:
            code, details = grpc_code(
                lambda: grpc_call(
                    channel,
                    "RepositoryModelUnload",
                    pb.RepositoryModelUnloadRequest(model_name="a"),
                    pb.RepositoryModelUnloadResponse,
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "--model-control-mode explicit" in details
        assert httpx.post(f"{server.http_url}/v2/models/a/infer", json=v2_body(1.0)).status_code == 200
    finally:
        server.stop()


# --- bad settings stop the server at start-up -----------------------------------------------------


def run_serve(repository: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "ONNXSERVE_AUTH_TOKENS"} | (env or {})
    return subprocess.run(
        [*ONNXSERVE, "serve", "--model-repository", str(repository), "--http-port", "0", "--grpc-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )


def test_bad_exposure_settings_exit_2_naming_the_option(
    repository: Path, tls_files: dict[str, Path], tmp_path: Path
) -> None:
    short = write_private(tmp_path / "short.txt", "tooshort infer\n")
    wrong_key = tmp_path / "other.key"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(wrong_key))
    cases: list[tuple[tuple[str, ...], dict[str, str] | None, str]] = [
        (("--auth-tokens", str(tmp_path / "missing.txt")), None, "--auth-tokens"),
        (("--auth-tokens", str(short)), None, "at least 16"),
        ((), {"ONNXSERVE_AUTH_TOKENS": ""}, "ONNXSERVE_AUTH_TOKENS: no tokens"),
        ((), {"ONNXSERVE_AUTH_TOKENS": f"{INFER} everything"}, "unknown scope 'everything'"),
        (("--tls-cert", str(tls_files["cert"])), None, "--tls-cert needs --tls-key"),
        (("--tls-key", str(tls_files["key"])), None, "--tls-key needs --tls-cert"),
        (("--tls-cert", str(tls_files["cert"]), "--tls-key", str(tmp_path / "nokey.pem")), None, "--tls-key"),
        (("--tls-cert", str(tls_files["cert"]), "--tls-key", str(wrong_key)), None, "--tls-cert"),
        (("--tls-client-ca", str(tls_files["ca"])), None, "--tls-client-ca needs --tls-cert"),
    ]
    for args, env, expected in cases:
        result = run_serve(repository, *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        message = " ".join(result.stderr.split())
        assert expected in message, (args, message)
        assert "Traceback" not in result.stderr
        assert INFER not in result.stderr  # tokens are never echoed
        assert "tooshort" not in result.stderr


def test_tokens_from_the_environment(repository: Path) -> None:
    process = subprocess.Popen(
        [*ONNXSERVE, "serve", "--model-repository", str(repository), "--http-port", "0", "--grpc-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"ONNXSERVE_AUTH_TOKENS": f"{INFER} infer; {ADMIN} infer,control"},
    )
    assert process.stderr is not None
    try:
        url = ""
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            if match := re.search(r"HTTP \(.*\) on (http://127\.0\.0\.1:\d+)", line):
                url = match.group(1)
        assert url, "the server did not start"
        assert httpx.post(f"{url}/v2/models/a/infer", json=v2_body(1.0)).status_code == 401
        assert httpx.post(f"{url}/v2/models/a/infer", json=v2_body(1.0), headers=bearer(ADMIN)).status_code == 200
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
