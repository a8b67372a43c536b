"""``MessageReception``: the gRPC service's handlers, wrapped to receive their messages themselves.

It is the server's generic handler (no interceptor runs per call); the network behaviour (deadline,
budget, refusals) is tested end to end in ``tests/integration/test_v2_grpc.py`` and the adversarial tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from onnxserve.protocols.inflight import InflightBytes
from onnxserve.server.connections import MessageReception

SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Details:
    """What grpc hands a generic handler for a call: the method called and the call's metadata."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


async def answer(request: Any, context: Any) -> bytes:
    return b""


def reception() -> MessageReception:
    handlers = {name: grpc.unary_unary_rpc_method_handler(answer) for name in ("ModelInfer", "ServerLive")}
    service = grpc.method_handlers_generic_handler(SERVICE, handlers)
    return MessageReception(service, InflightBytes(1 << 20), 1 << 16, 5.0)


def test_each_method_is_wrapped_once_as_a_streaming_request_handler() -> None:
    r = reception()
    infer = r.service(Details(f"/{SERVICE}/ModelInfer"))
    # grpc receives a unary request's message before calling its handler: the wrapper receives it itself
    assert infer is not None
    assert infer.request_streaming
    assert not infer.response_streaming
    assert r.service(Details(f"/{SERVICE}/ModelInfer")) is infer
    live = r.service(Details(f"/{SERVICE}/ServerLive"))
    assert live is not None
    assert live is not infer
    assert live.request_streaming


def test_unknown_methods_are_answered_none_and_not_kept() -> None:
    r = reception()
    for i in range(1000):
        assert r.service(Details(f"/{SERVICE}/NoSuchRpc{i}")) is None
    assert r.service(Details(f"/{SERVICE}/ModelInfer")) is not None
    assert len(r._wrapped) == 1
