"""The gRPC listener (KServe V2 gRPC) on the same event loop as the HTTP server."""

from __future__ import annotations

import grpc

from onnxserve.config import ServerSettings
from onnxserve.core.service import InferenceService
from onnxserve.errors import ConfigError
from onnxserve.protocols.context import RequestHook
from onnxserve.protocols.v2_grpc.servicer import generic_handler
from onnxserve.server.auth import BearerAuthInterceptor
from onnxserve.server.exposure import Exposure


def create_grpc_server(
    service: InferenceService,
    settings: ServerSettings,
    record_unreached: RequestHook | None = None,
    exposure: Exposure | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started-to-be gRPC server bound to ``settings.host:grpc_port``, and the port it got.

    ``record_unreached`` hears of inference requests that failed before reaching a model (metrics).
    ``exposure`` adds bearer-token checks and TLS (default: open, plain text).
    """
    if exposure is None:
        exposure = Exposure()
    limit = settings.grpc_max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
        interceptors=[BearerAuthInterceptor(exposure.tokens)] if exposure.tokens is not None else None,
    )
    server.add_generic_rpc_handlers((generic_handler(service, record_unreached),))
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
