"""KServe V2 REST request and response bodies <-> InferenceRequest / InferenceResponse."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from onnxserve.core import datatypes, wire
from onnxserve.core.statistics import ComputeTimes, Duration
from onnxserve.core.types import (
    IndexEntry,
    InferenceRequest,
    InferenceResponse,
    ModelConfiguration,
    ModelMetadata,
    ServerMetadata,
    Tensor,
    TensorSpec,
    VersionStatistics,
)
from onnxserve.errors import InvalidInputError
from onnxserve.protocols import json_size, offload
from onnxserve.protocols.entry_count import check_entries
from onnxserve.protocols.json_depth import check_depth
from onnxserve.protocols.public_errors import redact_paths
from onnxserve.protocols.v2_rest import tensors

HEADER_LENGTH = "inference-header-content-length"
"""Triton's binary tensor extension: the byte length of the JSON header that starts the body."""

_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}


@dataclass(frozen=True)
class DecodedRequest:
    request: InferenceRequest
    binary_outputs: frozenset[str]  # outputs that asked for binary form ("binary_data": true)
    all_binary: bool  # request-level binary_data_output
    json_outputs: frozenset[str] = frozenset()  # outputs that refused it ("binary_data": false)

    def wants_binary(self, output: str) -> bool:
        """An output's own binary_data parameter wins; otherwise the request-level default applies."""
        return output in self.binary_outputs or (self.all_binary and output not in self.json_outputs)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return value


def _check_keys(doc: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown key {unknown[0]!r} in {what}; expected {', '.join(sorted(allowed))}")


def _parameters(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInputError(f"'parameters' of {what} must be a JSON object")
    check_entries(params, f"'parameters' of {what}")
    return params


def decode_infer_request(
    body: bytes, model_name: str, model_version: str | None, header_length: int | None = None
) -> DecodedRequest:
    """Decode a JSON body, or a binary-extension body whose JSON header is ``header_length`` bytes."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise InvalidInputError(f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes")
    header = body if header_length is None else body[:header_length]
    binary = memoryview(body)[header_length or len(body) :]
    try:
        doc = _object(check_depth(orjson.loads(header), source=header), "the inference request")
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"the request body is not valid JSON: {e}") from None
    _check_keys(doc, _REQUEST_KEYS, "the inference request")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string")
    params = _parameters(doc, "the inference request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("the inference request needs 'inputs': a non-empty list of tensors")
    check_entries(raw_inputs, "'inputs' of the inference request")
    inputs: list[Tensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _decode_input(_object(raw, f"inputs[{i}]"), i, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise InvalidInputError(
            f"the body carries {len(binary)} bytes of binary tensor data but the inputs declare {offset}"
        )
    wire.check_request_bytes(inputs)
    outputs, binary_outputs, json_outputs = _decode_outputs(doc.get("outputs"))
    all_binary = _flag(params, "binary_data_output", "the request")
    request = InferenceRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        parameters={k: v for k, v in params.items() if k != "binary_data_output"},
        protocol="v2_rest",
    )
    return DecodedRequest(request, frozenset(binary_outputs), all_binary, frozenset(json_outputs))


def _decode_input(doc: dict[str, Any], index: int, binary: memoryview) -> tuple[Tensor, int]:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"inputs[{index}] needs a 'name' string")
    _check_keys(doc, _INPUT_KEYS, f"input {name!r}")
    for key in ("shape", "datatype"):
        if key not in doc:
            raise InvalidInputError(f"input {name!r} is missing {key!r}")
    if not isinstance(doc["datatype"], str):
        raise InvalidInputError(f"input {name!r}: 'datatype' must be a string such as \"FP32\"")
    dtype = datatypes.from_v2(doc["datatype"], where=f"input {name!r}")
    shape = tensors.parse_shape(name, doc["shape"])
    params = _parameters(doc, f"input {name!r}")
    wire.check_tensor_parameters("input", name, params)
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInputError(f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in doc:
            raise InvalidInputError(f"input {name!r} has both 'data' and binary_data_size; give one")
        if size > len(binary):
            raise InvalidInputError(
                f"input {name!r}: binary_data_size is {size} but only {len(binary)} bytes of binary data remain"
            )
        return wire.from_raw(name, dtype, shape, binary[:size]), size
    if "data" not in doc:
        raise InvalidInputError(f"input {name!r} has no 'data' (and no binary_data_size)")
    return tensors.from_json(name, dtype, shape, doc["data"]), 0


def _decode_outputs(raw: Any) -> tuple[list[str] | None, list[str], list[str]]:
    if raw is None:
        return None, [], []
    if not isinstance(raw, list):
        raise InvalidInputError("'outputs' must be a list of {\"name\": ...} objects")
    check_entries(raw, "'outputs' of the inference request")
    names: list[str] = []
    binary: list[str] = []
    json: list[str] = []
    for i, item in enumerate(raw):
        doc = _object(item, f"outputs[{i}]")
        name = doc.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"outputs[{i}] needs a 'name' string")
        _check_keys(doc, _OUTPUT_KEYS, f"output {name!r}")
        names.append(name)
        params = _parameters(doc, f"output {name!r}")
        wire.check_tensor_parameters("output", name, params)
        if "binary_data" in params:
            (binary if _flag(params, "binary_data", f"output {name!r}") else json).append(name)
    return names, binary, json


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool:
    """A true/false parameter (absent: false); anything else is refused rather than read as truthy."""
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where}: parameter {key!r} must be true or false, not {value!r:.40}")
    return value


def decode_work(body: bytes, header_length: int | None) -> int:
    """Bytes that decoding ``body`` has to go through: raw numbers are only viewed, so they do not count."""
    if header_length is None or not 0 <= header_length <= len(body):
        return len(body)
    # A datatype may be written with JSON escapes ("BYT\u0045S"): a header with any escape counts as BYTES
    # (outside attack rt58: a million elements, 4 KB of gzip, decoded on the event loop for 0.66 s).
    if body.find(b'"BYTES"', 0, header_length) >= 0 or body.find(b"\\u", 0, header_length) >= 0:
        # Length-prefixed elements are split one by one: as many as 4-byte prefixes fit, each counted as the
        # work of one, which may move the decode to the codec threads (not to a worker process: its size does).
        elements = (len(body) - header_length) // 4
        return max(len(body), min(elements * offload.BYTES_ELEMENT_WORK, offload.PROCESS_BYTES - 1))
    return header_length


def encode_work(response: InferenceResponse, decoded: DecodedRequest) -> int:
    """Bytes that encoding ``response`` has to go through: binary numeric outputs are only viewed."""
    return sum(int(t.data.nbytes) for t in response.outputs if t.datatype.is_bytes or not decoded.wants_binary(t.name))


DATA_SLICE_ELEMENTS = 1 << 16
"""Elements of an output's ``data`` written by one call of the JSON encoder (see :func:`_json_data`)."""


ENCODING = "as KServe V2 JSON"


def infer_response_size(response: InferenceResponse, decoded: DecodedRequest, limit: int = 0) -> int:
    """The most bytes :func:`encode_infer_response` may write (at most ``limit``, when there is one), what the
    in-flight budget holds for the answer while it is written; refused (TooLargeError) at once when even its
    smallest possible size is above ``limit``."""
    size = answer_bounds(response, decoded)
    if limit and size.least > limit:
        raise wire.response_too_large(response.model_name, size.least, limit, encoding=ENCODING)
    return min(size.most, limit) if limit else size.most


def answer_bounds(response: InferenceResponse, decoded: DecodedRequest) -> json_size.Bounds:
    """Bounds on the size of the body :func:`encode_infer_response` writes: the envelope and binary outputs
    exactly, BYTES data exactly (as orjson escapes it), numbers from the widest and narrowest text of their
    datatype."""
    total = json_size.Bounds.exact(len(_envelope(response)) + len(b"]}") + max(0, len(response.outputs) - 1))
    for tensor in response.outputs:
        if decoded.wants_binary(tensor.name):
            size = _raw_size(tensor)
            total += json_size.Bounds.exact(len(dumps(_binary_metadata(tensor, size))) + size)
            continue
        count = tensor.data.size
        total += json_size.Bounds.exact(len(_data_opening(tensor)) + 1 + json_size.structure((count,)))
        if tensor.datatype.is_bytes:
            total += json_size.Bounds.exact(json_size.orjson_strings_length(_items(tensor)))
        else:
            total += json_size.element_bounds(tensor.data)
    return total


def encode_infer_response(
    response: InferenceResponse, decoded: DecodedRequest, limit: int = 0
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when any output travels in binary form; refused
    (TooLargeError) as soon as it passes ``limit`` (0: no limit)."""
    body = json_size.Body(limit)
    chunks: list[bytes | memoryview] = []
    raw = 0
    try:
        body.write(_envelope(response))  # the outputs come last, written one by one
        for index, tensor in enumerate(response.outputs):
            if index:
                body.write(b",")
            if decoded.wants_binary(tensor.name):
                data = wire.to_raw(tensor)
                chunks.append(data)
                raw += len(data)
                body.write(dumps(_binary_metadata(tensor, len(data))))
            else:
                body.write(_data_opening(tensor))
                for piece in _json_data(tensors.to_json_data(tensor)):
                    body.write(piece)
                body.write(b"}")
            if limit and body.size() + raw > limit:
                raise json_size.Full
        body.write(b"]}")
        if limit and body.size() + raw > limit:
            raise json_size.Full
    except json_size.Full:
        body.drop()  # what was written goes now, not with the refusal's traceback
        del chunks
        raise wire.response_too_large(response.model_name, 0, limit, at_least=True, encoding=ENCODING) from None
    header = body.value()
    body.drop()
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)  # the one copy of the output data


def _envelope(response: InferenceResponse) -> bytes:
    """The answer up to its first output: ``{"model_name":...,"outputs":[``."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    return dumps(doc)[:-1] + b',"outputs":['


def _metadata(tensor: Tensor) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype.v2, "shape": list(tensor.shape)}


def _binary_metadata(tensor: Tensor, size: int) -> dict[str, Any]:
    return {**_metadata(tensor), "parameters": {"binary_data_size": size}}


def _data_opening(tensor: Tensor) -> bytes:
    """An output in JSON form up to its data: ``{"name":...,"shape":[...],"data":``."""
    return dumps(_metadata(tensor))[:-1] + b',"data":'


def _raw_size(tensor: Tensor) -> int:
    """Bytes :func:`wire.to_raw` makes of ``tensor`` (a BYTES element: its length and 4 bytes)."""
    if tensor.datatype.is_bytes:
        return sum(4 + len(item) for item in _items(tensor))
    return tensor.data.size * tensor.datatype.itemsize


def _items(tensor: Tensor) -> Iterator[bytes]:
    """A BYTES tensor's elements as bytes, row-major."""
    for value in tensor.data.reshape(-1):
        yield value if isinstance(value, bytes) else str(value).encode("utf-8")


def _json_data(data: Any) -> list[bytes]:
    """``data`` (a flat array, or a list of texts) as a JSON list, :data:`DATA_SLICE_ELEMENTS` elements per
    call of the encoder: one call over a 64 MiB tensor holds the interpreter for seconds (probes wait);
    between slices other threads, the event loop's among them, get their turn."""
    if len(data) <= DATA_SLICE_ELEMENTS:
        return [dumps(data)]
    pieces = [b"["]
    for start in range(0, len(data), DATA_SLICE_ELEMENTS):
        if start:
            pieces.append(b",")
        pieces.append(dumps(data[start : start + DATA_SLICE_ELEMENTS])[1:-1])
    pieces.append(b"]")
    return pieces


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype.v2, "shape": list(spec.shape)}


def encode_model_metadata(meta: ModelMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [_tensor_metadata(s) for s in meta.inputs],
        "outputs": [_tensor_metadata(s) for s in meta.outputs],
    }


def encode_server_metadata(meta: ServerMetadata) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


def encode_model_configuration(config: ModelConfiguration) -> dict[str, Any]:
    """Triton's model configuration JSON (the subset clients such as perf_analyzer read)."""

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "data_type": spec.datatype.triton_config, "dims": list(spec.shape)}

    return {
        "name": config.name,
        "platform": config.platform,
        "backend": "onnxruntime",
        "max_batch_size": config.max_batch_size,
        "input": [tensor(s) for s in config.inputs],
        "output": [tensor(s) for s in config.outputs],
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _compute(times: ComputeTimes) -> dict[str, dict[str, int]]:
    return {
        "compute_input": _duration(times.input),
        "compute_infer": _duration(times.infer),
        "compute_output": _duration(times.output),
    }


def encode_statistics(stats: list[VersionStatistics]) -> dict[str, Any]:
    """The statistics extension's JSON: ``{"model_stats": [...]}``."""
    return {
        "model_stats": [
            {
                "name": s.name,
                "version": s.version,
                "last_inference": s.statistics.last_inference_ms,
                "inference_count": s.statistics.inference_count,
                "execution_count": s.statistics.execution_count,
                "inference_stats": {
                    "success": _duration(s.statistics.success),
                    "fail": _duration(s.statistics.fail),
                    "queue": _duration(s.statistics.queue),
                    **_compute(s.statistics.compute),
                },
                "batch_stats": [{"batch_size": b.batch_size, **_compute(b.compute)} for b in s.statistics.batches],
            }
            for s in stats
        ]
    }


def encode_repository_index(entries: list[IndexEntry]) -> list[dict[str, str]]:
    return [{"name": e.name, "version": e.version, "state": e.state, "reason": redact_paths(e.reason)} for e in entries]


def decode_load_request(body: bytes) -> list[str]:
    """The names of a model load request's ``parameters`` (an empty body has none)."""
    if not body.strip():
        return []
    try:
        doc = _object(check_depth(orjson.loads(body)), "the load request")
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"the request body is not valid JSON: {e}") from None
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' of the load request must be an object")
    return [str(k) for k in parameters]


def decode_repository_index_request(body: bytes) -> bool:
    """The ``ready`` flag of a repository index request (an empty body means false)."""
    if not body.strip():
        return False
    try:
        doc = _object(check_depth(orjson.loads(body)), "the repository index request")
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"the request body is not valid JSON: {e}") from None
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInputError("'ready' must be true or false")
    return ready
