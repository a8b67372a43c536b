"""The gRPC listener (KServe V2 gRPC) on the same event loop as the HTTP server.

grpc-core serves the calls on a private Unix socket; the port itself is :mod:`onnxserve.server.grpc_front`'s,
which checks each connection's header blocks (and ends TLS) before grpc-core sees them.
"""

from __future__ import annotations

import asyncio
import socket

import grpc

from onnxserve.core.service import InferenceService
from onnxserve.errors import ConfigError
from onnxserve.protocols.inflight import InflightBytes
from onnxserve.protocols.v2_grpc.servicer import generic_handler
from onnxserve.server.auth import BearerAuthInterceptor
from onnxserve.server.connections import MessageReception, grpc_connection_cap, grpc_options, grpc_send_limit
from onnxserve.server.core_queue import CoreQueue
from onnxserve.server.exposure import Exposure
from onnxserve.server.grpc_front import GrpcFront
from onnxserve.server.listen import bind
from onnxserve.server.settings import ServerSettings

CUT_AFTER_GRACE_SECONDS = 1.0
"""How long after the stop's grace the front closes the connections grpc-core has not closed itself."""


class GrpcPort:
    """The gRPC port: grpc-core's server and the front that listens for it."""

    def __init__(self, server: grpc.aio.Server, front: GrpcFront, sock: socket.socket) -> None:
        self.server = server
        self.front = front
        self._socket = sock
        self.port = int(sock.getsockname()[1])

    async def start(self) -> None:
        await self.server.start()
        await self.front.start(self._socket)

    async def stop(self, grace: float) -> None:
        """Stop taking connections, let grpc-core end its calls within ``grace`` seconds, then close the rest.

        The front's connections are closed at the grace's end (and a second later than grpc-core's own
        cut): grpc-core's stop waits for what it writes to each connection, and a client that reads
        nothing kept it, and the process, waiting for as long as it kept its connection (outside attack
        rt39: SIGTERM never ended the process)."""
        self.front.stop_listening()
        cut = asyncio.get_running_loop().call_later(grace + CUT_AFTER_GRACE_SECONDS, self.front.close_connections)
        try:
            await self.server.stop(grace)
        finally:
            cut.cancel()
            self.front.close_connections()


def create_grpc_server(
    service: InferenceService,
    settings: ServerSettings,
    exposure: Exposure | None = None,
    budget: InflightBytes | None = None,
) -> GrpcPort:
    """The gRPC port bound to ``settings.host:grpc_port``, to be started.

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
    sock = bind(settings.host, settings.grpc_port, "gRPC")
    cap = grpc_connection_cap(settings)
    queue = CoreQueue(settings.grpc_max_queued_calls) if settings.grpc_max_queued_calls else None
    front = GrpcFront(
        cap,
        None if exposure.tls is None else exposure.tls.grpc_context,
        settings.header_timeout,
        settings.grpc_max_concurrent_streams,
        settings.body_timeout,
        settings.grpc_max_abandoned_calls,
        settings.grpc_max_address_calls,
        queue,
    )
    # grpc-core's own cap is a backstop above the front's: a connection the front closes to make room for a
    # new one may not be gone from grpc-core yet when the new one arrives there
    server = grpc.aio.server(options=grpc_options(settings, 2 * cap), interceptors=interceptors)
    handler = generic_handler(service, grpc_send_limit(settings))
    server.add_generic_rpc_handlers(
        (
            MessageReception(
                handler,
                budget,
                settings.grpc_max_message_bytes,
                settings.body_timeout,
                settings.grpc_message_wait,
                queue,
            ),
        )
    )
    try:
        port = server.add_insecure_port(front.backend_address)
    except RuntimeError as e:
        port = 0
        reason = str(e)
    else:
        reason = "grpc could not bind it"
    if port == 0:
        sock.close()
        front.close_connections()
        raise ConfigError(f"cannot start gRPC on its private socket {front.socket_path}: {reason}")
    return GrpcPort(server, front, sock)
