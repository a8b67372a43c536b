"""What the HTTP protocols share: JSON responses, the guard that turns errors into them, and request ids."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from onnxserve.core.memory import release_frames
from onnxserve.errors import ErrorKind, OnnxServeError
from onnxserve.log_throttle import LogThrottle, log_unexpected
from onnxserve.protocols import context, inflight
from onnxserve.protocols.errors import HTTP_STATUS, RETRY_AFTER_SECONDS
from onnxserve.protocols.public_errors import public_message

if TYPE_CHECKING:
    from onnxserve.core.service import InferenceCall, InferenceService

log = logging.getLogger(__name__)

_NO_MEMORY = LogThrottle()
"""Requests answered 503 for want of memory: many large requests at once make one each."""

JSON = "application/json"
_REQUEST_ID_HEADER = context.REQUEST_ID_METADATA.encode("ascii")

Endpoint = Callable[[Request], Awaitable[Response]]

ErrorRenderer = Callable[[OnnxServeError | None, str, int], Response]
"""A protocol's error body: (the domain error, None for an unexpected one; its public message; the status)."""


def json_body(body: bytes, status: int = 200) -> Response:
    response = Response(body, status_code=status, media_type=JSON)
    if status >= 400:  # an error message may repeat what the client sent: never read as anything but JSON
        response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def error_response(message: str, status: int, retry_after: bool = False) -> Response:
    """``{"error": message}``, the error body of KServe V2 and TF Serving alike."""
    response = json_body(orjson.dumps({"error": message}), status)
    if retry_after:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def render_error(error: OnnxServeError | None, message: str, status: int) -> Response:
    """The ``ErrorRenderer`` of KServe V2 and TF Serving: ``{"error": message}``."""
    return error_response(message, status)


def requested_target(request: Request) -> tuple[str, str]:
    """The model name and version (number or label) a request's path names; "" where it names none."""
    return _target(request.path_params)


def _target(params: Mapping[str, Any]) -> tuple[str, str]:
    version = params.get("version", params.get("label"))
    return str(params.get("name", "")), "" if version is None else str(version)


@dataclass(frozen=True)
class EndpointRole:
    """What ``guarded`` made of an endpoint: its protocol's status table and error shape and, for an
    inference endpoint, the service that counts its requests."""

    statuses: Mapping[ErrorKind, int]
    render: ErrorRenderer
    protocol: str = ""
    service: InferenceService | None = None

    def answer(self, error: OnnxServeError) -> Response:
        """The protocol's answer to a domain error: its shape, its kind's status, Retry-After when busy."""
        response = self.render(error, public_message(error), self.statuses[error.kind])
        if error.kind is ErrorKind.RESOURCE_EXHAUSTED:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response


_ROLE = "onnxserve_role"


def refuse_before_routing(scope: Scope, error: OnnxServeError) -> Response:
    """The answer to a request refused before its endpoint ran (a body that is too large, of an unknown
    media type, or over the in-flight budget), in the error shape and status of the protocol whose
    endpoint the path names; counted by the service when that endpoint is an inference endpoint."""
    role: EndpointRole | None = None
    params: Mapping[str, Any] = {}
    for route in getattr(scope.get("app"), "routes", ()):
        match, child = route.matches(scope)
        if match is Match.FULL:
            role = getattr(getattr(route, "endpoint", None), _ROLE, None)
            params = child.get("path_params", {})
            break
    if role is None:
        role = EndpointRole(HTTP_STATUS, render_error)
    elif role.service is not None:
        role.service.refused(role.protocol, *_target(params), error)
    return role.answer(error)


CALL_SLOT = "onnxserve.call_slot"
"""The ASGI scope key of a request's ``CallSlot``, when the server that carries it gives it one."""


class CallSlot:
    """Where an inference endpoint leaves the ``InferenceCall`` of the request it handles, for the server
    that carries the request: ``server.connections`` puts one in each request's scope (an object, so that
    the copies of the scope that middleware make share it) and may withdraw the call while it only waits
    (``InferenceCall.withdraw``) to free its connection for another client."""

    __slots__ = ("call",)

    def __init__(self) -> None:
        self.call: InferenceCall | None = None


CLIENT_CLOSED_REQUEST = 499
"""The status of a request whose client went away before its answer (never sent: nobody reads it)."""


async def until_disconnected(handler: Endpoint, request: Request) -> Response:
    """Run ``handler``; if the client disconnects once the body has been read, cancel it.

    The handler reads the body through a watched ``receive``; after its last chunk, the connection is
    watched for ``http.disconnect`` by a task of its own while the handler goes on in the caller's task.
    A disconnect cancels the handler, so a queued inference leaves its queue and a running one is
    dropped (see ``core.batching``). The handler runs in the calling task, not one of its own: a task
    per request cost more than the tiny model's whole run.
    """
    task = asyncio.current_task()
    assert task is not None
    watcher: asyncio.Task[None] | None = None
    running = True  # the handler has not returned: a disconnect may still cancel it
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.01)  # a server that repeats empty body messages: keep watching, gently
        if running:
            gone = True
            task.cancel()

    async def watched_receive() -> Message:
        nonlocal watcher
        message = await request.receive()
        if watcher is None and (message["type"] != "http.request" or not message.get("more_body", False)):
            watcher = asyncio.ensure_future(disconnected())
        return message

    try:
        return await handler(Request(request.scope, watched_receive))
    except asyncio.CancelledError:
        if not gone or task.uncancel() > 0:  # cancelled from outside (too): not ours to answer
            raise
        log.debug("client went away during %s %s; its request was dropped", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        running = False
        if watcher is not None:
            watcher.cancel()


def guarded(
    handler: Endpoint,
    statuses: Mapping[ErrorKind, int] = HTTP_STATUS,
    *,
    protocol: str = "",
    service: InferenceService | None = None,
    render: ErrorRenderer = render_error,
) -> Endpoint:
    """Turn domain errors into error bodies with their kind's status; hide anything else behind a 500.

    With ``service`` the handler is an inference endpoint of ``protocol``: each request is an
    ``InferenceCall`` of the service, which counts it once however it ends, and a client that
    disconnects cancels it; its answer is held in the in-flight budget (``inflight.held``) at its
    encoded size until it has been sent, or refused like any answer that does not fit now.
    """

    role = EndpointRole(statuses, render, protocol, service)

    def failed(request: Request, error: OnnxServeError | None) -> Response:
        if error is None:
            log_unexpected(log, "http", "unexpected error while handling %s %s", request.method, request.url.path)
            return render(None, "internal server error", 500)
        return role.answer(error)

    async def endpoint(request: Request) -> Response:
        try:
            if service is None:  # /tokenize answers are large too, and its work stops when its client leaves
                return inflight.held(await until_disconnected(handler, request), _body_size)
            slot = request.scope.get(CALL_SLOT)
            async with service.call(protocol, *requested_target(request), client=context.current_client()) as call:
                if slot is not None:
                    slot.call = call
                try:
                    return inflight.held(await until_disconnected(handler, request), _body_size)
                finally:
                    if slot is not None:
                        slot.call = None
        # Once answered, the request's body and tensors go at once, not when the garbage collector runs.
        except OnnxServeError as e:
            answer = failed(request, e)
            release_frames(e)
        except MemoryError as e:  # short of memory now (a large body under a tight limit): the client may retry
            if count := _NO_MEMORY.due():
                log.warning(
                    "no memory for %s %s: answered 503%s", request.method, request.url.path, _NO_MEMORY.note(count)
                )
            answer = failed(request, inflight.no_memory("for this request"))
            release_frames(e)
        except Exception as e:
            answer = failed(request, None)
            release_frames(e)
        return answer

    setattr(endpoint, _ROLE, role)
    return endpoint


async def body_bytes(request: Request) -> bytes:
    """The request's body, the bytes object the body middleware read (``request_body``) and not a copy.

    starlette's ``Request.body()`` joins the body's chunks, and its stream ends every body with an
    empty chunk, so it copied every body once more: a 60 MB body held twice for as long as its request.
    """
    chunks = [chunk async for chunk in request.stream() if chunk]
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _body_size(response: Response) -> int:
    body = getattr(response, "body", b"")  # a streamed answer holds its parts itself
    return len(body) if isinstance(body, bytes | memoryview) else 0


class RequestIdMiddleware:
    """ASGI middleware: every HTTP request gets an id, answered in ``X-Request-ID`` and put on its log lines,
    and the context knows its peer (``context.current_client``).

    The client's ``X-Request-ID`` is kept when it is 1 to 64 characters of ``[A-Za-z0-9._:-]``; otherwise
    (or when absent) a new one is generated. Each request is also logged at DEBUG level.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == _REQUEST_ID_HEADER), None)
        request_id = context.accept_request_id(None if given is None else given.decode("latin-1"))
        header = (_REQUEST_ID_HEADER, request_id.encode("ascii"))
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = context.set_request_id(request_id)
        peer = scope.get("client")
        peer_token = context.set_peer_host(peer[0] if peer else None)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log_unexpected(log, "http", "unexpected error while handling %s %s", scope.get("method"), scope.get("path"))
            if status:
                raise
            await error_response("internal server error", 500)(scope, receive, send_with_id)
        finally:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s %s %d %.2f ms",
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    (time.perf_counter() - started) * 1000,
                )
            context.reset_request_id(token)
            context.reset_peer_host(peer_token)
