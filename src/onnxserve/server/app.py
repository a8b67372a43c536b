"""The ASGI application: every HTTP protocol's routes on one Starlette app."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from onnxserve.core.service import InferenceService
from onnxserve.protocols.http import error_response
from onnxserve.protocols.tfserving_rest import routes as tfserving_rest
from onnxserve.protocols.v2_rest import routes as v2_rest


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail
    return error_response(message, exc.status_code)


def create_app(service: InferenceService) -> Starlette:
    routes = [*v2_rest.routes(service), *tfserving_rest.routes(service)]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
