"""What every protocol front end knows about the request it is handling: its id.

The request id comes from the client (HTTP ``X-Request-ID``, gRPC ``x-request-id`` metadata) when it is
usable, else it is generated; it is returned to the client and set in a context variable for the
length of the request, so every log line made while handling it can carry it
(``onnxserve.server.logs``).
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar, Token

REQUEST_ID_METADATA = "x-request-id"
"""The request id's name: gRPC metadata key, and the HTTP header X-Request-ID (lower-case on the wire)."""
MAX_REQUEST_ID_LENGTH = 64

_USABLE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
"""A client's id is kept only when it cannot look like anything else in a log line: no spaces,
brackets or other punctuation (a spoofed "CRITICAL onnxserve.auth" record inside the id's line)."""

_request_id: ContextVar[str | None] = ContextVar("onnxserve_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(given: str | None) -> str:
    """The client's id if it is 1 to 64 characters of ``[A-Za-z0-9._:-]``, else a new one."""
    if given is not None and _USABLE_ID.fullmatch(given):
        return given
    return new_request_id()


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return _request_id.get()


def set_request_id(request_id: str) -> Token[str | None]:
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)
