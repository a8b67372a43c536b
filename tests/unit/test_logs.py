"""Request ids and the log formats that carry them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from onnxserve.core.observe import RequestRecord
from onnxserve.errors import ErrorKind, InvalidInputError
from onnxserve.protocols import context
from onnxserve.protocols.http import RequestIdMiddleware, guarded
from onnxserve.server.logs import JsonFormatter, RequestIdFilter, TextFormatter
from onnxserve.server.metrics import Metrics


@pytest.mark.parametrize("given", ["abc", "client id 42", "r" * 128, "~!@#$%^&*()"])
def test_usable_request_ids_are_kept(given: str) -> None:
    assert context.accept_request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "r" * 129, "tab\there", "new\nline", "caf\u00e9", " padded "])
def test_unusable_request_ids_are_replaced(given: str | None) -> None:
    replaced = context.accept_request_id(given)
    assert replaced != given
    assert len(replaced) == 32
    assert int(replaced, 16) >= 0


def test_generated_ids_differ() -> None:
    assert len({context.new_request_id() for _ in range(100)}) == 100


def _record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("broken")
        except ValueError as e:
            exc_info = (type(e), e, e.__traceback__)
    return logging.LogRecord("onnxserve.test", logging.WARNING, __file__, 1, message, ("x",), exc_info)


def test_json_formatter_with_and_without_request_id() -> None:
    formatter = JsonFormatter()
    outside = json.loads(formatter.format(_record("hello %s")))
    assert outside.keys() == {"time", "level", "logger", "message"}
    assert outside["message"] == "hello x"
    assert outside["level"] == "WARNING"
    assert outside["logger"] == "onnxserve.test"
    assert outside["time"].endswith("+00:00")

    token = context.set_request_id("rid-1")
    try:
        inside = json.loads(formatter.format(_record("hello %s", exc=True)))
    finally:
        context.reset_request_id(token)
    assert inside["request_id"] == "rid-1"
    assert "ValueError: broken" in inside["exception"]
    assert "\n" not in formatter.format(_record("two\nlines %s"))


def test_text_formatter_shows_the_request_id_when_known() -> None:
    formatter = TextFormatter()
    assert formatter.format(_record("hello %s")).endswith(" WARNING onnxserve.test: hello x")
    token = context.set_request_id("rid-2")
    try:
        assert formatter.format(_record("hello %s")).endswith(" WARNING onnxserve.test [rid-2]: hello x")
    finally:
        context.reset_request_id(token)


def test_text_log_lines_cannot_be_forged() -> None:
    forged = "/v2/x\n2026-01-01 00:00:00,000 ERROR onnxserve.server.auth: FORGED\r\x1b[2K\u2028\x85"
    record = logging.LogRecord("onnxserve.test", logging.INFO, __file__, 1, "refused GET %s", (forged,), None)
    text = TextFormatter().format(record)
    assert "\n" not in text
    assert text.endswith(
        "INFO onnxserve.test: refused GET /v2/x\\n2026-01-01 00:00:00,000 ERROR onnxserve.server.auth: FORGED"
        "\\r\\x1b[2K\\u2028\\x85"
    )
    assert record.getMessage() == f"refused GET {forged}"  # other handlers see the record unchanged


def test_every_line_of_a_traceback_is_indented() -> None:
    try:
        raise ValueError("bad\n2026-01-01 00:00:00,000 ERROR onnxserve.x: FORGED")
    except ValueError as e:
        exc_info = (type(e), e, e.__traceback__)
    record = logging.LogRecord("onnxserve.test", logging.ERROR, __file__, 1, "failed", (), exc_info)
    first, *rest = TextFormatter().format(record).split("\n")
    assert first.endswith("ERROR onnxserve.test: failed")
    assert rest
    assert all(line.startswith("  ") for line in rest)


def test_json_log_lines_cannot_be_forged() -> None:
    record = logging.LogRecord("onnxserve.test", logging.INFO, __file__, 1, "path %s", ("a\nb\r\x00",), None)
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert json.loads(text)["message"] == "path a\nb\r\x00"


def test_filter_sets_the_attribute_for_other_formatters() -> None:
    record = _record("m")
    token = context.set_request_id("rid-3")
    try:
        assert RequestIdFilter().filter(record)
    finally:
        context.reset_request_id(token)
    assert record.__dict__["request_id"] == "rid-3"
    outside = _record("m")
    RequestIdFilter().filter(outside)
    assert outside.__dict__["request_id"] is None


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """JSON lines of the HTTP protocol logger, through a handler as ``configure_logging`` makes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("onnxserve.protocols.http")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_unexpected_error_is_logged_under_the_request_id_and_hidden_from_the_client(json_log: io.StringIO) -> None:
    recorded: list[RequestRecord] = []

    async def boom(request: Request) -> Response:
        raise RuntimeError("secret detail at /srv/models/x")

    app = Starlette(
        routes=[Route("/boom/{name}", guarded(boom, protocol="test", record_unreached=recorded.append))],
        middleware=[Middleware(RequestIdMiddleware)],
    )
    with TestClient(app) as client:
        response = client.get("/boom/m", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    assert response.headers["x-request-id"] == "boom-1"
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "boom-1"
    assert "RuntimeError: secret detail" in errors[0]["exception"]
    access = [line for line in lines if line["level"] == "DEBUG"]
    assert access[0]["request_id"] == "boom-1"
    assert access[0]["message"].startswith("GET /boom/m 500 ")
    assert [(r.model, r.version, r.protocol, r.error) for r in recorded] == [("m", "", "test", ErrorKind.INTERNAL)]


def test_a_request_the_core_reported_is_not_reported_again() -> None:
    """The server's observer marks the attempt; the guard then leaves the counting to the core."""
    metrics = Metrics()
    recorded: list[RequestRecord] = []

    async def reaches_the_model(request: Request) -> Response:
        metrics.request(RequestRecord("m", "1", "test", ErrorKind.INVALID_INPUT, 0, 0, 0, 1000))
        raise InvalidInputError("bad")

    app = Starlette(routes=[Route("/x", guarded(reaches_the_model, protocol="test", record_unreached=recorded.append))])
    with TestClient(app) as client:
        assert client.get("/x").status_code == 400
    assert recorded == []
    body, _ = metrics.exposition()
    assert b'onnxserve_requests_total{model="m",protocol="test",status="invalid_input",version="1"} 1.0' in body
