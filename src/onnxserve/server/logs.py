"""Server logs as text or JSON lines, each carrying the id of the request it was made for.

``configure_logging`` is what ``onnxserve serve`` calls; an application that embeds the server keeps
its own logging and may add ``RequestIdFilter`` (and ``JsonFormatter``) to its handlers.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

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


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 INFO onnxserve.x [request-id]: message``; the id only when known."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = _request_id(record)
        record.request_tag = f" [{request_id}]" if request_id is not None else ""
        return super().format(record)


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
        return orjson.dumps(doc).decode()


def configure_logging(log_format: LogFormat, level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``log_format``, replacing the root logger's handlers."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    return handler
