"""TEI request bodies -> checked values; results -> TEI's response shapes; TEI's error shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from starlette.responses import Response
from tokenizers import Encoding

from onnxserve.errors import ErrorKind, InvalidInputError, OnnxServeError
from onnxserve.protocols.embeddings import MAX_INPUTS, TokenIds, token_row
from onnxserve.protocols.http import json_body
from onnxserve.protocols.json_depth import check_depth

PROTOCOL = "tei"

MODEL_HEADER = "x-model"
MODEL_QUERY = "model"

DIRECTIONS = ("Right", "Left")

_ERROR_TYPES: dict[ErrorKind, str] = {
    ErrorKind.INVALID_INPUT: "validation",
    ErrorKind.NOT_FOUND: "not_found",
    ErrorKind.UNAVAILABLE: "unhealthy",
    ErrorKind.RESOURCE_EXHAUSTED: "overloaded",
    ErrorKind.DEADLINE_EXCEEDED: "overloaded",
    ErrorKind.UNAUTHENTICATED: "unauthenticated",
    ErrorKind.PERMISSION_DENIED: "permission_denied",
}


def render_error(error: OnnxServeError | None, message: str, status: int) -> Response:
    """TEI's error body: ``{"error": message, "error_type": ...}``."""
    kind = _ERROR_TYPES.get(error.kind, "backend") if error is not None else "backend"
    return json_body(orjson.dumps({"error": message, "error_type": kind}), status)


def loads(body: bytes) -> dict[str, Any]:
    try:
        doc = check_depth(orjson.loads(body))
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return doc


@dataclass(frozen=True)
class Body:
    """A route's request body, decoded by :func:`decode` (in a worker process when large)."""

    doc: dict[str, Any]  # every field but ``inputs``
    inputs: Inputs | None  # ``inputs`` as texts or token ids, for the routes that take them so


def decode(body: bytes, route: str, allowed: Sequence[str], required: Sequence[str]) -> Body:
    """A route's body: parsed, its fields checked, ``inputs`` decoded (texts, or token ids too for
    ``/embed``), lists of texts refused beyond :data:`MAX_INPUTS`. What comes back is small or arrays:
    cheap to copy back from a worker process."""
    doc = loads(body)
    fields(doc, allowed, required)
    texts_list = doc.get("texts")
    if isinstance(texts_list, list) and len(texts_list) > MAX_INPUTS:
        raise InvalidInputError(f"{len(texts_list)} texts in one request; send at most {MAX_INPUTS}")
    if "inputs" not in doc:
        return Body(doc, None)
    value = doc.pop("inputs")
    if route == "/predict" and isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        raise InvalidInputError("'inputs': pairs of texts are not supported by /predict; send texts")
    inputs = texts_or_ids(value) if route == "/embed" else texts(value, "inputs")
    if len(inputs.values) > MAX_INPUTS:
        raise InvalidInputError(f"{len(inputs.values)} inputs in one request; send at most {MAX_INPUTS}")
    return Body(doc, inputs)


def fields(doc: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str]) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise InvalidInputError(f"unknown field {unknown[0]!r}; this route takes {', '.join(allowed)}")
    missing = [name for name in required if name not in doc]
    if missing:
        raise InvalidInputError(f"missing field {missing[0]!r}")


def flag(doc: Mapping[str, Any], name: str, default: bool) -> bool:
    value = doc.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name!r} must be true or false, got {value!r}")
    return value


def direction(doc: Mapping[str, Any]) -> None:
    """``truncation_direction``: ``Right`` (the default) is what the server does; ``Left`` is refused."""
    value = doc.get("truncation_direction", "Right")
    if value not in (None, *DIRECTIONS):
        raise InvalidInputError(f"'truncation_direction' must be 'Right' or 'Left', got {value!r}")
    if value == "Left":
        raise InvalidInputError("'truncation_direction': 'Left' is not supported; texts are truncated on the right")


def dimensions(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("dimensions")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidInputError(f"'dimensions' must be a positive integer, got {value!r}")
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Inputs:
    values: list[str] | TokenIds
    single: bool  # one input sent bare: TEI still answers a list of one


def texts_or_ids(value: Any, name: str = "inputs") -> Inputs:
    """``inputs``: a string, a list of strings, token ids, or a list of lists of token ids."""
    expected = f"{name!r} must be a string, a list of strings, a list of token ids or a list of such lists"
    if isinstance(value, str):
        return Inputs([value], True)
    if not isinstance(value, list) or not value:
        raise InvalidInputError(f"{expected}, and not empty")
    if all(isinstance(x, str) for x in value):
        return Inputs(list(value), False)
    if all(_is_id(x) for x in value):
        return Inputs([token_row(value, 0)], True)
    if all(isinstance(x, list) and all(_is_id(t) for t in x) for x in value):
        return Inputs([token_row(x, i) for i, x in enumerate(value)], False)
    raise InvalidInputError(f"{expected}; do not mix them")


def texts(value: Any, name: str) -> Inputs:
    """A string or a non-empty list of strings."""
    if isinstance(value, str):
        return Inputs([value], True)
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return Inputs(list(value), False)
    raise InvalidInputError(f"{name!r} must be a string or a non-empty list of strings")


def vectors(array: npt.NDArray[np.float32]) -> Response:
    return json_body(orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))


def ranks(scores: npt.NDArray[Any], candidates: Sequence[str], return_text: bool) -> Response:
    """``[{"index", "score", "text"?}]``, highest score first."""
    order = sorted(range(len(candidates)), key=lambda i: -float(scores[i]))
    rows = [{"index": i, "score": float(scores[i]), **({"text": candidates[i]} if return_text else {})} for i in order]
    return json_body(orjson.dumps(rows))


def tokens(encodings: Sequence[Encoding], texts: Sequence[str]) -> Response:
    """Per input, its tokens: ``{"id", "text", "special", "start", "stop"}`` (character offsets; null for
    special tokens, which stand for no text). Each input's row is encoded as soon as it is built, so the
    objects of one row live at a time (about 300 bytes per token), not those of the whole answer."""
    rows = []
    for encoding, text in zip(encodings, texts, strict=True):
        row: list[dict[str, Any]] = []
        for token_id, special, (start, stop) in zip(
            encoding.ids, encoding.special_tokens_mask, encoding.offsets, strict=True
        ):
            row.append(
                {
                    "id": token_id,
                    "text": encoding.tokens[len(row)] if special else text[start:stop],
                    "special": bool(special),
                    "start": None if special else start,
                    "stop": None if special else stop,
                }
            )
        rows.append(orjson.dumps(row))
    return json_body(b"[" + b",".join(rows) + b"]")
