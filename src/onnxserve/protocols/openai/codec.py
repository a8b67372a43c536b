"""OpenAI embeddings bodies <-> the embedding request, responses and OpenAI's error shape."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from onnxserve.core.client_text import clipped
from onnxserve.errors import ErrorKind, InvalidInputError, OnnxServeError
from onnxserve.protocols.embeddings import Embedded, TokenIds, token_row
from onnxserve.protocols.http import json_body
from onnxserve.protocols.json_depth import check_depth

PROTOCOL = "openai"

ENCODINGS = ("float", "base64")
_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ParameterError(InvalidInputError):
    """A bad request body, naming the parameter at fault (OpenAI's ``error.param``)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str] | TokenIds
    encoding_format: str
    dimensions: int | None


def decode_embeddings(body: bytes) -> EmbeddingsRequest:
    """The request an OpenAI ``/v1/embeddings`` body makes; ParameterError for a bad one."""
    try:
        doc = check_depth(orjson.loads(body))
    except orjson.JSONDecodeError as e:
        raise ParameterError(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ParameterError(None, "the request body must be a JSON object with 'input' and 'model'")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise ParameterError(unknown[0], f"unrecognized request argument {unknown[0]!r}; known: {', '.join(_FIELDS)}")
    for name in ("input", "model"):
        if name not in doc:
            raise ParameterError(name, f"'{name}' is required")
    model = doc["model"]
    if not isinstance(model, str) or not model:
        raise ParameterError("model", "'model' must be a served model's name (NAME, NAME:VERSION or NAME@LABEL)")
    encoding = doc.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise ParameterError("encoding_format", f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
    dimensions = doc.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ParameterError("dimensions", f"'dimensions' must be a positive integer, got {dimensions!r}")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise ParameterError("user", "'user' must be a string")
    return EmbeddingsRequest(model, decode_input(doc["input"]), encoding, dimensions)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_input(value: Any) -> list[str] | TokenIds:
    """``input``: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    expected = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ParameterError("input", f"'input' must be {expected}, and not empty")
    if all(isinstance(x, str) for x in value):
        return list(value)
    if all(_is_id(x) for x in value):
        return [token_row(value, 0)]
    if all(isinstance(x, list) and all(_is_id(t) for t in x) for x in value):
        return [token_row(x, i) for i, x in enumerate(value)]
    raise ParameterError("input", f"'input' must be {expected}; do not mix them")


def encode_embeddings(model: str, embedded: Embedded, encoding: str) -> Response:
    if encoding == "base64":
        little = embedded.vectors.astype("<f4")
        rows: Sequence[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        rows = list(embedded.vectors)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    usage = {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens}
    document = {"object": "list", "data": data, "model": model, "usage": usage}
    return json_body(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY))


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "onnxserve"}


def encode_models(names: Sequence[str], created: int) -> Response:
    return json_body(orjson.dumps({"object": "list", "data": [model_object(n, created) for n in names]}))


def render_error(error: OnnxServeError | None, message: str, status: int) -> Response:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    param = error.param if isinstance(error, ParameterError) else None
    param = clipped(param, 200) if param is not None else None  # it may be a key the client made up
    code = None
    if error is not None and error.kind is ErrorKind.NOT_FOUND:
        code = "model_not_found"
    kind = _ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json_body(orjson.dumps(body), status)
