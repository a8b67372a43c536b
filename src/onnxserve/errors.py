"""The onnxserve exception tree.

Every error carries an :class:`ErrorKind`, never a transport status. Each protocol owns one small
table that maps a kind to its own status (see ``onnxserve.protocols.errors``).

::

    OnnxServeError
    ├── ConfigError            the server config or a model folder cannot be served (start-up)
    ├── ModelLoadError         a model version failed to load (bad ONNX file, runtime refused it)
    ├── ExportError            an export or its validation failed; nothing was written
    ├── OptimizeError          an optimization failed or broke the accuracy budget; nothing was written
    ├── ModelNotFoundError     no such model, version or label                  (kind NOT_FOUND)
    ├── InvalidInputError      a request does not match the model or the wire format (kind INVALID_INPUT)
    ├── UnavailableError       the model or server exists but cannot serve now    (kind UNAVAILABLE)
    │   └── ResourceExhaustedError  the model's queue is full; retry later       (kind RESOURCE_EXHAUSTED)
    ├── DeadlineExceededError  the request's timeout passed before its answer    (kind DEADLINE_EXCEEDED)
    ├── TooLargeError          the answer would exceed --max-response-bytes, or the run could not
    │                          allocate the memory these input values ask for   (kind TOO_LARGE)
    ├── BodyTooLargeError      the request body exceeds --max-request-bytes       (kind BODY_TOO_LARGE)
    ├── UnsupportedMediaTypeError  a body's Content-Type or Content-Encoding is not accepted
    │                                                                          (kind UNSUPPORTED_MEDIA_TYPE)
    ├── UnauthenticatedError   no bearer token, or not an accepted one            (kind UNAUTHENTICATED)
    ├── PermissionDeniedError  the token lacks the scope the endpoint needs       (kind PERMISSION_DENIED)
    └── InferenceError         the runtime failed while running a valid request   (kind INTERNAL)
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What went wrong, independent of any protocol."""

    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
    CONFIG = "config"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    TOO_LARGE = "too_large"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"


class OnnxServeError(Exception):
    """Base of every error onnxserve raises on purpose."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(OnnxServeError):
    """The server config, or a model folder it names, cannot be served."""

    kind = ErrorKind.CONFIG


class ModelLoadError(OnnxServeError):
    """A model version could not be loaded."""

    kind = ErrorKind.CONFIG


class FilesChangedError(ModelLoadError):
    """A model version's files changed while it loaded: what was read may mix old and new bytes. Not the
    files' fault: the repository poll loads the version again once they are stable."""


class ExportError(OnnxServeError):
    """An export, or the validation that follows it, failed."""

    kind = ErrorKind.INTERNAL


class OptimizeError(OnnxServeError):
    """An optimization or tuning run failed, or its result broke the accuracy budget."""

    kind = ErrorKind.INVALID_INPUT


class ModelNotFoundError(OnnxServeError):
    """The model, version or label does not exist."""

    kind = ErrorKind.NOT_FOUND


class InvalidInputError(OnnxServeError):
    """The request does not match the model or the wire format."""

    kind = ErrorKind.INVALID_INPUT


class UnavailableError(OnnxServeError):
    """The model exists but cannot serve right now (loading, unloading, draining)."""

    kind = ErrorKind.UNAVAILABLE


class ResourceExhaustedError(UnavailableError):
    """The model's queue is full: the request is refused at once and may be retried."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class UnauthenticatedError(OnnxServeError):
    """The request carries no bearer token, or one the server does not accept."""

    kind = ErrorKind.UNAUTHENTICATED


class PermissionDeniedError(OnnxServeError):
    """The request's token is accepted but lacks the scope the endpoint needs."""

    kind = ErrorKind.PERMISSION_DENIED


class DeadlineExceededError(OnnxServeError):
    """The request's timeout passed while it was queued (it never ran) or running (its result is dropped)."""

    kind = ErrorKind.DEADLINE_EXCEEDED


class TooLargeError(OnnxServeError):
    """The request asks for more than the server gives one request: an answer larger than
    ``--max-response-bytes``, or more memory than ONNX Runtime could allocate for the run.

    Not retryable as it is (unlike RESOURCE_EXHAUSTED): the client must ask for less."""

    kind = ErrorKind.TOO_LARGE


class BodyTooLargeError(OnnxServeError):
    """The request body is larger (on the wire or decompressed) than the server reads."""

    kind = ErrorKind.BODY_TOO_LARGE


class UnsupportedMediaTypeError(OnnxServeError):
    """The request body's media type or content encoding is not one the server reads."""

    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE


class InferenceError(OnnxServeError):
    """The runtime failed on a request that passed validation."""

    kind = ErrorKind.INTERNAL
