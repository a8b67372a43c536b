"""The ASGI application: every HTTP protocol's routes on one Starlette app, plus ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxserve.core.client_text import clipped
from onnxserve.core.service import InferenceService
from onnxserve.protocols.http import ErrorRenderer, RequestIdMiddleware, error_response, render_error
from onnxserve.protocols.inflight import InflightBytes
from onnxserve.protocols.openai import codec as openai_codec
from onnxserve.protocols.openai import routes as openai
from onnxserve.protocols.request_body import DEFAULT_MAX_BYTES, RequestBodyLimits
from onnxserve.protocols.tei import codec as tei_codec
from onnxserve.protocols.tei import routes as tei
from onnxserve.protocols.tfserving_rest import routes as tfserving_rest
from onnxserve.protocols.v2_rest import routes as v2_rest
from onnxserve.server.auth import BearerAuthMiddleware
from onnxserve.server.browser_guard import BrowserGuard
from onnxserve.server.metrics import Metrics
from onnxserve.server.tokens import TokenTable
from onnxserve.server.web import routes as web_routes
from onnxserve.server.web.documents import MEMORY as WEB_DOCUMENT_MEMORY

SHOWN_PATH_CHARACTERS = 200
"""How much of an unknown request path an error message repeats."""


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = clipped(request.url.path, SHOWN_PATH_CHARACTERS)
    if exc.status_code == 404:
        message = f"no such endpoint: {clipped(request.method)} {path}"
    elif exc.status_code == 405:
        message = f"method {clipped(request.method)} is not allowed on {path}"
    else:
        message = exc.detail
    return error_response(message, exc.status_code)


def error_renderer(path: str) -> ErrorRenderer:
    """The error shape of the protocol that owns ``path`` (for refusals made before routing)."""
    if path in openai.PATHS:
        return openai_codec.render_error
    if path in tei.PATHS:
        return tei_codec.render_error
    return render_error


def metrics_route(metrics: Metrics) -> Route:
    async def scrape(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    return Route("/metrics", scrape, methods=["GET"])


def create_app(
    service: InferenceService,
    metrics: Metrics | None = None,
    tokens: TokenTable | None = None,
    max_request_bytes: int = DEFAULT_MAX_BYTES,
    budget: InflightBytes | None = None,
    web_document_memory: int = WEB_DOCUMENT_MEMORY,
    hosts: Callable[[str], bool] | None = None,
) -> Starlette:
    """Every HTTP endpoint; with ``metrics``, also ``/metrics`` (the service counts the requests).

    With ``tokens`` every endpoint but the health probes needs a bearer token (``onnxserve.server.auth``).
    Every POST body is checked by ``RequestBodyLimits`` (at most ``max_request_bytes``, decompressed;
    held within ``budget``, the request bytes in flight shared with gRPC, when one is given). The web
    page computes its documents within ``web_document_memory`` (``onnxserve.server.web.documents``).
    """
    routes = [
        *v2_rest.routes(service),
        *openai.routes(service),  # before TF Serving: GET /v1/models/{name} answers for both
        *tfserving_rest.routes(service),
        *tei.routes(service),
    ]
    if metrics is not None:
        routes.append(metrics_route(metrics))
    routes += web_routes(service, web_document_memory)  # the web page at / (onnxserve.server.web)
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error},
        middleware=[
            Middleware(RequestIdMiddleware),  # outermost: refusals carry X-Request-ID too
            Middleware(BrowserGuard, hosts=hosts, render=error_renderer),  # DNS rebinding, cross-site requests
            *([Middleware(BearerAuthMiddleware, tokens=tokens, render=error_renderer)] if tokens is not None else []),
            Middleware(RequestBodyLimits, max_bytes=max_request_bytes, budget=budget),  # size, encoding, media type
        ],
    )
    # No redirect from "/path/" to "/path": its Location would repeat the client's Host header (an open
    # redirect for whoever can set it); a trailing slash is simply an unknown endpoint, as in Triton.
    app.router.redirect_slashes = False
    return app
