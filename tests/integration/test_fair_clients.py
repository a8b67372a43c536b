"""Fair service between clients on a real server with real clients: one client floods the model with
concurrent requests (gRPC ModelInfer or HTTP), another sends one small request; it is answered after
about one run, not after the flood.

A client is its bearer token when tokens are configured, else its address: the other client connects
from 127.0.0.2 (the client socket bound there), or presents another token from the same address. The
model is ``paced`` (y = x after x chained 64x64 products) on one instance, so every request costs the
same run. The small request is sent once every flood request is inside the service (queued or
running); the checks compare orders and durations within one run, never fixed times: the small
request's answer comes before at least half of the flood's answers, and it waits less than half of the
flood's length (without fair order it would come after every one of them).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

import models
import raw_http
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.batching import DynamicBatcher
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from waiting import until, wait_until

FLOOD = 24
PRODUCTS = 3000.0  # 64x64 products per run: tens of ms, so that the flood queues up faster than it runs (at
# 1000, batches of 4 drained 24 requests before a gRPC flood sent from a loaded test process was all in)
TOKEN_A = "flooder-0123456789abcdef"
TOKEN_B = "patient-0123456789abcdef"
DIRECT: dict[str, Any] = {"max_batch_size": 0}
BATCHING: dict[str, Any] = {"max_batch_size": 4, "dynamic_batching": {}}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("fair_clients")
    models.write_version(repo, "paced", 1, models.value_paced_model("paced", 64))
    return repo


@pytest.fixture
def serve(repository: Path) -> Iterator[Callable[..., RunningServer]]:
    running: list[RunningServer] = []

    def start(entry: dict[str, Any], tokens: bool = False, **more: Any) -> RunningServer:
        document = {"model_config_list": [{"name": "paced", "base_path": "paced", "instance_count": 1, **entry}]}
        config: ServerConfig = parse_config(document, "fair clients test", repository)
        settings = ServerSettings(
            http_port=0,
            grpc_port=0,
            log_level="warning",
            # Each gRPC call waiting to be received reserves the largest message in the in-flight budget:
            # small messages let the whole flood in at once.
            grpc_max_message_bytes=65536,
            auth_tokens=f"{TOKEN_A} infer;{TOKEN_B} infer" if tokens else None,
            **more,
        )
        server = start_in_background(config, settings)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def http_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [PRODUCTS]}]}


def grpc_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="paced")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(PRODUCTS)
    return request


class Client:
    """One client: its protocol, its source address and its token (if any)."""

    def __init__(self, server: RunningServer, protocol: str, source: str = "127.0.0.1", token: str = "") -> None:
        self.server = server
        self.protocol = protocol
        self.source = source
        self.token = token
        self._http: httpx.AsyncClient | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Client:
        if self.protocol == "http":
            transport = httpx.AsyncHTTPTransport(
                local_address=self.source, limits=httpx.Limits(max_connections=FLOOD + 1)
            )
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._http = httpx.AsyncClient(transport=transport, timeout=120, headers=headers)
        else:
            assert self.source == "127.0.0.1", "the grpc client cannot choose its source address"
            self._channel = grpc.aio.insecure_channel(self.server.grpc_address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._channel is not None:
            await self._channel.close()

    async def infer(self) -> float:
        """One request; the time its answer came (``time.monotonic``)."""
        if self._http is not None:
            response = await self._http.post(f"{self.server.http_url}/v2/models/paced/infer", json=http_body())
            assert response.status_code == 200, response.text
            assert response.json()["outputs"][0]["data"] == [PRODUCTS]
        else:
            assert self._channel is not None
            call = self._channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
            answer: pb.ModelInferResponse = await call(grpc_request(), metadata=metadata, timeout=120)
            assert answer.model_name == "paced"
        return time.monotonic()


async def flood_and_one(server: RunningServer, flooder: Client, other: Client) -> tuple[int, float, float]:
    """``flooder`` sends FLOOD requests at once; once all are in the service, ``other`` sends one. Returns
    how many flood answers came after the other's, the other's wait, and the flood's length."""
    scheduler = server.service.registry.resolve("paced", None).scheduler
    async with flooder, other:
        assert await other.infer()  # connected and warm
        started = time.monotonic()
        flood = [asyncio.create_task(flooder.infer()) for _ in range(FLOOD)]
        await until(lambda: server.service.in_flight + sum(t.done() for t in flood) >= FLOOD, seconds=60)
        # in the service is not yet in the queue: the flood should be queued when the other client sends
        await until(lambda: scheduler.queued() > FLOOD // 2, seconds=20)
        sent = time.monotonic()
        answered = await other.infer()
        flood_answered = await asyncio.gather(*flood)
    after = sum(1 for t in flood_answered if t > answered)
    return after, answered - sent, max(flood_answered) - started


@pytest.mark.parametrize(
    ("entry", "flood_protocol", "other_protocol"),
    [(DIRECT, "grpc", "http"), (BATCHING, "grpc", "http"), (DIRECT, "http", "http")],
    ids=["grpc-flood", "grpc-flood-batching", "http-flood"],
)
def test_another_address_is_served_during_a_flood(
    serve: Callable[..., RunningServer], entry: dict[str, Any], flood_protocol: str, other_protocol: str
) -> None:
    server = serve(entry)
    if entry is BATCHING:
        assert isinstance(server.service.registry.resolve("paced", None).scheduler, DynamicBatcher)
    flooder = Client(server, flood_protocol, "127.0.0.1")
    other = Client(server, other_protocol, "127.0.0.2")
    after, waited, flood = asyncio.run(flood_and_one(server, flooder, other))
    assert after >= FLOOD // 2, f"only {after} of {FLOOD} flood answers came after the other client's"
    assert waited < flood / 2, f"the other client waited {waited:.2f} s of a {flood:.2f} s flood"


@pytest.mark.parametrize(("entry", "protocol"), [(DIRECT, "grpc"), (BATCHING, "http")], ids=["grpc", "http-batching"])
def test_another_token_from_the_same_address_is_served_during_a_flood(
    serve: Callable[..., RunningServer], entry: dict[str, Any], protocol: str
) -> None:
    """Both clients on one protocol from 127.0.0.1: only their tokens tell them apart."""
    server = serve(entry, tokens=True)
    flooder = Client(server, protocol, token=TOKEN_A)
    other = Client(server, protocol, token=TOKEN_B)
    after, waited, flood = asyncio.run(flood_and_one(server, flooder, other))
    assert after >= FLOOD // 2, f"only {after} of {FLOOD} flood answers came after the other token's"
    assert waited < flood / 2, f"the other token waited {waited:.2f} s of a {flood:.2f} s flood"


@pytest.mark.parametrize(
    ("tokens", "flooder", "other"),
    [
        (False, ("grpc", "127.0.0.1", ""), ("http", "127.0.0.1", "")),
        (True, ("http", "127.0.0.1", TOKEN_A), ("http", "127.0.0.2", TOKEN_A)),
    ],
    ids=["one-address", "one-token-two-addresses"],
)
def test_one_address_or_one_token_is_one_client(
    serve: Callable[..., RunningServer], tokens: bool, flooder: tuple[str, str, str], other: tuple[str, str, str]
) -> None:
    """Another connection from the flood's own address (no tokens), or the flood's token from another
    address, is the same client: its request queues behind the flood's (turns go to clients, not to
    connections or addresses of one token)."""
    server = serve(DIRECT, tokens=tokens)
    after, _, _ = asyncio.run(flood_and_one(server, Client(server, *flooder), Client(server, *other)))
    assert after <= 1, f"{after} flood answers came after a request of the same client"


def raw_request(server: RunningServer, source: str, products: float, forwarded_for: str = "") -> socket.socket:
    """A V2 request from ``source`` on a bare socket (its answer is read by the caller)."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [products]}]}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    host, port = server.http_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60, source_address=(source, 0))
    sock.sendall(raw_http.request_bytes("POST", "/v2/models/paced/infer", headers, body))
    return sock


@pytest.mark.parametrize(
    ("allowed", "source", "believed"),
    [("", "127.0.0.1", False), ("127.0.0.1", "127.0.0.1", True), ("127.0.0.1", "127.0.0.2", False)],
    ids=["default", "trusted-proxy", "untrusted-peer"],
)
def test_forwarded_for_counts_only_from_a_trusted_proxy(
    serve: Callable[..., RunningServer], allowed: str, source: str, believed: bool
) -> None:
    """A client sends 4 requests to a full queue (max_queue_size 4), each with another X-Forwarded-For;
    then a victim from its own address sends one. Believed, the 4 are 4 clients of one place each, and
    the victim is refused; not believed (the default, or a peer --forwarded-allow-ips does not name),
    they are one client, and the victim takes its newest place (an outside attack found the header
    believed from 127.0.0.1 by default)."""
    server = serve({"max_batch_size": 0, "dynamic_batching": {"max_queue_size": 4}}, forwarded_allow_ips=allowed)
    scheduler = server.service.registry.resolve("paced", None).scheduler
    held = [raw_request(server, "127.0.0.9", 1e9)]  # runs until its client leaves
    try:
        wait_until(lambda: server.service.in_flight == 1, what="the long run")
        held += [raw_request(server, source, 1.0, f"10.9.9.{i}") for i in range(4)]
        wait_until(lambda: scheduler.queued() == 4, what="a full queue")
        victim = raw_request(server, "127.0.0.3", 1.0)
        held.append(victim)
        refused = victim if believed else held[4]  # the victim, or the flood's newest request
        answer = raw_http.read_response(refused)
        assert answer.status == 503, answer
        assert b"max_queue_size 4" in answer.body, answer.body
    finally:
        for sock in held:
            sock.close()
