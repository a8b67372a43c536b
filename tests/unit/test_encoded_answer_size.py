"""Answers sized before they are encoded: the exact protobuf size of a gRPC answer, bounds on a TF Serving
JSON answer, and the sliced encoders writing what a one-shot encoder writes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from onnxserve.core.datatypes import from_v2
from onnxserve.core.types import InferenceResponse, Tensor
from onnxserve.errors import TooLargeError
from onnxserve.protocols.tfserving_rest import answer
from onnxserve.protocols.tfserving_rest import codec as tfs
from onnxserve.protocols.v2_grpc import codec as grpc_codec
from onnxserve.protocols.v2_grpc import wire_size

RNG = np.random.default_rng(7)


def _values(v2: str, count: int) -> npt.NDArray[Any]:
    dtype = from_v2(v2).numpy
    if v2 == "BOOL":
        return RNG.integers(0, 2, count).astype(bool)
    if v2.startswith("FP"):
        return (RNG.standard_normal(count) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    values = RNG.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
    values[: min(count, 4)] = [info.min, info.max, 0, -1 if info.min else 1][: min(count, 4)]
    return values


NUMERIC = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP32", "FP64"]


@pytest.mark.parametrize("v2", [*NUMERIC, "FP16"])
@pytest.mark.parametrize("count", [0, 1, 7, wire_size.SLICE_ELEMENTS + 3])
@pytest.mark.parametrize("raw", [False, True])
def test_the_grpc_answer_size_is_exact_and_its_values_round_trip(v2: str, count: int, raw: bool) -> None:
    data = _values(v2, count).reshape(1, count)
    text = np.array([b"", "\u00e9".encode(), b"\xff" * 200], dtype=object)
    response = InferenceResponse(
        "m", "1", [Tensor("y", from_v2(v2), data), Tensor("s", from_v2("BYTES"), text)], id="r", parameters={"p": 1}
    )
    plan = grpc_codec.plan_infer_response(response, raw)
    wire = grpc_codec.fill_infer_response(plan, response).SerializeToString()
    assert plan.size == len(wire)
    message = type(plan.message).FromString(wire)
    if plan.raw:
        assert message.raw_output_contents[0] == data.astype(data.dtype.newbyteorder("<")).tobytes()
    else:
        field = grpc_codec.CONTENTS_FIELD[v2]
        assert list(getattr(message.outputs[0].contents, field)) == data.reshape(-1).tolist()
        assert list(message.outputs[1].contents.bytes_contents) == list(text)


@pytest.mark.parametrize("v2", [*NUMERIC, "FP16"])
@pytest.mark.parametrize("raw", [False, True])
def test_a_unary_answer_serialized_directly_is_the_message_protobuf_writes(v2: str, raw: bool) -> None:
    """A raw answer's values are appended after the skeleton's bytes: byte for byte what protobuf writes
    for the filled message, and ``plan.size`` long."""
    data = _values(v2, 7).reshape(7, 1)
    text = np.array([b"", "\u00e9".encode(), b"\xff" * 200], dtype=object)
    outputs = [Tensor("y", from_v2(v2), data), Tensor("s", from_v2("BYTES"), text), Tensor("e", from_v2(v2), data[:0])]
    response = InferenceResponse("m", "1", outputs, id="r", parameters={"truncated": True, "p": 1})
    serialized = grpc_codec.serialize_infer_response(grpc_codec.plan_infer_response(response, raw), response)
    plan = grpc_codec.plan_infer_response(response, raw)
    assert serialized == grpc_codec.fill_infer_response(plan, response).SerializeToString()
    assert len(serialized) == plan.size


def test_negative_typed_integers_take_ten_bytes_each_as_protobuf_writes_them() -> None:
    assert wire_size.varints_length(np.full(1000, -1, dtype=np.int8)) == 10_000
    assert wire_size.varints_length(np.array([0, 127, 128, 2**14, 2**63], dtype=np.uint64)) == 1 + 1 + 2 + 3 + 10


def _one_shot(response: InferenceResponse, rows: bool) -> bytes:
    """The whole document built at once, as the encoder did before it wrote slices."""
    from onnxserve.protocols.tfserving_rest import values

    outputs = {t.name: values.to_json(t.datatype, t.data) for t in response.outputs}
    nonfinite = answer.has_nonfinite(response.outputs)
    if rows and len(outputs) != 1:
        count = response.outputs[0].shape[0]
        doc: Any = {"predictions": [{name: value[i] for name, value in outputs.items()} for i in range(count)]}
    elif len(outputs) == 1:
        doc = {"predictions" if rows else "outputs": next(iter(outputs.values()))}
    else:
        doc = {"outputs": outputs}
    return tfs.dumps(doc, nonfinite)


def _tensors(count: int, nonfinite: bool) -> list[Tensor]:
    floats = _values("FP32", count)
    if nonfinite:
        floats[::5], floats[1::7], floats[2::9] = np.nan, np.inf, -np.inf
    text = np.array([b"t", "\u00e9".encode(), b"\xff\x00"] * (count // 3 + 1), dtype=object)[:count]
    return [
        Tensor("f", from_v2("FP32"), floats),
        Tensor("\u00e9", from_v2("INT64"), _values("INT64", 2 * count).reshape(count, 2)),
        Tensor("b", from_v2("BOOL"), _values("BOOL", count)),
        Tensor("s", from_v2("BYTES"), text),
    ]


@pytest.mark.parametrize("count", [1, 5, answer.SLICE_ELEMENTS + 11])
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("pick", [slice(0, 1), slice(0, 3), slice(0, 4), slice(1, 2)])
def test_tf_serving_answers_in_slices_are_byte_equal_and_within_their_bounds(
    count: int, nonfinite: bool, rows: bool, pick: slice
) -> None:
    response = InferenceResponse("m", "1", _tensors(count, nonfinite)[pick])
    written = tfs.encode_predict(response, rows)
    assert written == _one_shot(response, rows)
    bounds = answer.bounds(response.outputs, rows)
    assert bounds.least <= len(written) <= bounds.most
    assert tfs.predict_size(response, rows) == bounds.most
    if nonfinite and pick.start == 0 and count > 2:
        assert b"NaN" in written
        assert b"-Infinity" in written
    json.loads(written)  # NaN and Infinity as TF Serving writes them, which Python reads


def test_a_json_answer_past_the_limit_is_refused_while_it_is_written() -> None:
    response = InferenceResponse("m", "1", [Tensor("y", from_v2("FP32"), np.full(300_000, -np.inf, np.float32))])
    full = len(tfs.encode_predict(response, False))
    with pytest.raises(TooLargeError, match="more than 1000000 bytes encoded as TF Serving JSON"):
        tfs.encode_predict(response, False, 1_000_000)
    assert len(tfs.encode_predict(response, False, full)) == full


def test_rows_whose_smallest_text_is_over_the_limit_are_refused_before_writing() -> None:
    count = 1_000_000
    ones = Tensor("a", from_v2("UINT8"), np.ones(count, np.uint8))
    response = InferenceResponse("m", "1", [ones, Tensor("b", from_v2("UINT8"), np.ones(count, np.uint8))])
    least = answer.bounds(response.outputs, True).least
    assert least >= count * len('{"a":1,"b":1},') - 1
    with pytest.raises(TooLargeError, match=f"more than {least - 1} bytes"):
        tfs.predict_size(response, True, least - 1)
