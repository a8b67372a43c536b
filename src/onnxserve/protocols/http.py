"""What the HTTP protocols share: JSON responses and the guard that turns errors into them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from onnxserve.errors import OnnxServeError
from onnxserve.protocols.errors import HTTP_STATUS

log = logging.getLogger(__name__)

JSON = "application/json"

Endpoint = Callable[[Request], Awaitable[Response]]


def json_body(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type=JSON)


def error_response(message: str, status: int) -> Response:
    """``{"error": message}``, the error body of KServe V2 and TF Serving alike."""
    return json_body(orjson.dumps({"error": message}), status)


def guarded(handler: Endpoint) -> Endpoint:
    """Turn domain errors into error bodies with their kind's status; hide anything else behind a 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except OnnxServeError as e:
            return error_response(e.message, HTTP_STATUS[e.kind])
        except Exception:
            log.exception("unexpected error while handling %s %s", request.method, request.url.path)
            return error_response("internal server error", 500)

    return endpoint
