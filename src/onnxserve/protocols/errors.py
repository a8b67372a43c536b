"""One table per protocol from an error kind to that protocol's status."""

from __future__ import annotations

import grpc

from onnxserve.errors import ErrorKind

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.RESOURCE_EXHAUSTED: 503,  # with Retry-After
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.INTERNAL: 500,
    ErrorKind.CONFIG: 500,
    ErrorKind.UNAUTHENTICATED: 401,  # with WWW-Authenticate: Bearer
    ErrorKind.PERMISSION_DENIED: 403,
    # The answer, not the request, is too large (413 would blame the body) and retrying will not help
    # (not 503/507): 400, with a message that names the size and the limit.
    ErrorKind.TOO_LARGE: 400,
    ErrorKind.BODY_TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
}

TFSERVING_HTTP_STATUS: dict[ErrorKind, int] = {**HTTP_STATUS, ErrorKind.RESOURCE_EXHAUSTED: 429}
"""TF Serving maps RESOURCE_EXHAUSTED to 429 (KServe V2 / Triton answer 503)."""

OPENAI_HTTP_STATUS: dict[ErrorKind, int] = {**HTTP_STATUS, ErrorKind.RESOURCE_EXHAUSTED: 429}
"""The OpenAI-compatible API: 429 (with Retry-After) when the queue is full, so its clients back off and retry."""

TEI_HTTP_STATUS: dict[ErrorKind, int] = {**HTTP_STATUS, ErrorKind.INVALID_INPUT: 422, ErrorKind.RESOURCE_EXHAUSTED: 429}
"""Text-embeddings-inference's routes: 422 for a request it cannot take, 429 when overloaded."""

RETRY_AFTER_SECONDS = 1
"""Sent as Retry-After with every RESOURCE_EXHAUSTED answer over HTTP."""

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.CONFIG: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,  # as HTTP 400: ask for less; retrying will not help
    ErrorKind.BODY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,  # gRPC's own answer to an oversized message
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
}
