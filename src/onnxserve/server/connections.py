"""Connection limits and timeouts on both ports: what uvicorn and grpc do not do on their own.

HTTP (uvicorn's httptools protocol, extended by :func:`guarded_http_protocol`):

- **Request head**: a connection has ``header_timeout`` seconds from being opened (or from the first
  byte of its next request) to finish sending a request line and headers. A slow or silent client is
  answered 408 (silent ones are just closed).
- **Request body**: once the head is in, the whole body must arrive within ``body_timeout`` seconds;
  otherwise 408 and the connection closes (whatever the endpoint held is released).
- **Idle keep-alive**: uvicorn's own ``timeout_keep_alive`` (``keep_alive_timeout``).
- **Open connections**: at most ``max_connections`` per port. When a new one would exceed it, the
  oldest connection that is not in the middle of a request (idle keep-alive, or still sending its
  head) is closed to make room; when every connection is busy, the new one is closed. A health probe
  or metrics scrape therefore always gets a connection, however many idle ones an attacker opens.

gRPC (grpc.aio channel options from :func:`grpc_options`, plus :class:`MessageReception`):

- ``max_connections`` connections (``grpc.max_allowed_incoming_connections``), ``header_timeout``
  seconds for the HTTP/2 handshake, at most ``grpc_max_concurrent_streams`` streams per connection,
  connections idle (no call open) for ``grpc_max_connection_idle`` closed, optional maximum age with
  a grace period, and keepalive pings from clients no more often than every 10 s (enforced with
  GOAWAY by grpc).
- A unary call's request message must arrive within ``body_timeout`` seconds (DEADLINE_EXCEEDED),
  and is received only once the in-flight byte budget holds room for the largest message
  (RESOURCE_EXHAUSTED after a short wait); see :class:`MessageReception`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from onnxserve.protocols import context
from onnxserve.protocols.inflight import InflightBytes, over_budget
from onnxserve.protocols.v2_grpc.servicer import SERVICE_NAME
from onnxserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

RESERVED_FILE_DESCRIPTORS = 256
"""File descriptors kept out of the connection caps: models, logs, the repository, gRPC internals."""

BUDGET_WAIT_SECONDS = 1.0
"""How long a gRPC call waits for room in the in-flight budget before RESOURCE_EXHAUSTED."""

MIN_CLIENT_PING_INTERVAL_MS = 10_000

UNREAD_METHODS = frozenset(f"/{SERVICE_NAME}/{name}" for name in ("ServerLive", "ServerReady", "ServerMetadata"))
"""Methods whose request message is empty: answered without receiving it, so probes never wait on the budget."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The HTTP connection limits (see the module docstring)."""

    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(settings.header_timeout, settings.body_timeout, connection_cap(settings.max_connections))


def raise_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(wanted: int) -> int:
    """``wanted`` connections per port, lowered so both ports together stay under the open-file limit."""
    room = max(16, (raise_file_limit() - RESERVED_FILE_DESCRIPTORS) // 2)
    if wanted > room:
        log.warning("--max-connections %d is more than the open-file limit allows; using %d per port", wanted, room)
        return room
    return wanted


def _timeout_response(message: str) -> bytes:
    body = orjson.dumps({"error": message})
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body deadlines and a connection cap (module docstring)."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened_at = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_started = False

    # -- the connection cap --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def _busy(self) -> bool:
        """In the middle of a request: its head is in and its answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _make_room(self) -> None:
        idle = [
            c
            for c in self.connections
            if isinstance(c, GuardedHttpProtocol) and c is not self and not c._busy() and not c.transport.is_closing()
        ]
        if not idle:
            log.warning(
                "refused a connection: all %d open ones are busy (--max-connections)", len(self.connections) - 1
            )
            self.transport.close()
            return
        oldest = min(idle, key=lambda c: c.opened_at)
        log.debug("closed the oldest idle connection to make room (--max-connections %d)", self.limits.max_connections)
        oldest.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    # -- the request head ----------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes that start no request (stray CRLFs) must not stop the clock: uvicorn has just
        # cancelled its keep-alive timer, and no other one may be running.
        if (
            self._head_timer is None
            and self._body_timer is None
            and self.timeout_keep_alive_task is None
            and not self._busy()
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_started = False
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._busy():
            return
        if self._head_started:
            self.transport.write(
                _timeout_response(
                    f"the request head did not arrive within {self.limits.header_timeout:g} s (--header-timeout)"
                )
            )
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.response_started = True  # nothing else may answer on this connection now
            self.transport.write(
                _timeout_response(
                    f"the request body did not arrive within {self.limits.body_timeout:g} s (--body-timeout)"
                )
            )
        log.info("closed a connection whose request body did not arrive within %g s", self.limits.body_timeout)
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


def guarded_http_protocol(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """The uvicorn ``http=`` protocol class that enforces ``limits``."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})


# -- gRPC ------------------------------------------------------------------------------------------------


GRPC_SEND_HEADROOM = 1024 * 1024
"""Bytes a gRPC response may take beyond ``--grpc-max-message-bytes``: the protobuf envelope (names,
shapes, length prefixes) of output tensors that take up to the limit themselves."""


def grpc_send_limit(settings: ServerSettings) -> int:
    """The largest message the gRPC server sends: tensors up to ``--grpc-max-message-bytes``, and their envelope."""
    return settings.grpc_max_message_bytes + GRPC_SEND_HEADROOM


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """grpc.aio server options for the limits grpc enforces itself (see the module docstring)."""
    options = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", grpc_send_limit(settings)),
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", connection_cap(settings.max_connections)),
        ("grpc.server_handshake_timeout_ms", max(1, int(settings.header_timeout * 1000))),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
        # No bandwidth-delay probing: it grows every stream's window to megabytes, so a call that is
        # never read (a refused one) could still make grpc accept that much. Without it a stream holds
        # one initial window until its message is asked for; grpc then opens the window to the message.
        ("grpc.http2.bdp_probe", 0),
    ]
    if settings.grpc_max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle * 1000)))
    if settings.grpc_max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(settings.grpc_max_connection_age_grace * 1000)))
    return options


Behaviour = Callable[..., Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class MessageReception(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Receive each unary call's request message ourselves: within a deadline, inside the byte budget.

    grpc receives a unary request's whole message before it calls the handler, and nothing bounds how
    long that takes or how many such messages it holds. This interceptor hands grpc a
    *streaming-request* handler instead, which reserves ``max_message_bytes`` of the in-flight budget
    (waiting up to ``BUDGET_WAIT_SECONDS``, else RESOURCE_EXHAUSTED), then reads the one message within
    ``timeout`` seconds (else DEADLINE_EXCEEDED, and the stream is reset), keeps only the size that
    arrived reserved, and calls the original handler with it. ``UNREAD_METHODS`` (the server probes)
    are answered without receiving their (empty) message. Streaming-request methods pass through.
    """

    def __init__(self, budget: InflightBytes, max_message_bytes: int, timeout: float) -> None:
        self.budget = budget
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        deserialize: Callable[[bytes], Any] | None = handler.request_deserializer
        if handler_call_details.method in UNREAD_METHODS and not handler.response_streaming:
            empty_behaviour: Behaviour = handler.unary_unary

            async def answer_unread(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
                return await empty_behaviour(deserialize(b"") if deserialize is not None else b"", ctx)

            return grpc.stream_unary_rpc_method_handler(
                answer_unread, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )

        def sized(raw: bytes) -> tuple[int, Any]:
            return len(raw), deserialize(raw) if deserialize is not None else raw

        if handler.response_streaming:
            stream_behaviour: Behaviour = handler.unary_stream

            async def receive_then_stream(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
                held, request = await self._receive(ctx)
                try:
                    async for response in stream_behaviour(request, ctx):
                        yield response
                finally:
                    self.budget.release(held)

            return grpc.stream_stream_rpc_method_handler(
                receive_then_stream, request_deserializer=sized, response_serializer=handler.response_serializer
            )
        unary_behaviour: Behaviour = handler.unary_unary

        async def receive_then_answer(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
            held, request = await self._receive(ctx)
            try:
                return await unary_behaviour(request, ctx)
            finally:
                self.budget.release(held)

        return grpc.stream_unary_rpc_method_handler(
            receive_then_answer, request_deserializer=sized, response_serializer=handler.response_serializer
        )

    async def _receive(self, ctx: grpc.aio.ServicerContext) -> tuple[int, Any]:
        """The call's one request message and the bytes it keeps reserved; aborts the call otherwise."""
        given = (v for k, v in ctx.invocation_metadata() or () if k == context.REQUEST_ID_METADATA)
        metadata = ((context.REQUEST_ID_METADATA, context.accept_request_id(next(given, None))),)
        reserved = min(self.max_message_bytes, self.budget.limit) if self.budget.limit else self.max_message_bytes
        if not await self.budget.reserve_within(reserved, BUDGET_WAIT_SECONDS):
            await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, over_budget(self.budget.limit).message, metadata)
        try:
            received = await asyncio.wait_for(ctx.read(), self.timeout)
        except TimeoutError:
            self.budget.release(reserved)
            log.info("reset a gRPC call whose request message did not arrive within %g s", self.timeout)
            await ctx.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {self.timeout:g} s (--body-timeout)",
                metadata,
            )
        except BaseException:
            self.budget.release(reserved)
            raise
        if received is grpc.aio.EOF:
            self.budget.release(reserved)
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message", metadata)
        size, request = received
        kept = min(size, reserved)
        self.budget.release(reserved - kept)
        return kept, request
