"""Server logs as text or JSON lines, each carrying the id of the request it was made for.

``configure_logging`` is what ``onnxserve serve`` calls; an application that embeds the server keeps
its own logging and may add ``RequestIdFilter`` (and ``JsonFormatter``) to its handlers.

Log lines cannot be forged. Messages carry what clients sent (paths, model names, header values); in
text logs every control and format character of a message is escaped (``\n`` becomes the two characters
``\\n``, a right-to-left override ``\\u202e``),
and every further line of a record (a traceback) starts with whitespace, so nothing a client sends can
start a line that looks like a record of its own. JSON logs are safe by encoding (one object a line,
control characters escaped by the JSON encoder).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import unicodedata
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

from onnxserve.log_throttle import EVERY_SECONDS, LogThrottle, set_every
from onnxserve.protocols.context import current_request_id

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the id of the request being handled (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


def _request_id(record: logging.LogRecord) -> str | None:
    request_id: str | None = getattr(record, "request_id", None)
    return request_id if request_id is not None else current_request_id()


_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)] if code != ord("\t")},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    0x2028: "\\u2028",  # LINE SEPARATOR and PARAGRAPH SEPARATOR: line breaks to some log readers
    0x2029: "\\u2029",
}


@functools.cache
def _unicode_escapes() -> dict[int, str]:
    """``_ESCAPES`` and every format character (Unicode category Cf: bidirectional overrides and isolates,
    zero-width characters, ...), which make a terminal or a log viewer show the rest of a line reversed or
    hidden (an outside attack wrote U+202E into refusal lines). Made once, on the first message that is not
    ASCII (a pass over every code point: tens of milliseconds)."""
    table = dict(_ESCAPES)
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)) == "Cf":
            table[code] = f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return table


def escape_control(text: str) -> str:
    """``text`` with its control and format characters (newlines included) written as escapes, tabs kept."""
    return text.translate(_ESCAPES if text.isascii() else _unicode_escapes())


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 INFO onnxserve.x [request-id]: message``; the id only when known.

    The message's control characters are escaped; the lines of a traceback are indented."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = _request_id(record)
        record.request_tag = f" [{request_id}]" if request_id is not None else ""
        original = record.msg, record.args
        record.msg, record.args = escape_control(record.getMessage()), None
        try:
            text = super().format(record)
        finally:
            record.msg, record.args = original
        first, _, rest = text.partition("\n")
        if not rest:
            return first
        return first + "".join(f"\n  {escape_control(line)}" for line in rest.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id when known,
    and exception (the formatted traceback) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _request_id(record)
        if request_id is not None:
            doc["request_id"] = request_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # orjson leaves U+0085, U+2028 and U+2029 as they are (valid JSON), but readers that split on
        # Unicode line breaks (str.splitlines, some log shippers) would cut the record there.
        return orjson.dumps(doc).decode().translate(_UNICODE_LINE_BREAKS)


_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class ClientGoneFilter(logging.Filter):
    """grpc logs an ERROR with a traceback when it cannot send an answer because its client has gone
    (``ExecuteBatchError``): an ordinary hang-up, which any client could use to flood the log. It is
    kept as one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            record.msg, record.args = "a gRPC answer was not sent: its client had gone", ()
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_CLIENT_GONE = ClientGoneFilter()

INVALID_HTTP_REQUEST = "Invalid HTTP request received."
"""uvicorn's WARNING for bytes that are no HTTP request (answered 400, the connection closed)."""


class InvalidRequestFilter(logging.Filter):
    """uvicorn logs a WARNING for each connection that sends bytes that are no HTTP request: one client
    wrote 20,084 lines in 15 s (outside attack rt22). They are counted and reported at most every 10 s."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = LogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != INVALID_HTTP_REQUEST:
            return True
        count = self.throttle.due()
        if not count:
            return False
        record.msg = "%d invalid HTTP request(s) received, each answered 400 and closed (reported every %g s at most)"
        record.args = (count, self.throttle.every)
        return True


_INVALID_REQUESTS = InvalidRequestFilter()


class RefusalFilter(logging.Filter):
    """The connection layer and the request-body checks log an INFO line for each request or connection
    they refuse: a client that repeats one refusal wrote 4,521 lines in 10 s over TLS and 65,711 in 20 s over
    plain HTTP (outside attack rt23). Each kind of line (its message template) is reported at most every 10 s,
    with how many there were since the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.throttles: dict[str, LogThrottle] = {}  # by template: the code's own, a bounded set

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or not isinstance(record.args, tuple):
            return True
        template = str(record.msg)
        # a template whose argument is the reason (one of the code's own) counts each reason apart
        key = f"{template}: {record.args[0]}" if template in REASONED and record.args else template
        throttle = self.throttles.setdefault(key, LogThrottle())
        count = throttle.due()
        if not count:
            return False
        if count > 1:
            record.msg = f"{template} ({count} such since the last line; reported every %g s at most)"
            record.args = (*record.args, throttle.every)
        return True


REASONED = frozenset({"closed a connection: %s"})
"""Templates of ``REFUSING_LOGGERS`` whose first argument is the reason, a string of the code's own."""

REFUSING_LOGGERS = ("onnxserve.server.connections", "onnxserve.protocols.request_body")
"""The loggers whose INFO lines are refusals a client can repeat at will (``RefusalFilter``)."""

_REFUSALS = RefusalFilter()


GRPC_VERBOSITY = "NONE"
"""grpc-core's own log level, unless the user sets ``GRPC_VERBOSITY``."""


def quiet_grpc_core(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Keep grpc-core's own log lines off (``GRPC_VERBOSITY=NONE``) unless the user chose a level.

    grpc-core writes its lines to stderr itself, outside Python logging (no filter or throttle sees them,
    and they are not JSON with ``--log-format json``), and most of those it writes while serving are about
    one client's call or connection: at INFO one for every failed TLS handshake on the gRPC port (plaintext
    connections wrote 36,716 lines, 7.8 MB, in 8 s: outside attack rt24), at ERROR one for every call with
    an unknown ``grpc-encoding`` (rt34) or a header list over its limit (284 a second: rt33). What the
    server must say about gRPC it says itself (a port it cannot bind, a call refused). grpc reads the
    variable once, when it is first imported; ``onnxserve.server`` calls this before any of its modules
    imports grpc. True when grpc follows it (the user's value, or set in time)."""
    if "GRPC_VERBOSITY" in environ:
        return True
    if "grpc" in sys.modules:  # imported already (an application that embeds the server): too late
        return False
    environ["GRPC_VERBOSITY"] = GRPC_VERBOSITY
    return True


def configure_logging(
    log_format: LogFormat, level: str, stream: TextIO | None = None, repeat_seconds: float = EVERY_SECONDS
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``log_format``, replacing the root logger's handlers;
    lines a client can repeat at will at most one of a kind every ``repeat_seconds``."""
    set_every(repeat_seconds)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if log_format == "text":
        _unicode_escapes()  # made now, not on the event loop when the first client's non-ASCII text is logged
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if _CLIENT_GONE not in cygrpc.filters:
        cygrpc.addFilter(_CLIENT_GONE)
    uvicorn = logging.getLogger("uvicorn.error")
    if _INVALID_REQUESTS not in uvicorn.filters:
        uvicorn.addFilter(_INVALID_REQUESTS)
    for name in REFUSING_LOGGERS:
        refusing = logging.getLogger(name)
        if _REFUSALS not in refusing.filters:
            refusing.addFilter(_REFUSALS)
    logging.captureWarnings(True)
    return handler
