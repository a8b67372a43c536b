"""V2 gRPC messages <-> InferenceRequest / InferenceResponse and metadata.

Inputs arrive either as typed ``contents`` or as ``raw_input_contents`` (one bytes entry per input,
in order; what tritonclient sends). A request that came raw is answered raw; a typed request is
answered typed unless an output is FP16, which only travels raw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnxserve.core import datatypes, wire
from onnxserve.core.datatypes import DataType
from onnxserve.core.statistics import Duration
from onnxserve.core.types import (
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
from onnxserve.protocols.v2_grpc import wire_size
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

# Which InferTensorContents field carries each datatype (FP16 has none: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class DecodedRequest:
    request: InferenceRequest
    raw: bool  # inputs came as raw_input_contents: answer the same way


def parameters_from_proto(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def parameters_to_proto(params: Mapping[str, Any], into: Any) -> None:
    for key, value in params.items():
        if isinstance(value, bool):
            into[key].bool_param = value
        elif isinstance(value, int):
            into[key].int64_param = value
        elif isinstance(value, float):
            into[key].double_param = value
        else:
            into[key].string_param = str(value)


def decode_infer_request(
    message: pb.ModelInferRequest, raw_contents: Sequence[bytes | memoryview] | None = None
) -> DecodedRequest:
    """``raw_contents``: the request's ``raw_input_contents`` when they were kept apart from ``message``
    (views of the received bytes, which the tensors then view too); None: the message's own."""
    # Each field read from a protobuf message makes a new Python object: every field is read once here.
    model_name = message.model_name
    if not model_name:
        raise InvalidInputError("model_name is empty")
    tensors = message.inputs
    if not tensors:
        raise InvalidInputError("the request has no inputs")
    contents = message.raw_input_contents if raw_contents is None else raw_contents
    raw = len(contents) > 0
    if raw and len(contents) != len(tensors):
        raise InvalidInputError(f"raw_input_contents has {len(contents)} entries for {len(tensors)} inputs")
    inputs = []
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise InvalidInputError(f"inputs[{index}] has no name")
        wire.check_tensor_parameters("input", name, tensor.parameters)
        dtype = datatypes.from_v2(tensor.datatype, where=f"input {name!r}")
        shape = wire.request_shape(name, tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input {name!r} carries contents while the request uses raw_input_contents; use one form"
                )
            inputs.append(wire.from_raw(name, dtype, shape, contents[index]))
        else:
            inputs.append(_from_contents(name, dtype, shape, tensor.contents))
    wire.check_request_bytes(inputs)
    outputs = message.outputs
    for output in outputs:
        wire.check_tensor_parameters("output", output.name, output.parameters)
    parameters = message.parameters
    request = InferenceRequest(
        model_name=model_name,
        model_version=message.model_version or None,
        id=message.id or None,
        inputs=inputs,
        outputs=[o.name for o in outputs] if outputs else None,
        parameters=parameters_from_proto(parameters) if parameters else {},
        protocol="v2_grpc",
    )
    return DecodedRequest(request, raw)


def _from_contents(name: str, dtype: DataType, shape: tuple[int, ...], contents: pb.InferTensorContents) -> Tensor:
    field = CONTENTS_FIELD.get(dtype.v2)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {dtype.v2} data travels only in raw_input_contents")
    values = getattr(contents, field)
    where = f"input {name!r}"
    count = wire.element_count(shape)
    if len(values) != count:
        raise wire.count_error(where, len(values), shape, f"contents.{field}")
    if dtype.is_bytes:
        wire.check_bytes_count(where, count)
        return Tensor(name, dtype, wire.from_values(where, dtype, list(values), shape, wire.raw_leaf))
    return Tensor(name, dtype, wire.from_values(where, dtype, values, shape))


@dataclass
class PlannedResponse:
    """An answer's message with every output's metadata but no values yet, and its exact size on the wire
    once the values are in: known before any value is encoded, so an answer too large is refused unbuilt."""

    message: pb.ModelInferResponse
    size: int
    raw: bool
    values: int  # of ``size``, the bytes of the values (raw bytes, typed values) without the envelope


def plan_infer_response(response: InferenceResponse, raw: bool) -> PlannedResponse:
    """The answer's skeleton and its exact encoded size (vectorised varint lengths for typed integers)."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    parameters_to_proto(response.parameters, message.parameters)
    as_raw = raw or any(t.datatype.v2 not in CONTENTS_FIELD for t in response.outputs)
    size = values = 0
    for tensor in response.outputs:
        out = message.outputs.add(name=tensor.name, datatype=tensor.datatype.v2, shape=list(tensor.shape))
        bare = out.ByteSize()
        if as_raw:
            length = _raw_length(tensor)
            size += wire_size.field_length(_RAW_OUTPUT, length)
            grown = bare
        else:  # typed: the contents field is written even when it holds no values
            length, payload = _contents_length(tensor)
            grown = bare + wire_size.field_length(_CONTENTS, length)
        values += length if as_raw else payload
        size += wire_size.varint_length(grown) - wire_size.varint_length(bare) + grown - bare
    return PlannedResponse(message, message.ByteSize() + size, as_raw, values)


def fill_infer_response(plan: PlannedResponse, response: InferenceResponse) -> pb.ModelInferResponse:
    """The planned message with its values: raw bytes, or typed contents parsed from packed fields that
    numpy encoded (no Python object per element)."""
    message = plan.message
    for out, tensor in zip(message.outputs, response.outputs, strict=True):
        if plan.raw:
            message.raw_output_contents.append(bytes(wire.to_raw(tensor)))
        else:
            out.contents.SetInParent()
            _fill_contents(out.contents, tensor)
    return message


def serialize_infer_response(plan: PlannedResponse, response: InferenceResponse) -> bytes:
    """The planned answer's bytes, ``plan.size`` of them. A raw answer's values are written after the
    skeleton's bytes as its ``raw_output_contents`` fields (the message's last field, which protobuf
    writes last), so each is copied once, not into the message and then again into its bytes."""
    if not plan.raw:
        typed: bytes = fill_infer_response(plan, response).SerializeToString()
        return typed
    parts: list[bytes | memoryview] = [plan.message.SerializeToString()]
    for tensor in response.outputs:
        data = wire.to_raw(tensor)
        parts.append(wire_size.field_header(_RAW_OUTPUT, len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_infer_response(response: InferenceResponse, raw: bool) -> pb.ModelInferResponse:
    return fill_infer_response(plan_infer_response(response, raw), response)


_RAW_OUTPUT = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
_CONTENTS = pb.ModelInferResponse.InferOutputTensor.DESCRIPTOR.fields_by_name["contents"].number
_FIELD_NUMBER = {
    name: pb.InferTensorContents.DESCRIPTOR.fields_by_name[name].number for name in CONTENTS_FIELD.values()
}
_FIXED = {"FP32": ("<f4", 4), "FP64": ("<f8", 8)}


def _raw_length(tensor: Tensor) -> int:
    if not tensor.datatype.is_bytes:
        return tensor.data.size * tensor.datatype.numpy.itemsize
    return sum(4 + len(_item_bytes(item)) for item in tensor.data.flat)


def _item_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode("utf-8")


def _contents_length(tensor: Tensor) -> tuple[int, int]:
    """Bytes of the tensor's ``InferTensorContents`` message, and of the values in it (a packed field's
    payload, without its header)."""
    v2 = tensor.datatype.v2
    number = _FIELD_NUMBER[CONTENTS_FIELD[v2]]
    if not tensor.data.size:
        return 0, 0
    if tensor.datatype.is_bytes:  # repeated bytes: one field per element
        tag = wire_size.varint_length(number << 3)
        length = sum(tag + wire_size.varint_length(len(b)) + len(b) for b in (_item_bytes(i) for i in tensor.data.flat))
        return length, length
    payload = tensor.data.size * _FIXED[v2][1] if v2 in _FIXED else wire_size.varints_length(tensor.data)
    return wire_size.field_length(number, payload), payload


def _fill_contents(contents: pb.InferTensorContents, tensor: Tensor) -> None:
    v2 = tensor.datatype.v2
    field = CONTENTS_FIELD[v2]
    if not tensor.data.size:
        return
    if tensor.datatype.is_bytes:
        contents.bytes_contents.extend(_item_bytes(i) for i in tensor.data.flat)
        return
    number = _FIELD_NUMBER[field]
    if v2 in _FIXED:
        parts = wire_size.packed_fixed(number, tensor.data, _FIXED[v2][0])
    else:
        parts = wire_size.packed_varints(number, tensor.data)
    for part in parts:
        contents.MergeFromString(part)


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype.v2, shape=list(spec.shape))


def encode_model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=list(meta.versions),
        platform=meta.platform,
        inputs=[_tensor_metadata(s) for s in meta.inputs],
        outputs=[_tensor_metadata(s) for s in meta.outputs],
    )


def encode_server_metadata(meta: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=list(meta.extensions))


def encode_model_configuration(config: ModelConfiguration) -> pb.ModelConfigResponse:
    def dtype(spec: TensorSpec) -> str:
        return spec.datatype.triton_config  # protobuf accepts an enum value by its name

    return pb.ModelConfigResponse(
        config=pb.ModelConfig(
            name=config.name,
            platform=config.platform,
            backend="onnxruntime",
            max_batch_size=config.max_batch_size,
            input=[pb.ModelInput(name=s.name, data_type=dtype(s), dims=list(s.shape)) for s in config.inputs],
            output=[pb.ModelOutput(name=s.name, data_type=dtype(s), dims=list(s.shape)) for s in config.outputs],
        )
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def encode_statistics(stats: list[VersionStatistics]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=s.name,
                version=s.version,
                last_inference=s.statistics.last_inference_ms,
                inference_count=s.statistics.inference_count,
                execution_count=s.statistics.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(s.statistics.success),
                    fail=_duration(s.statistics.fail),
                    queue=_duration(s.statistics.queue),
                    compute_input=_duration(s.statistics.compute.input),
                    compute_infer=_duration(s.statistics.compute.infer),
                    compute_output=_duration(s.statistics.compute.output),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=b.batch_size,
                        compute_input=_duration(b.compute.input),
                        compute_infer=_duration(b.compute.infer),
                        compute_output=_duration(b.compute.output),
                    )
                    for b in s.statistics.batches
                ],
            )
            for s in stats
        ]
    )
