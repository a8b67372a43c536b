"""What the HTTP protocols share: JSON responses and the guard that turns errors into them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import orjson
from starlette.requests import Request
from starlette.responses import Response

from onnxserve.errors import ErrorKind, OnnxServeError
from onnxserve.protocols.errors import HTTP_STATUS, RETRY_AFTER_SECONDS

log = logging.getLogger(__name__)

JSON = "application/json"

Endpoint = Callable[[Request], Awaitable[Response]]


def json_body(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type=JSON)


def error_response(message: str, status: int, retry_after: bool = False) -> Response:
    """``{"error": message}``, the error body of KServe V2 and TF Serving alike."""
    response = json_body(orjson.dumps({"error": message}), status)
    if retry_after:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def guarded(handler: Endpoint, statuses: Mapping[ErrorKind, int] = HTTP_STATUS) -> Endpoint:
    """Turn domain errors into error bodies with their kind's status; hide anything else behind a 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except OnnxServeError as e:
            return error_response(e.message, statuses[e.kind], e.kind is ErrorKind.RESOURCE_EXHAUSTED)
        except Exception:
            log.exception("unexpected error while handling %s %s", request.method, request.url.path)
            return error_response("internal server error", 500)

    return endpoint
