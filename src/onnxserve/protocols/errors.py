"""One table per protocol from an error kind to that protocol's status."""

from __future__ import annotations

from onnxserve.errors import ErrorKind

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
    ErrorKind.CONFIG: 500,
}
