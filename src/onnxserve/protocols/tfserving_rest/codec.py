"""TF Serving REST bodies <-> InferenceRequest / InferenceResponse, status and metadata documents."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from onnxserve.core import wire
from onnxserve.core.client_text import clipped
from onnxserve.core.datatypes import from_v2
from onnxserve.core.pipeline import TEXT_INPUT, text_inputs_of
from onnxserve.core.types import (
    IndexEntry,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelState,
    Tensor,
    TensorSpec,
)
from onnxserve.core.wire import response_too_large
from onnxserve.errors import InvalidInputError
from onnxserve.protocols import json_size
from onnxserve.protocols.embeddings import MAX_INPUTS
from onnxserve.protocols.entry_count import check_entries
from onnxserve.protocols.json_depth import check_depth, too_deep
from onnxserve.protocols.public_errors import redact_paths
from onnxserve.protocols.tfserving_rest import answer, values

SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"

_PREDICT_KEYS = ("signature_name", "instances", "inputs")

# ModelState -> (TF Serving state, error code) for the model status API: every state has its entry (a
# test enumerates ModelState); a version draining its in-flight requests is TF Serving's UNLOADING.
_STATES: dict[str, tuple[str, str]] = {
    ModelState.LOADING.value: ("LOADING", "OK"),
    ModelState.READY.value: ("AVAILABLE", "OK"),
    ModelState.UNLOADING.value: ("UNLOADING", "OK"),
    ModelState.UNAVAILABLE.value: ("END", "UNAVAILABLE"),
}


@dataclass(frozen=True)
class DecodedPredict:
    request: InferenceRequest
    rows: bool  # the row ("instances") form: answer "predictions"; else the columnar form: answer "outputs"


# --- JSON ----------------------------------------------------------------------------------------


def loads(body: bytes) -> Any:
    """Parse a request body; NaN and Infinity tokens, which orjson refuses, are read as well.

    When those tokens appear only outside strings they are swapped for number sentinels that orjson
    reads (one fast pass in C), and the sentinels swapped back while walking the document (Python,
    which lets other threads run); otherwise the standard library's slower parser reads the body.
    """
    try:
        return check_depth(orjson.loads(body))
    except orjson.JSONDecodeError:
        pass
    if not body.strip():
        raise InvalidInputError("the request body is empty; expected a JSON object")
    if not any(_NONFINITE_TOKEN.search(m) for m in _JSON_STRING.findall(body)):
        swapped = body
        for token, sentinel in _SENTINELS:
            swapped = swapped.replace(token, sentinel)
        try:
            return _restore_nonfinite(check_depth(orjson.loads(swapped)))
        except orjson.JSONDecodeError:
            pass  # let the standard parser name the error
    try:
        doc = json.loads(body)
    except RecursionError:
        raise too_deep() from None
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise InvalidInputError("the request body is not valid JSON: it is not UTF-8 text") from None
    except ValueError:  # Python's own limit on the digits of an integer
        raise InvalidInputError(
            "the request body is not valid JSON here: a number has more digits than any datatype holds"
        ) from None
    return check_depth(doc)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NONFINITE_TOKEN = re.compile(rb"NaN|Infinity")
# Sentinels: finite doubles no client sends in practice, each read back exactly as itself.
_SENTINELS = (
    (b"-Infinity", b"-1.3456789012345678e308"),
    (b"Infinity", b"1.3456789012345678e308"),
    (b"NaN", b"1.2345678901234567e308"),
)
_RESTORE = {
    -1.3456789012345678e308: -math.inf,
    1.3456789012345678e308: math.inf,
    1.2345678901234567e308: math.nan,
}


def _restore_nonfinite(value: Any) -> Any:
    if isinstance(value, list):
        return [_RESTORE.get(v, v) if type(v) is float else _restore_nonfinite(v) for v in value]
    if isinstance(value, dict):
        return {k: _RESTORE.get(v, v) if type(v) is float else _restore_nonfinite(v) for k, v in value.items()}
    return _RESTORE.get(value, value) if type(value) is float else value


def dumps(doc: Any, nonfinite: bool = False) -> bytes:
    """Encode a response; with ``nonfinite`` NaN and Infinity are written as tokens, as TF Serving does."""
    if not nonfinite:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(doc, default=_plain, separators=(",", ":")).encode("utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- predict -------------------------------------------------------------------------------------


def decode_predict(doc: Any, meta: ModelMetadata, model_version: str | None) -> DecodedPredict:
    """One InferenceRequest from a predict body, reading each input as the model's datatype for it."""
    if not isinstance(doc, dict):
        raise InvalidInputError("the predict request must be a JSON object with 'instances' or 'inputs'")
    unknown = sorted(set(doc) - set(_PREDICT_KEYS))
    if unknown:
        raise InvalidInputError(
            f"unknown key {unknown[0]!r} in the predict request; expected {', '.join(_PREDICT_KEYS)}"
        )
    _check_signature(doc.get("signature_name"), meta.name)
    if "instances" in doc and "inputs" in doc:
        raise InvalidInputError(
            "the predict request has both 'instances' (row form) and 'inputs' (columnar form); give one"
        )
    if "instances" in doc:
        tensors, rows = _decode_instances(doc["instances"], meta), True
    elif "inputs" in doc:
        tensors, rows = _decode_inputs(doc["inputs"], meta), False
    else:
        raise InvalidInputError("the predict request needs 'instances' (row form) or 'inputs' (columnar form)")
    wire.check_request_bytes(tensors)
    request = InferenceRequest(model_name=meta.name, model_version=model_version, inputs=tensors, protocol=PROTOCOL)
    return DecodedPredict(request, rows)


def decode_predict_body(body: bytes, meta: ModelMetadata, model_version: str | None) -> DecodedPredict:
    """:func:`decode_predict` of a raw request body."""
    return decode_predict(loads(body), meta, model_version)


def _check_signature(signature: Any, model: str) -> None:
    if signature is None or signature == SIGNATURE:
        return
    raise InvalidInputError(f"model {model!r} has no signature {signature!r}; its only signature is {SIGNATURE!r}")


BYTES = from_v2("BYTES")
PROTOCOL = "tfserving_rest"


def _spec(meta: ModelMetadata, name: str) -> TensorSpec:
    for spec in meta.inputs:
        if spec.name == name:
            return spec
    raise wire.unknown_input_error(name, meta.name, meta.inputs, text_inputs_of(meta.task) if meta.task else ())


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(repr(s.name) for s in specs)


def _named(value: Any) -> bool:
    return isinstance(value, dict) and not values.is_b64(value)


def check_text_rows(meta: ModelMetadata, count: int, what: str) -> None:
    """A text model (one with a tokenizer) takes at most :data:`MAX_INPUTS` texts (or rows of token ids)
    per request, as the TEI and OpenAI routes do: 300,000 examples (4.2 MB) to a 2-class model held
    the health probes 1.4 s (outside attack rt27)."""
    if meta.task is not None and count > MAX_INPUTS:
        raise InvalidInputError(
            f"{count} {what} in one request to text model {meta.name!r}; send at most {MAX_INPUTS} "
            "(split them over several requests)"
        )


def _decode_inputs(value: Any, meta: ModelMetadata) -> list[Tensor]:
    if isinstance(value, list):
        check_text_rows(meta, len(value), "rows in 'inputs'")
    if _named(value):
        check_entries(value, "'inputs'")
        for name, item in value.items():
            if isinstance(item, list):
                check_text_rows(meta, len(item), f"rows in input {clipped(name)!r}")
        return [_tensor(meta, name, item, "") for name, item in value.items()]
    if values.holds_text(value) and len(meta.inputs) != 1:
        return [_tensor(meta, TEXT_INPUT, value, "")]  # bare text for a model with a tokenizer
    if len(meta.inputs) != 1:
        raise InvalidInputError(
            f"model {meta.name!r} has {len(meta.inputs)} inputs ({_names(meta.inputs)}): "
            "give 'inputs' as an object {input name: value}"
        )
    return [_tensor(meta, meta.inputs[0].name, value, "")]


def _decode_instances(rows: Any, meta: ModelMetadata) -> list[Tensor]:
    if not isinstance(rows, list) or not rows:
        raise InvalidInputError("'instances' must be a non-empty list of rows")
    check_text_rows(meta, len(rows), "instances")
    if not _named(rows[0]):
        if values.holds_text(rows) and len(meta.inputs) != 1:
            return [_tensor(meta, TEXT_INPUT, rows, " in 'instances'")]  # bare text for a model with a tokenizer
        if len(meta.inputs) != 1:
            raise InvalidInputError(
                f"model {meta.name!r} has {len(meta.inputs)} inputs ({_names(meta.inputs)}): "
                "each instance must be an object {input name: value}"
            )
        return [_tensor(meta, meta.inputs[0].name, rows, " in 'instances'")]
    names = list(rows[0])
    for i, row in enumerate(rows):
        if not _named(row):
            raise InvalidInputError(f"instance {i} is not an object {{input name: value}} like instance 0")
        check_entries(row, f"instance {i}")
        if set(row) != set(names):
            raise InvalidInputError(
                f"instance {i} has inputs {sorted(row)} but instance 0 has {sorted(names)}; every instance "
                "must name the same inputs"
            )
    return [_tensor(meta, name, [row[name] for row in rows], " in 'instances'") for name in names]


def _tensor(meta: ModelMetadata, name: str, value: Any, what: str) -> Tensor:
    if values.holds_text(value):
        # Text stays text whatever the graph expects: a model that carries a tokenizer tokenizes it
        # (``text`` or a token-id input); for any other model the core refuses it by name.
        return Tensor(name, BYTES, values.to_array(name, BYTES, value, what))
    spec = _spec(meta, name)
    return Tensor(name, spec.datatype, values.to_array(name, spec.datatype, value, what))


def encode_predict(response: InferenceResponse, rows: bool, limit: int = 0) -> bytes:
    """``{"predictions": [...]}`` for the row form, ``{"outputs": ...}`` for the columnar form, written in
    bounded slices (:mod:`.answer`); refused (TooLargeError) once its text passes ``limit`` bytes (0: none)."""
    predict_size(response, rows, limit)
    tensors = response.outputs
    nonfinite = answer.has_nonfinite(tensors)

    def dump(doc: Any) -> bytes:
        return dumps(doc, nonfinite)

    body = json_size.Body(limit)
    try:
        body.write(b'{"predictions":' if rows else b'{"outputs":')
        if rows and len(tensors) != 1:
            answer.write_rows(body, dump, tensors)
        elif len(tensors) == 1:
            answer.write_value(body, dump, tensors[0])
        else:
            body.write(b"{")
            for i, tensor in enumerate(tensors):
                body.write(b"%s%s:" % (b"," if i else b"", dump(tensor.name)))
                answer.write_value(body, dump, tensor)
            body.write(b"}")
        body.write(b"}")
    except json_size.Full:
        body.drop()  # what was written goes now, not with the refusal's traceback
        raise response_too_large(response.model_name, 0, limit, at_least=True, encoding=answer.ENCODING) from None
    return body.value()


def predict_size(response: InferenceResponse, rows: bool, limit: int = 0) -> int:
    """The most bytes :func:`encode_predict` may write (at most ``limit``, when there is one), what the
    in-flight budget holds for the answer while it is written; refused (TooLargeError) at once when even
    its smallest possible text is above ``limit``, and (InvalidInputError) when the row form cannot split it."""
    if rows:
        _check_rows(response.outputs)
    size = answer.bounds(response.outputs, rows)
    if limit and size.least > limit:
        raise response_too_large(response.model_name, size.least, limit, encoding=answer.ENCODING, at_least=True)
    return min(size.most, limit) if limit else size.most


def _check_rows(tensors: Sequence[Tensor]) -> None:
    """The row form splits every output along one first dimension."""
    batch: tuple[str, int] | None = None
    for tensor in tensors:
        if not tensor.shape:
            raise InvalidInputError(
                f"output {tensor.name!r} is a scalar, which the row form cannot split into rows; "
                "send the request in the columnar form ('inputs')"
            )
        if batch is None:
            batch = (tensor.name, tensor.shape[0])
        elif tensor.shape[0] != batch[1]:
            raise InvalidInputError(
                f"output {tensor.name!r} has {tensor.shape[0]} rows but output {batch[0]!r} has {batch[1]}; "
                "the row form needs every output to share the first dimension: send the request in the "
                "columnar form ('inputs')"
            )


# --- status and metadata -------------------------------------------------------------------------


def encode_status(versions: Sequence[IndexEntry]) -> dict[str, Any]:
    statuses = []
    for entry in versions:
        state, code = _STATES[entry.state]
        reason = redact_paths(entry.reason)  # a failed load's reason, as the repository index shows it
        message = reason or ("" if code == "OK" else f"version {entry.version} is {entry.state.lower()}")
        statuses.append(
            {"version": entry.version, "state": state, "status": {"error_code": code, "error_message": message}}
        )
    return {"model_version_status": statuses}


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": values.tf_dtype(spec.datatype),
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False},
        "name": spec.name,
    }


def encode_metadata(meta: ModelMetadata) -> dict[str, Any]:
    signature = {
        "inputs": {s.name: _tensor_info(s) for s in meta.inputs},
        "outputs": {s.name: _tensor_info(s) for s in meta.outputs},
        "method_name": PREDICT_METHOD,
    }
    return {
        "model_spec": {"name": meta.name, "signature_name": SIGNATURE, "version": meta.version},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
    }


# --- classify --------------------------------------------------------------------------------------

CLASSIFY_OUTPUT = "probabilities"
"""What :classify asks the model for: every class's score, named from the model's labels when answered
(``protocols.class_scores``), never as a ``class_labels`` tensor of one name per (example, class)."""


def decode_classify(doc: Any, meta: ModelMetadata, model_version: str | None) -> InferenceRequest:
    """A classify body ``{"examples": [{feature: text}, ...]}`` for a text-classification model.

    Each example names one text feature (``text``, or any single name); ``context`` features, if
    given, are shared by every example and must not repeat a name.
    """
    if meta.task != "text-classification":
        kind = f"a {meta.task} model" if meta.task else "not a text model"
        raise InvalidInputError(
            f":classify needs a text-classification model; model {meta.name!r} is {kind}; use :predict"
        )
    if not isinstance(doc, dict):
        raise InvalidInputError("the classify request must be a JSON object with 'examples'")
    unknown = sorted(set(doc) - {"signature_name", "context", "examples"})
    if unknown:
        raise InvalidInputError(f"unknown key {unknown[0]!r} in the classify request; expected examples, context")
    _check_signature(doc.get("signature_name"), meta.name)
    context = doc.get("context", {})
    examples = doc.get("examples")
    if not isinstance(context, dict):
        raise InvalidInputError("'context' must be an object of features")
    check_entries(context, "'context'")
    if not isinstance(examples, list) or not examples:
        raise InvalidInputError("'examples' must be a non-empty list of objects {feature: text}")
    check_text_rows(meta, len(examples), "examples")
    texts = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise InvalidInputError(f"example {i} must be an object {{feature: text}}")
        check_entries(example, f"example {i}")
        features = {**context, **example}
        value = features.get(TEXT_INPUT) if TEXT_INPUT in features else None
        if value is None and len(features) == 1:
            value = next(iter(features.values()))
        if not isinstance(value, str) and not values.is_b64(value):
            raise InvalidInputError(f"example {i} needs one text feature ('{TEXT_INPUT}': \"...\")")
        texts.append(value)
    tensor = Tensor(TEXT_INPUT, BYTES, values.to_array(TEXT_INPUT, BYTES, texts, " in 'examples'"))
    return InferenceRequest(
        meta.name, [tensor], model_version=model_version, outputs=[CLASSIFY_OUTPUT], protocol=PROTOCOL
    )


def decode_classify_body(body: bytes, meta: ModelMetadata, model_version: str | None) -> InferenceRequest:
    """:func:`decode_classify` of a raw request body."""
    return decode_classify(loads(body), meta, model_version)
