"""The gRPC listener (KServe V2 gRPC) on the same event loop as the HTTP server."""

from __future__ import annotations

import grpc

from onnxserve.core.service import InferenceService
from onnxserve.errors import ConfigError
from onnxserve.protocols.inflight import InflightBytes
from onnxserve.protocols.v2_grpc.servicer import generic_handler
from onnxserve.server.auth import BearerAuthInterceptor
from onnxserve.server.connections import MessageReception, grpc_options, grpc_send_limit
from onnxserve.server.exposure import Exposure
from onnxserve.server.settings import ServerSettings


def create_grpc_server(
    service: InferenceService,
    settings: ServerSettings,
    exposure: Exposure | None = None,
    budget: InflightBytes | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started-to-be gRPC server bound to ``settings.host:grpc_port``, and the port it got.

    ``exposure`` adds bearer-token checks and TLS (default: open, plain text). ``budget``: the request
    bytes in flight, shared with HTTP (default: one of ``settings.max_inflight_bytes`` for gRPC alone).
    Connection limits and message reception: ``onnxserve.server.connections``.
    """
    if exposure is None:
        exposure = Exposure()
    if budget is None:
        budget = InflightBytes(settings.max_inflight_bytes, settings.grpc_max_message_bytes)
    # The auth check (an interceptor) comes before the handlers' message reception, so a refused call is
    # never received (see onnxserve.server.auth).
    interceptors: list[grpc.aio.ServerInterceptor] = (
        [BearerAuthInterceptor(exposure.tokens)] if exposure.tokens is not None else []
    )
    server = grpc.aio.server(options=grpc_options(settings), interceptors=interceptors)
    handler = generic_handler(service, grpc_send_limit(settings))
    server.add_generic_rpc_handlers(
        (
            MessageReception(
                handler, budget, settings.grpc_max_message_bytes, settings.body_timeout, settings.grpc_message_wait
            ),
        )
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        address = f"{host}:{settings.grpc_port}"
        tls = exposure.tls
        port: int = (
            server.add_insecure_port(address)
            if tls is None
            else server.add_secure_port(address, tls.grpc_credentials())
        )
    except RuntimeError as e:
        raise ConfigError(f"cannot listen for gRPC on {host}:{settings.grpc_port}: {e}") from None
    if port == 0:
        raise ConfigError(f"cannot listen for gRPC on {host}:{settings.grpc_port}")
    return server, port
