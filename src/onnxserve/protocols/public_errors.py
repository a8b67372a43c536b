"""What an error answer may say: what went wrong, never where.

Every protocol renders a domain error's message through :func:`public_message`. Absolute file-system
paths (a model file that failed to load, a runtime's source location) become ``<path>``; the full
message is logged (with the request id, like every log line made while handling a request) whenever
something was hidden or the error is the server's own fault, at most once every 10 s per error kind with
how many there were (a client that asks for ``/etc/a/b`` over and over wrote 20,338 WARNING lines, 4.35 MB,
in 10 s: outside attack rt24). Unexpected exceptions never reach a
client at all: the protocols answer them with a fixed "internal server error" and log the traceback.
"""

from __future__ import annotations

import logging
import re

from onnxserve.core.client_text import clipped, logged
from onnxserve.errors import ErrorKind, OnnxServeError
from onnxserve.log_throttle import LogThrottles

log = logging.getLogger(__name__)

_SEGMENT = r"[^\s/'\"`,;:()\[\]{}<>]+"
_PATH = re.compile(
    # POSIX: two or more segments from the root, except the HTTP API's own paths (/v2/..., /versions/3)
    rf"(?<![\w.~/-])/(?!(?:v1|v2|versions|labels)/){_SEGMENT}(?:/{_SEGMENT})+/?"
    # Windows: a drive letter and a backslash
    r"|\b[A-Za-z]:\\[^\s'\"`,;:()\[\]{}<>]*"
)

PLACEHOLDER = "<path>"

_SERVER_FAULTS = (ErrorKind.INTERNAL, ErrorKind.CONFIG)

_LOGGED = LogThrottles()
"""The throttle of each error kind's line."""


def redact_paths(message: str) -> str:
    """``message`` with every absolute file-system path replaced by ``<path>``."""
    return _PATH.sub(PLACEHOLDER, message)


MAX_MESSAGE_CHARACTERS = 1000
"""The longest message an error answer carries. Messages quote what the client sent (a name, a key, a
value); one that quotes a 10 MB value whole would make a small body a large answer (over gRPC, trailers
above grpc's metadata limit), so every message is cut here, whichever check wrote it."""


def public_message(error: OnnxServeError) -> str:
    """The message a client may see; the message is logged when a path was hidden from it (a client error's
    quoting client text, cut as log lines quote it) or the server is at fault (as it is, up to the answer's limit)."""
    cut = clipped(error.message, MAX_MESSAGE_CHARACTERS)
    public = redact_paths(cut)
    if error.kind not in _SERVER_FAULTS and public == cut:
        return public
    throttle = _LOGGED.of(error.kind)
    if not (count := throttle.due()):
        return public
    if error.kind in _SERVER_FAULTS:
        log.warning("%s error answered as %r: %s%s", error.kind.value, public, cut, throttle.note(count))
    else:
        log.warning(
            "%s error answered with a path hidden: %r%s",
            error.kind.value,
            logged(error.message),
            throttle.note(count),
        )
    return public
