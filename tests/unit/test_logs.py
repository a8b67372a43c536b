"""Request ids and the log formats that carry them."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import unicodedata
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from onnxserve.core.client_text import LOGGED_CHARACTERS
from onnxserve.core.observe import ExecutionRecord, Observers, RequestRecord, VersionRecord
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import InferenceService
from onnxserve.core.types import InferenceRequest
from onnxserve.errors import ErrorKind, InvalidInputError
from onnxserve.protocols import context
from onnxserve.protocols.http import RequestIdMiddleware, guarded
from onnxserve.protocols.public_errors import public_message
from onnxserve.server.logs import JsonFormatter, RequestIdFilter, TextFormatter, quiet_grpc_core
from onnxserve.server.metrics import Metrics


@pytest.mark.parametrize("given", ["abc", "r" * 64, "client-42:a.b_C", "0f8fad5b-d9cb-469f-a165-70867728950e"])
def test_usable_request_ids_are_kept(given: str) -> None:
    assert context.accept_request_id(given) == given


@pytest.mark.parametrize(
    "given",
    [
        None,
        "",
        "r" * 65,
        "tab\there",
        "new\nline",
        "caf\u00e9",
        " padded ",
        "client id 42",
        "~!@#$%^&*()",
        # Outside attack: a fake record inside the id's own log line
        "x] ok. 2026-12-06 09:00:00,000 CRITICAL onnxserve.auth [y",
    ],
)
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


def test_format_characters_cannot_reverse_or_hide_a_text_log_line() -> None:
    """An outside attack put U+202E (right-to-left override) in a path: a terminal showed the rest of the
    refusal line reversed. Every Unicode format character (Cf) is escaped like a control character."""
    path = "/v2/models/a\u202eDEGROF\u2066x\u200by\ufeff\U000e0041 caf\u00e9\tend"
    record = logging.LogRecord("onnxserve.test", logging.INFO, __file__, 1, "refused GET %s", (path,), None)
    text = TextFormatter().format(record)
    assert text.endswith("refused GET /v2/models/a\\u202eDEGROF\\u2066x\\u200by\\ufeff\\U000e0041 caf\u00e9\tend")
    assert all(unicodedata.category(c) != "Cf" for c in text)


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


def test_json_log_lines_survive_unicode_line_breaks() -> None:
    """U+0085, U+2028 and U+2029 are escaped, so readers that split on Unicode line breaks see one record."""
    message = "path a\x85b\u2028c\u2029d"
    record = logging.LogRecord("onnxserve.test", logging.INFO, __file__, 1, "%s", (message,), None)
    text = JsonFormatter().format(record)
    assert len(text.splitlines()) == 1
    assert json.loads(text)["message"] == message


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


class Recorder:
    """An observer that keeps the request records the service reports."""

    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []

    def request(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def execution(self, record: ExecutionRecord) -> None:
        pass

    def version(self, record: VersionRecord) -> None:
        pass


def service_with(*observers: Recorder | Metrics) -> InferenceService:
    """A service over no models whose observers are ``observers``."""
    fan_out = Observers()
    for observer in observers:
        fan_out.add(observer)
    return InferenceService(ModelRegistry(observers=fan_out), threads=1)


def test_unexpected_error_is_logged_under_the_request_id_and_hidden_from_the_client(json_log: io.StringIO) -> None:
    recorder = Recorder()
    service = service_with(recorder)

    async def boom(request: Request) -> Response:
        raise RuntimeError("secret detail at /srv/models/x")

    app = Starlette(
        routes=[Route("/boom/{name}", guarded(boom, protocol="test", service=service))],
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
    # counted once by the service, under "" since the server serves no model "m"
    assert [(r.model, r.version, r.protocol, r.error) for r in recorder.requests] == [
        ("", "", "test", ErrorKind.INTERNAL)
    ]
    service.close()


def test_a_request_the_service_counted_is_not_counted_again() -> None:
    """``infer`` counts the request it refuses; leaving the call with that error counts nothing more."""
    metrics = Metrics()
    recorder = Recorder()
    service = service_with(recorder, metrics)

    async def reaches_the_service(request: Request) -> Response:
        await service.infer(InferenceRequest("nope", [], model_version="3"))
        return Response()

    async def fails_after_decoding(request: Request) -> Response:
        raise InvalidInputError("bad")

    app = Starlette(
        routes=[
            Route("/x", guarded(reaches_the_service, protocol="test", service=service)),
            Route("/y", guarded(fails_after_decoding, protocol="test", service=service)),
            Route("/z", guarded(fails_after_decoding)),  # not an inference endpoint: never counted
        ]
    )
    with TestClient(app) as client:
        assert client.get("/x").status_code == 404
        assert client.get("/y").status_code == 400
        assert client.get("/z").status_code == 400
    assert [(r.protocol, r.error) for r in recorder.requests] == [
        ("test", ErrorKind.NOT_FOUND),
        ("test", ErrorKind.INVALID_INPUT),
    ]
    body, _ = metrics.exposition()
    assert b'onnxserve_requests_total{model="",protocol="test",status="not_found",version=""} 1.0' in body
    assert b'onnxserve_requests_total{model="",protocol="test",status="invalid_input",version=""} 1.0' in body
    service.close()


def test_a_client_error_with_a_path_is_logged_once_and_clipped(caplog: pytest.LogCaptureFixture) -> None:
    # Outside attack: a path-like name of 1,000 characters in any request made a WARNING line of about 2,000
    # (the answer, then the message). The line quotes the client's text once, clipped as client text is.
    name = "/etc/passwd/" + "A" * 3000
    with caplog.at_level(logging.WARNING, logger="onnxserve.protocols.public_errors"):
        public = public_message(InvalidInputError(f"input {name!r} is not an input of model 'm'"))
    assert "<path>" in public
    assert "/etc/passwd" not in public
    (line,) = [r.getMessage() for r in caplog.records]
    assert "/etc/passwd/AAA" in line  # the operator sees what was hidden
    # what the line's throttle adds when earlier tests logged the same kind of line: " (N such since ...)"
    line = re.sub(r" \(\d+ such since the last line; reported every [^)]*\)$", "", line)
    assert len(line) < LOGGED_CHARACTERS + 100


def test_grpc_cores_own_lines_are_off_unless_the_user_chose_a_level() -> None:
    """grpc-core writes to stderr itself, outside Python logging: at INFO a line for every failed TLS
    handshake on the gRPC port (36,716 lines in 8 s: outside attack rt24), at ERROR one for every call with
    an unknown grpc-encoding (rt34). grpc reads the level when it is first imported: the server sets it
    before, and leaves a user's choice alone."""
    script = "import os, onnxserve.server.lifecycle; print(os.environ.get('GRPC_VERBOSITY'))"
    for chosen, level in ((None, "NONE"), ("DEBUG", "DEBUG")):
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        if chosen is not None:
            env["GRPC_VERBOSITY"] = chosen
        ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert ran.stdout.strip() == level
    unset: dict[str, str] = {}
    in_time = "grpc" not in sys.modules  # once grpc is imported, its level is set for good
    assert quiet_grpc_core(unset) is in_time
    assert unset == ({"GRPC_VERBOSITY": "NONE"} if in_time else {})
