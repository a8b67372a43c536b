"""Who may call what: the scope each endpoint needs, and the HTTP middleware and gRPC interceptor that check it.

With bearer tokens configured, every endpoint needs a token carrying its scope except the two
server probes, which stay open so that Kubernetes (and load balancers) can probe without a secret:

=====================================================  ============================================
HTTP                                                   scope
=====================================================  ============================================
``GET /v2/health/live``, ``GET /v2/health/ready``      open
``/v2/repository/...`` (index, load, unload)           ``control``
``GET /metrics``                                       ``metrics``
everything else (V2, TF Serving, OpenAI-compatible     ``infer``
``/v1/embeddings`` and ``/v1/models``, TEI-compatible
``/embed``, ``/rerank``, ``/predict``, ``/tokenize``,
``/info``: inference, metadata, model readiness,
config, statistics, and any path that does not exist)
=====================================================  ============================================

gRPC follows the same rule: ServerLive and ServerReady are open; RepositoryIndex,
RepositoryModelLoad and RepositoryModelUnload need ``control``; every other method (including
unknown ones) needs ``infer``.

The token travels as ``Authorization: Bearer TOKEN`` (HTTP header, or gRPC metadata
``authorization``). A request without one, or with one the server does not know, is refused with 401
(``WWW-Authenticate: Bearer``) / UNAUTHENTICATED; a known token without the scope with 403 /
PERMISSION_DENIED. Refusals happen before the request body is read or the request is routed (over
gRPC: before the request message is received, see ``_refusal``), and their bodies are each
protocol's usual error (``{"error": ...}``, OpenAI's ``{"error": {"message", ...}}``, a gRPC status
message): the middleware asks ``render(path)`` for the path's error shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from onnxserve.core.client_text import logged
from onnxserve.errors import OnnxServeError, PermissionDeniedError, UnauthenticatedError
from onnxserve.log_throttle import LogThrottle
from onnxserve.protocols import context
from onnxserve.protocols.errors import GRPC_STATUS, HTTP_STATUS
from onnxserve.protocols.http import ErrorRenderer, render_error
from onnxserve.protocols.request_body import announces_body
from onnxserve.protocols.v2_grpc.servicer import SERVICE_NAME
from onnxserve.server.tokens import Scope as TokenScope
from onnxserve.server.tokens import TokenTable

log = logging.getLogger(__name__)

OPEN_HTTP_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
CONTROL_HTTP_PREFIX = "/v2/repository/"
METRICS_HTTP_PATH = "/metrics"
OPEN_GRPC_METHODS = frozenset({"ServerLive", "ServerReady"})
CONTROL_GRPC_METHODS = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})

AUTHORIZATION = "authorization"
REALM = 'Bearer realm="onnxserve"'

_ACTIONS = {
    TokenScope.INFER: "call inference and metadata endpoints",
    TokenScope.CONTROL: "use the model repository (index, load, unload)",
    TokenScope.METRICS: "read the metrics",
}


def http_scope(path: str) -> TokenScope | None:
    """The scope an HTTP request for ``path`` needs; None: open to everyone."""
    if path in OPEN_HTTP_PATHS:
        return None
    if path == METRICS_HTTP_PATH:
        return TokenScope.METRICS
    if path.startswith(CONTROL_HTTP_PREFIX) or path == CONTROL_HTTP_PREFIX.rstrip("/"):
        return TokenScope.CONTROL
    return TokenScope.INFER


def grpc_scope(method: str) -> TokenScope | None:
    """The scope a gRPC call of ``method`` (``/package.Service/Method``) needs; None: open to everyone."""
    service, _, name = method.removeprefix("/").partition("/")
    if service == SERVICE_NAME and name in OPEN_GRPC_METHODS:
        return None
    if service == SERVICE_NAME and name in CONTROL_GRPC_METHODS:
        return TokenScope.CONTROL
    return TokenScope.INFER


def authorize(tokens: TokenTable, credentials: Sequence[str], needed: TokenScope) -> str:
    """Raise UnauthenticatedError or PermissionDeniedError unless ``credentials`` (the request's
    Authorization values) hold one bearer token with the ``needed`` scope; the token's client identity
    (``token N``, N its entry in the table) when they do."""
    if not credentials:
        raise UnauthenticatedError("this endpoint needs a bearer token: send 'authorization: Bearer TOKEN'")
    if len(credentials) > 1:
        raise UnauthenticatedError("send one authorization header, not several")
    scheme, _, token = credentials[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise UnauthenticatedError("only bearer tokens are accepted: send 'authorization: Bearer TOKEN'")
    found = tokens.lookup(token.strip())
    if found is None:
        raise UnauthenticatedError("the bearer token is not accepted")
    position, scopes = found
    if needed not in scopes:
        raise PermissionDeniedError(f"this token may not {_ACTIONS[needed]}: that needs the scope '{needed.value}'")
    return f"token {position + 1}"


def _challenge(error: OnnxServeError, presented: bool, needed: TokenScope) -> str:
    """The WWW-Authenticate value of a refusal (RFC 6750 section 3)."""
    if isinstance(error, PermissionDeniedError):
        return f'{REALM}, error="insufficient_scope", scope="{needed.value}"'
    return f'{REALM}, error="invalid_token"' if presented else REALM


class BearerAuthMiddleware:
    """ASGI middleware: refuse HTTP requests whose token lacks the scope their path needs (see the module)."""

    def __init__(
        self, app: ASGIApp, tokens: TokenTable, render: Callable[[str], ErrorRenderer] = lambda path: render_error
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.render = render
        self.refusals = LogThrottle()  # a refused client may ask again at once, thousands of times a second

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        needed = http_scope(scope["path"]) if scope["type"] == "http" else None
        if needed is None:
            await self.app(scope, receive, send)
            return
        credentials = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
        try:
            client = authorize(self.tokens, credentials, needed)
        except (UnauthenticatedError, PermissionDeniedError) as e:
            if refused := self.refusals.due():
                log.info(
                    "refused %d request(s) for their token (last: %s %s: %s; reported every %g s at most)",
                    refused,
                    scope.get("method"),
                    logged(scope["path"]),
                    e.message,
                    self.refusals.every,
                )
            response = self.render(scope["path"])(e, e.message, HTTP_STATUS[e.kind])
            response.headers["WWW-Authenticate"] = _challenge(e, bool(credentials), needed)
            if announces_body(scope["headers"]):
                # its body is not read: the connection closes after the refusal, rather than reading the body on
                # to reuse it (30 TLS connections streaming bodies after their 401 held probes 5-8 s: rt19)
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        token = context.set_authenticated_client(client)
        try:
            await self.app(scope, receive, send)
        finally:
            context.reset_authenticated_client(token)


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """gRPC server interceptor: refuse calls whose token lacks the scope their method needs (see the module)."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens
        self.refusals = LogThrottle()  # 105,548 refused calls wrote 22.7 MB of log in 15 s (outside attack rt21)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        needed = grpc_scope(method)
        if needed is None:
            return handler
        metadata: Sequence[tuple[str, str | bytes]] = handler_call_details.invocation_metadata or ()
        credentials = [v for k, v in metadata if k == AUTHORIZATION and isinstance(v, str)]
        try:
            client = authorize(self.tokens, credentials, needed)
        except (UnauthenticatedError, PermissionDeniedError) as e:
            given_id = next((v for k, v in metadata if k == context.REQUEST_ID_METADATA and isinstance(v, str)), None)
            request_id = context.accept_request_id(given_id)
            if refused := self.refusals.due():
                log.info(
                    "refused %d gRPC call(s) for their token (last: %s: %s; reported every %g s at most)",
                    refused,
                    logged(method),
                    e.message,
                    self.refusals.every,
                    extra={"request_id": request_id},
                )
            return _refusal(handler, GRPC_STATUS[e.kind], e.message, request_id)
        # grpc runs the call's handler in this task, after this returns: it sees the client.
        context.set_authenticated_client(client)
        return handler


def _refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str, request_id: str
) -> grpc.RpcMethodHandler:
    """A handler that ends the call with ``code`` without reading a byte of its request.

    It is always a *streaming-request* handler, whatever ``handler`` is: for a unary request grpc
    would first receive the whole message (up to the message size limit) and only then call us, so
    an anonymous client could make the server buffer it. A streaming handler that never iterates its
    requests lets the call end (trailers, then RST_STREAM) with at most one flow-control window read.
    The response side keeps ``handler``'s kind, so the client's stub sees an ordinary status.
    """

    async def refuse(requests: Any, grpc_context: grpc.aio.ServicerContext) -> None:
        await grpc_context.abort(code, message, ((context.REQUEST_ID_METADATA, request_id),))

    if handler is not None and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)
