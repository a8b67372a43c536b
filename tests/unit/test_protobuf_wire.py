"""The protobuf wire walk (``core.protobuf_wire``) against what protobuf itself writes and accepts."""

from __future__ import annotations

import pytest

from onnxserve.core import protobuf_wire
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            return bytes(out + bytes([byte]))
        out.append(byte | 0x80)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _group(number: int, inside: bytes = b"") -> bytes:
    return _tag(number, protobuf_wire.START_GROUP) + inside + _tag(number, protobuf_wire.END_GROUP)


def test_the_walk_finds_every_field_protobuf_wrote_where_protobuf_put_it() -> None:
    request = pb.ModelInferRequest(model_name="m", model_version="3", id="x" * 300)
    request.inputs.add(name="a", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend([1.0] * 4)
    request.raw_input_contents.append(b"\x00" * 1000)
    data = request.SerializeToString()
    walked = list(protobuf_wire.fields(data, 0, len(data)))
    assert [(number, wire_type) for number, wire_type, *_ in walked] == [(1, 2), (2, 2), (3, 2), (5, 2), (7, 2)]
    assert walked[0][4] == walked[1][2]  # each field ends where the next one's tag starts
    assert walked[-1][4] == len(data)
    _, _, _, start, end = walked[2]
    assert bytes(data[start:end]) == b"x" * 300
    _, _, _, start, end = walked[3]
    tensor = pb.ModelInferRequest.InferInputTensor.FromString(data[start:end])
    assert tensor.name == "a"
    assert list(tensor.shape) == [2, 2]


def test_a_group_is_one_field_and_what_follows_it_is_found() -> None:
    """protobuf keeps an unknown group (it parses), so the walk must step over it, nested groups included."""
    inner = _tag(1, protobuf_wire.VARINT) + _varint(300) + _group(4, _tag(2, 2) + _varint(1) + b"z")
    data = _group(99, inner) + pb.ModelInferRequest(model_name="m").SerializeToString()
    assert pb.ModelInferRequest.FromString(data).model_name == "m"  # protobuf takes it
    walked = list(protobuf_wire.fields(data, 0, len(data)))
    assert [(number, wire_type) for number, wire_type, *_ in walked] == [(99, protobuf_wire.START_GROUP), (1, 2)]
    assert walked[0][4] == len(_group(99, inner))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_tag(1, 2) + _varint(10) + b"abc", "runs past its end"),
        (b"\x80" * 11, "longer than 10 bytes"),
        (b"\x80", "ends inside a number"),
        (_tag(0, 0) + b"\x00", "field number 0"),
        (_tag(1, 6), "wire type 6"),
        (_tag(5, protobuf_wire.END_GROUP), "never started"),
        (_tag(5, protobuf_wire.START_GROUP) + _tag(1, 0) + b"\x01", "never ends"),
        (_tag(5, protobuf_wire.START_GROUP) + _tag(6, protobuf_wire.END_GROUP), "under another number"),
        (_tag(5, protobuf_wire.START_GROUP) * 101 + _tag(5, protobuf_wire.END_GROUP) * 101, "deeper than 100"),
    ],
    ids=["length", "long-number", "cut-number", "number-0", "wire-type", "stray-end", "open-group", "crossed", "deep"],
)
def test_what_protobuf_refuses_the_walk_refuses_too(data: bytes, words: str) -> None:
    with pytest.raises(Exception) as parsed:  # noqa: PT011 - protobuf's own DecodeError
        pb.ModelInferRequest.FromString(data)
    assert "Error parsing message" in str(parsed.value)
    with pytest.raises(protobuf_wire.MalformedMessage, match=words):
        list(protobuf_wire.fields(data, 0, len(data)))


def test_a_budget_counts_every_tag_read_groups_inside_included() -> None:
    data = _group(99, _tag(1, 0) + b"\x00") * 10  # 10 fields, 30 tags
    assert len(list(protobuf_wire.fields(data, 0, len(data), protobuf_wire.FieldBudget(30)))) == 10
    with pytest.raises(protobuf_wire.TooManyFields):
        list(protobuf_wire.fields(data, 0, len(data), protobuf_wire.FieldBudget(29)))
