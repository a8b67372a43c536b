"""What an HTTP request body may be: its size, its encoding and its media type, checked as it streams in.

Every POST passes through :class:`RequestBodyLimits` before any endpoint sees it:

- **Media type.** ``application/json``; ``application/octet-stream`` together with
  ``Inference-Header-Content-Length`` (KServe V2's binary tensor extension); or no ``Content-Type``
  at all (tritonclient sends none; the body is then read as JSON, or as the binary extension when that
  header is present). Anything else (pickle, multipart forms, XML, ...) is answered 415 unread.
- **Encoding.** ``Content-Encoding`` ``gzip`` or ``deflate`` (zlib-wrapped, as tritonclient sends it)
  is decompressed while it streams in, by a decompressor asked for at most the bytes still allowed,
  so a zip bomb stops one byte past the limit; a chunk that decodes to more than a little is decoded a
  few MiB at a time in the codec threads, each step counted in the in-flight budget before the next.
  ``identity`` or no header: as sent. Others: 415.
- **Size.** At most ``max_bytes`` on the wire *and* after decompression. A ``Content-Length`` above
  the limit is answered 413 before a byte is read; a chunked (or lying) body is counted as it arrives
  and answered 413 at limit + 1, without buffering the rest (the server reads and drops it).

- **Answers of other requests.** A GET (or any request without a body) holds nothing, but an endpoint may
  count a large answer all the same (``inflight.held``: TEI's ``/info`` of a model of many labels), held
  until written like a POST's.
- **Memory in flight.** With an :class:`~onnxserve.protocols.inflight.InflightBytes` budget, the
  body's ``Content-Length`` is reserved before a byte is read, and a chunked or compressed body
  reserves as its decoded size grows; the endpoint adds its answer (``inflight.hold_answer``), and
  the reservation is released when the answer has been written to the connection.
  A body that does not fit is answered at once with 503 (429 on TF Serving's ``/v1/`` routes, its
  convention for RESOURCE_EXHAUSTED) and ``Retry-After``.

Every refusal is a domain error (``BodyTooLargeError`` 413, ``UnsupportedMediaTypeError`` 415,
``InvalidInputError`` 400, ``ResourceExhaustedError``), answered with the status of the protocol whose
endpoint the path names, from that protocol's table, and counted by the service when that endpoint is an
inference endpoint (``onnxserve.protocols.http.refuse_before_routing``).

The endpoint then sees the decoded body as if it had been sent plain (``Content-Encoding`` removed,
``Content-Length`` its decoded size).
"""

from __future__ import annotations

import contextlib
import logging
import reprlib
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from onnxserve.core.client_text import logged
from onnxserve.errors import (
    BodyTooLargeError,
    OnnxServeError,
    UnsupportedMediaTypeError,
)
from onnxserve.protocols.http import refuse_before_routing
from onnxserve.protocols.inflation import ENCODINGS, Inflater, inflate
from onnxserve.protocols.inflight import Hold, InflightBytes, holding, no_memory, stop_holding

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"
BINARY_HEADER = "inference-header-content-length"

_short = reprlib.Repr()  # what a message may quote of a header
_short.maxstring = 60


def announces_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request head (ASGI's lower-cased header pairs) announces a body: a Content-Length other
    than 0, or a Transfer-Encoding."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def _media_type(headers: Headers) -> str | None:
    raw = headers.get("content-type")
    if raw is None:
        return None
    return raw.split(";", 1)[0].strip().lower()


def check_media_type(headers: Headers) -> None:
    """415 unless the body is JSON, the binary tensor extension, or untyped (read as JSON)."""
    media = _media_type(headers)
    if media is None or media == JSON_MEDIA_TYPE:
        return
    if media == BINARY_MEDIA_TYPE:
        if BINARY_HEADER in headers:
            return
        raise UnsupportedMediaTypeError(
            f"Content-Type {BINARY_MEDIA_TYPE} is accepted only for the binary tensor extension: "
            "send Inference-Header-Content-Length with the JSON header's byte length",
        )
    raise UnsupportedMediaTypeError(
        f"unsupported Content-Type {_short.repr(headers['content-type'])}: send {JSON_MEDIA_TYPE}, or "
        f"{BINARY_MEDIA_TYPE} with Inference-Header-Content-Length (binary tensor extension)",
    )


def content_encoding(headers: Headers) -> str | None:
    """The body's compression (``gzip`` or ``deflate``), None when sent plain; 415 for anything else."""
    raw = headers.get("content-encoding")
    if raw is None:
        return None
    encoding = raw.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in ENCODINGS:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Encoding {_short.repr(raw)}: send gzip, deflate or an uncompressed body"
        )
    return encoding


def _too_large(limit: int, decoded: bool) -> BodyTooLargeError:
    after = " after decompression" if decoded else ""
    return BodyTooLargeError(
        f"the request body is larger{after} than the server's limit of {limit} bytes (--max-request-bytes)"
    )


SENT_BEFORE_RELEASE_BYTES = 256 * 1024
"""Answer bodies from this size on are held in the in-flight budget until the client has read them."""


def _sent_before_release(send: Send) -> Send:
    """``send``, but a large final answer body returns only once it has been written to the connection.

    uvicorn writes a body into the transport's buffer and returns at once; it waits for the client to
    read (the buffer to drain) only before the *next* message. So a large final body is sent as itself
    with ``more_body`` and then an empty final one, which returns when the client has read the answer
    (or gone, or been cut by the server's body timeout). The answer's bytes stay counted until then.
    """

    async def sent(message: Message) -> None:
        if (
            message["type"] == "http.response.body"
            and not message.get("more_body", False)
            and len(message.get("body", b"")) >= SENT_BEFORE_RELEASE_BYTES
        ):
            await send({**message, "more_body": True})
            # A client cut by the body timeout meanwhile: its transport is closed and there is nothing left
            # to finish (asyncio says so with RuntimeError); no traceback for an ordinary hang-up.
            with contextlib.suppress(RuntimeError, ConnectionError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send(message)

    return sent


class RequestBodyLimits:
    """ASGI middleware: checks and reads every POST body (see the module docstring), then hands it on."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BYTES, budget: InflightBytes | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reservation = Hold(self.budget)
        if scope["method"] != "POST":  # no body; a large answer (TEI's /info) is counted all the same
            token = holding(reservation)
            try:
                await self.app(scope, receive, _sent_before_release(send))
            finally:
                stop_holding(token)
                reservation.release()
            return
        token = holding(reservation)
        try:
            await self._checked(scope, receive, _sent_before_release(send), reservation)
        finally:
            stop_holding(token)
            reservation.release()

    async def _checked(self, scope: Scope, receive: Receive, send: Send, reservation: Hold) -> None:
        headers = Headers(scope=scope)
        try:
            check_media_type(headers)
            encoding = content_encoding(headers)
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit():
                if int(declared) > self.max_bytes:
                    raise _too_large(self.max_bytes, False)
                reservation.grow_to(int(declared))
            body = await self._read(receive, encoding, reservation)
        except OnnxServeError as refusal:
            log.info("refused %s %s: %s", scope["method"], logged(scope["path"]), refusal)
            response = refuse_before_routing(scope, refusal)
            if announces_body(scope["headers"]):
                # the rest of its body is not read: the connection closes after this answer, and says so, or a
                # keep-alive client sends its next request on it and gets no answer (outside attack rt26)
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        if body is None:
            return  # the client went away while sending; nobody to answer
        kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        decoded_scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode("ascii"))]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(decoded_scope, replay, send)

    async def _inflate(
        self, inflater: Inflater, chunk: bytes, chunks: list[bytes], decoded: int, reservation: Hold
    ) -> int:
        """Decode ``chunk`` into ``chunks``, each step counted in the budget (``inflation.inflate``); the bytes
        decoded so far, the body refused one byte past the limit (outside attack rt33: 16 bodies of 61 KB
        of gzip inflating to 60 MiB each, inflated whole on the event loop, held probes 3.1 s)."""

        def counted(piece: bytes) -> None:
            nonlocal decoded
            decoded += len(piece)
            if decoded > self.max_bytes:
                raise _too_large(self.max_bytes, True)
            reservation.grow_to(decoded)
            chunks.append(piece)

        await inflate(inflater, chunk, self.max_bytes - decoded, counted)
        return decoded

    async def _read(self, receive: Receive, encoding: str | None, reservation: Hold) -> bytes | None:
        """The whole (decoded) body, refused at limit + 1; None when the client disconnected."""
        inflater = Inflater(encoding, "request body") if encoding is not None else None
        chunks: list[bytes] = []
        received = decoded = 0
        while True:
            try:
                message = await receive()
            except MemoryError:  # the server (uvicorn) could not make the chunk's bytes: retry later
                chunks.clear()
                raise no_memory("for this body") from None
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                raise _too_large(self.max_bytes, False)
            if inflater is not None and chunk:
                decoded = await self._inflate(inflater, chunk, chunks, decoded, reservation)
            else:
                decoded += len(chunk)
                if decoded > self.max_bytes:
                    raise _too_large(self.max_bytes, True)
                reservation.grow_to(decoded)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if inflater is not None:
            inflater.finish()
        try:
            return b"".join(chunks)
        except MemoryError:  # the process is short of memory now: the client may retry later
            chunks.clear()
            raise no_memory("for this body") from None
