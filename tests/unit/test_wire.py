"""The one wire codec (core/wire.py): shape, count, kind and range checks, zero copy, and the gRPC flood walk."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from onnxserve.core import datatypes, wire
from onnxserve.core.types import Tensor
from onnxserve.errors import InvalidInputError
from onnxserve.protocols import offload
from onnxserve.protocols.v2_grpc import element_count, servicer
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.protocols.v2_rest import codec as v2_codec
from protobuf_fields import field

FP32 = datatypes.from_v2("FP32")
UINT8 = datatypes.from_v2("UINT8")
BYTES = datatypes.from_v2("BYTES")


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([0, 2**62], "too many elements"),
        ([2**62, 0], "too many elements"),
        ([0, 2**40, 2**40], "too many elements"),
        ([2**21, 2**20], "too many elements"),
        ([1, -1], "negative dimension"),
        ([1] * 33, "33 dimensions"),
        ([1.5], "list of integers"),
        ([True], "list of integers"),
    ],
    ids=str,
)
def test_request_shape_refuses_absurd_shapes(shape: list[Any], words: str) -> None:
    with pytest.raises(InvalidInputError, match=words) as caught:
        wire.request_shape("x", shape)
    assert caught.value.message.startswith("input 'x': ")


@pytest.mark.parametrize("shape", [[], [0], [0, 5], [2**20, 2**20], [1] * 32])
def test_request_shape_keeps_sensible_shapes(shape: list[int]) -> None:
    assert wire.request_shape("x", shape) == tuple(shape)


def test_raw_input_is_a_view_of_the_received_buffer() -> None:
    values = np.arange(12, dtype="<f4")
    body = bytearray(b"HEAD" + values.tobytes())
    view = memoryview(body)[4:]
    tensor = wire.from_raw("x", FP32, (3, 4), view)
    assert np.shares_memory(tensor.data, np.frombuffer(body, dtype=np.uint8))
    assert tensor.data.tolist() == values.reshape(3, 4).tolist()


def test_misaligned_raw_input_is_copied_aligned() -> None:
    body = b"H" + np.arange(4, dtype="<f4").tobytes()
    tensor = wire.from_raw("x", FP32, (4,), memoryview(body)[1:])
    assert tensor.data.flags.aligned
    assert tensor.data.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_raw_output_is_a_view_of_the_output_array() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = wire.to_raw(Tensor("y", FP32, array))
    assert isinstance(raw, memoryview)
    assert bytes(raw) == array.tobytes()
    array[0, 0] = 42.0
    assert np.frombuffer(raw, dtype=np.float32)[0] == 42.0


def test_bytes_tensor_over_the_element_cap_is_refused_before_parsing() -> None:
    count = wire.MAX_BYTES_ELEMENTS + 1
    with pytest.raises(InvalidInputError, match=f"at most {wire.MAX_BYTES_ELEMENTS}"):
        wire.from_raw("text", BYTES, (count,), b"\0\0\0\0" * count)
    with pytest.raises(InvalidInputError, match=f"at most {wire.MAX_BYTES_ELEMENTS}"):
        wire.from_values("input 'text'", BYTES, [""] * count, (count,))


def test_bytes_split_stops_at_the_first_element_too_many() -> None:
    raw = struct.pack("<I", 1) + b"a" + b"\0\0\0\0" * 1000
    with pytest.raises(InvalidInputError, match=r"more than 1 elements but shape \[1\] needs 1"):
        wire.from_raw("text", BYTES, (1,), raw)


def test_bytes_length_that_runs_past_the_data_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="runs past the data"):
        wire.from_raw("text", BYTES, (1,), struct.pack("<I", 2**32 - 1) + b"abc")


def test_raw_bytes_round_trip_converts_each_element_once() -> None:
    array = np.array([b"a", b"", "é".encode()], dtype=object)
    raw = wire.to_raw(Tensor("t", BYTES, array))
    back = wire.from_raw("t", BYTES, (3,), raw)
    assert back.data.tolist() == array.tolist()


@pytest.mark.parametrize(
    ("dtype", "values", "words"),
    [
        (UINT8, [0, 256], "value 256 is out of range for UINT8"),
        (UINT8, [0, -1], "value -1 is out of range for UINT8"),
        (datatypes.from_v2("UINT64"), [2**64], "value 18446744073709551616 is out of range for UINT64"),
        (FP32, [True, False], "datatype FP32 needs numbers, but data holds booleans"),
        (datatypes.from_v2("INT32"), [1.5, 2], "datatype INT32 needs integers, but data holds non-integer numbers"),
        (FP32, [[1.0], [1.0, 2.0]], "evenly nested"),
        (BYTES, ["a", 3], "BYTES data must be strings, found a number"),
    ],
)
def test_values_are_checked_once_with_one_message(dtype: datatypes.DataType, values: Any, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words) as caught:
        wire.from_values("input 'x'", dtype, values)
    assert caught.value.message.startswith("input 'x': ")


def test_values_take_the_declared_shape_or_their_nesting() -> None:
    assert wire.from_values("input 'x'", FP32, [1, 2, 3, 4], (2, 2)).shape == (2, 2)
    assert wire.from_values("input 'x'", FP32, [[1, 2], [3, 4]]).shape == (2, 2)
    assert wire.from_values("input 'x'", BYTES, [["a"], ["b"]]).tolist() == [[b"a"], [b"b"]]
    with pytest.raises(InvalidInputError, match=r"data has 3 elements but shape \[2, 2\] needs 4"):
        wire.from_values("input 'x'", FP32, [1, 2, 3], (2, 2))


def test_float64_values_already_in_their_dtype_are_not_copied() -> None:
    values = np.arange(4, dtype=np.float64)
    assert wire.from_values("input 'x'", datatypes.from_v2("FP64"), values) is values


def _grpc_bytes(count: int, shape: list[int]) -> bytes:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=shape)
    tensor.contents.bytes_contents.extend([b""] * count)
    return request.SerializeToString()


def test_grpc_walk_refuses_a_bytes_contents_flood_unparsed() -> None:
    data = _grpc_bytes(wire.MAX_BYTES_ELEMENTS + 1, [1])
    with pytest.raises(InvalidInputError, match=r"input 'text': contents\.bytes_contents brings the request's"):
        element_count.check_unparsed(data)


def test_grpc_walk_counts_elements_of_any_length_between_other_fields() -> None:
    """Elements of lengths past one byte's worth, with other fields between them (the fast step over elements
    gives way to the general walk for those), all counted; an element running past its message is left to
    the parser to name."""
    long, empty = field(8, b"x" * 300), field(8, b"")
    unknown = bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 0])
    half = wire.MAX_BYTES_ELEMENTS // 2
    contents = long * 1000 + unknown + empty * (half - 1000) + field(6, b"\x00" * 8) + empty * (half + 1)
    data = field(1, b"m") + field(5, field(1, b"text") + field(5, contents))
    assert len(pb.ModelInferRequest.FromString(data).inputs[0].contents.bytes_contents) == 2 * half + 1
    with pytest.raises(InvalidInputError, match=r"input 'text': contents\.bytes_contents brings the request's"):
        element_count.check_unparsed(data)
    past = field(1, b"m") + field(5, field(1, b"text") + field(5, empty * 200_000 + b"\x42\x05"))
    element_count.check_unparsed(past)  # the last element claims 5 bytes past its message's end


def test_grpc_walk_counts_the_bytes_contents_of_all_inputs_together() -> None:
    half = wire.MAX_BYTES_ELEMENTS // 2
    request = pb.ModelInferRequest(model_name="m")
    for name, count in (("a", half), ("b", half)):
        request.inputs.add(name=name, datatype="BYTES", shape=[count]).contents.bytes_contents.extend([b""] * count)
    element_count.check_unparsed(request.SerializeToString())  # at the limit together
    request.inputs.add(name="c", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"")
    with pytest.raises(InvalidInputError, match=r"input 'c': .* at most 1048576 are allowed in one request"):
        element_count.check_unparsed(request.SerializeToString())


def test_a_request_holds_at_most_the_bytes_limit_over_all_its_inputs() -> None:
    half = wire.MAX_BYTES_ELEMENTS // 2
    texts = [Tensor(n, BYTES, np.full(half, b"", dtype=object)) for n in "ab"]
    numbers = Tensor("x", FP32, np.zeros(wire.MAX_BYTES_ELEMENTS, dtype=np.float32))
    wire.check_request_bytes([*texts, numbers])  # numbers do not count
    with pytest.raises(InvalidInputError, match=f"hold {2 * half + 1} BYTES elements together; at most"):
        wire.check_request_bytes([*texts, Tensor("c", BYTES, np.array([b""], dtype=object))])


def test_grpc_walk_lets_sensible_and_malformed_messages_through() -> None:
    element_count.check_unparsed(_grpc_bytes(wire.MAX_BYTES_ELEMENTS, [wire.MAX_BYTES_ELEMENTS]))
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[4]).contents.fp32_contents.extend([0.0] * 10**6)
    element_count.check_unparsed(request.SerializeToString())
    element_count.check_unparsed(b"\xff" * (3 * wire.MAX_BYTES_ELEMENTS))  # the parser will name it


def test_grpc_walk_refuses_a_flood_of_entries() -> None:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(element_count.MAX_FIELDS + 1):
        request.outputs.add(name="y" * 40)
    with pytest.raises(InvalidInputError, match="more than 65536 entries"):
        element_count.check_unparsed(request.SerializeToString())


def _add_parameters(holder: Any, count: int) -> None:
    """``count`` bool parameters p0, p1, ... in ``holder.parameters`` (a request or one of its tensors)."""
    for i in range(count):
        holder.parameters[f"p{i}"].bool_param = True


@pytest.mark.parametrize("where", ["request", "input", "output"])
def test_a_message_holds_at_most_65536_parameters_in_one_map(where: str) -> None:
    """Parameters are counted before parsing (the message is walked), or once parsed for a message too small
    to walk (outside attack rt21: 150,000 parameters in 1.9 MB were accepted)."""
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1])
    output = request.outputs.add(name="y")
    holder = {"request": request, "input": tensor, "output": output}[where]
    _add_parameters(holder, element_count.MAX_FIELDS)
    data = request.SerializeToString()
    assert servicer.parse(pb.ModelInferRequest, data) == request  # at the limit
    _add_parameters(holder, 70_000)
    data = request.SerializeToString()
    with pytest.raises(InvalidInputError, match="the request holds more than 65536 entries"):
        element_count.check_entries(request)
    with pytest.raises(InvalidInputError, match="the request holds more than 65536 entries"):
        servicer.parse(pb.ModelInferRequest, data)
    with pytest.raises(InvalidInputError, match="the request holds more than 65536 entries"):
        servicer.parse_inference(data)


EMPTY_ENTRY = {"request": field(4, b""), "input": field(4, b""), "output": field(2, b"")}
"""A map entry of an empty key and no value, as a field of the request, an input or an output."""


@pytest.mark.parametrize("where", ["request", "input", "output"])
def test_grpc_walk_counts_map_entries_as_sent_a_repeated_key_too(where: str) -> None:
    """140,000 entries of one empty key: protobuf keeps one, after building each (31 million, in 62 MB, took
    1.7 s and 1.2 GB, kept after the call: outside attack rt54), so the count once parsed never saw them;
    the walk counts them as sent, before parsing."""
    flood = EMPTY_ENTRY[where] * 140_000  # 280 KB: walked
    head = field(1, b"m")
    data = {
        "request": head + flood,
        "input": head + field(5, field(1, b"x") + flood),
        "output": head + field(6, field(1, b"y") + flood),
    }[where]
    parsed = pb.ModelInferRequest.FromString(data)
    element_count.check_entries(parsed)  # one entry left once parsed
    with pytest.raises(InvalidInputError, match="the request holds more than 65536 entries"):
        element_count.check_unparsed(data)


def test_grpc_walk_counts_the_entries_of_all_lists_and_maps_together() -> None:
    """Each map within its 65,536, together past ``MAX_ALL_ENTRIES``: 100 outputs of 60,000 parameters (47.6
    MB) took seconds and 4 GB a call to parse (outside attack rt54); refused unparsed."""
    output = field(6, field(1, b"y") + EMPTY_ENTRY["output"] * 60_000)
    per_output = 60_001  # the output and its parameters
    outputs = element_count.MAX_ALL_ENTRIES // per_output
    element_count.check_unparsed(field(1, b"m") + output * outputs)
    with pytest.raises(InvalidInputError, match=r"more than 262144 entries in its lists and parameter maps together"):
        element_count.check_unparsed(field(1, b"m") + output * (outputs + 1))


def test_grpc_walk_refuses_a_group_before_walking_it() -> None:
    """protobuf parses (and keeps) an unknown group field, and the walk would read every field inside it: 557,000
    empty groups (1.1 MB, 1.1 KB gzipped) took it up to 1.8 s (outside attack rt55). No KServe message has a
    group: refused at its start."""
    group = bytes([99 << 3 & 0x7F | 0x80 | 3, 99 >> 4, 99 << 3 & 0x7F | 0x80 | 4, 99 >> 4])
    data = group * 300_000 + _grpc_bytes(1, [1])
    assert len(pb.ModelInferRequest.FromString(data).inputs) == 1
    with pytest.raises(InvalidInputError, match=r"holds a group \(protobuf wire type 3, field 99\)"):
        element_count.check_unparsed(data)


def test_grpc_walk_refuses_a_flood_of_tiny_fields_it_would_take_long_to_walk() -> None:
    """Two-byte unknown fields parse in no time but take the walk half a microsecond each (a million: 0.6 s,
    outside attack rt55): past ``MAX_OTHER_FIELDS`` besides entries and BYTES elements, refused; a name an
    output, 65,535 of them, are within it."""
    junk = bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 0]) * (element_count.MAX_OTHER_FIELDS + 1)
    data = junk + _grpc_bytes(1, [1])
    assert len(pb.ModelInferRequest.FromString(data).inputs) == 1
    with pytest.raises(InvalidInputError, match=r"more than 262144 protobuf fields besides its list entries"):
        element_count.check_unparsed(data)
    names = [field(6, field(1, b"y%d" % k)) for k in range(element_count.MAX_FIELDS - 1)]
    element_count.check_unparsed(field(1, b"m") + b"".join(names))


def test_grpc_walk_reads_at_most_its_budget_of_fields() -> None:
    """Every BYTES element allowed, and as many parameters as fit in one map: past the walk's budget of fields
    of every kind, refused."""
    data = _grpc_bytes(wire.MAX_BYTES_ELEMENTS, [wire.MAX_BYTES_ELEMENTS])
    element_count.check_unparsed(data)
    flood = data + field(6, field(1, b"y") + EMPTY_ENTRY["output"] * 40_000) * 2
    with pytest.raises(InvalidInputError, match=r"more than 1114112 protobuf fields; send repeated numbers packed"):
        element_count.check_unparsed(flood)


def test_grpc_walk_refuses_a_packed_shape_of_too_many_dimensions() -> None:
    """A packed shape is one field to the walk, and protobuf unpacks each of its numbers: 66 million one-byte
    dimensions (66 MB) became gigabytes before the rank was checked (outside attack rt56). A packed shape of
    more bytes than ``MAX_RANK`` numbers can take is refused unparsed."""
    dims = b"\x00" * 300_000
    data = field(1, b"m") + field(5, field(1, b"x") + field(2, b"INT64") + field(3, dims))
    with pytest.raises(InvalidInputError, match="input 'x': shape has more than 32 dimensions"):
        element_count.check_unparsed(data)
    rank_32 = field(5, field(1, b"x") + field(3, b"\x01" * 32))
    element_count.check_unparsed(field(1, b"m") + rank_32 + field(7, bytes(300_000)))  # walked, and fine


def test_grpc_walk_counts_every_piece_of_a_shape_together() -> None:
    """protobuf joins the pieces of a repeated field: 200,000 packed pieces of 320 bytes each (64 MB) made a
    shape of 64 million dimensions, 512 MB once parsed (outside attack rt57). The pieces, packed or one
    dimension each, count together."""
    piece = field(3, b"\x00" * element_count.MAX_SHAPE_BYTES)
    pad = field(7, bytes(300_000))  # walked: past UNWALKED_BYTES
    data = field(1, b"m") + field(5, field(1, b"x") + piece * 2) + pad
    with pytest.raises(InvalidInputError, match="input 'x': shape has more than 32 dimensions"):
        element_count.check_unparsed(data)
    unpacked = b"\x18\x01" * (element_count.MAX_SHAPE_BYTES - 1)  # dimensions sent one a field (wire type 0)
    data = field(1, b"m") + field(5, field(1, b"x") + unpacked + field(3, b"\x01\x01")) + pad
    with pytest.raises(InvalidInputError, match="input 'x': shape has more than 32 dimensions"):
        element_count.check_unparsed(data)
    halves = field(3, b"\x01" * 16) * 2  # 32 dimensions in two pieces: fine
    element_count.check_unparsed(field(1, b"m") + field(5, field(1, b"x") + halves) + pad)
    request = pb.ModelInferRequest.FromString(field(5, field(1, b"x") + halves))
    assert list(request.inputs[0].shape) == [1] * 32


def test_grpc_walk_counts_the_shapes_of_all_inputs_together() -> None:
    """65,536 inputs each with a 320-byte shape (22 MB) became 21 million dimensions once parsed (outside attack
    rt58): every input's shape counts towards one bound for the request."""
    shape = field(3, b"\x00" * element_count.MAX_SHAPE_BYTES)
    count = element_count.MAX_ALL_SHAPE_BYTES // element_count.MAX_SHAPE_BYTES
    inputs = field(5, field(1, b"x") + shape) * count
    element_count.check_unparsed(field(1, b"m") + inputs)  # 262,080 bytes: within the bound
    with pytest.raises(InvalidInputError, match=r"the request's shapes take more than 262144 bytes together"):
        element_count.check_unparsed(field(1, b"m") + inputs + field(5, field(1, b"y") + field(3, b"\x01" * 100)))


def test_grpc_walk_counts_numbers_packed_as_varints() -> None:
    """One-byte zeros in ``int64_contents`` become 8 bytes each, and again in the copy the codec makes: past
    ``MAX_PACKED_NUMBERS`` in all, refused unparsed; numbers of several bytes count once each."""
    limit = element_count.MAX_PACKED_NUMBERS
    contents = field(3, b"\x00" * (limit // 2)) + field(2, b"\x81\x01" * (limit // 2))  # int64, then int
    data = field(1, b"m") + field(5, field(1, b"x") + field(5, contents))
    element_count.check_unparsed(data)  # at the limit: 8 MB of bytes, 4 Mi numbers
    more = field(1, b"m") + field(5, field(1, b"x") + field(5, contents + field(4, b"\x00")))
    with pytest.raises(InvalidInputError, match=r"input 'x': its contents bring .* to more than 4194304"):
        element_count.check_unparsed(more)


def test_a_grpc_request_of_many_bytes_elements_is_decoded_off_the_event_loop() -> None:
    """131,000 empty elements in 262 KB (342 bytes of gzip) were decoded on the event loop, 30 to 36 ms a message,
    and four streams of them held new gRPC calls past 5 s (outside attack rt57): each element counts as work."""
    many = pb.ModelInferRequest(model_name="m")
    many.inputs.add(name="text", datatype="BYTES", shape=[131_000]).contents.bytes_contents.extend([b""] * 131_000)
    assert servicer.decode_work(many, many.ByteSize()) >= offload.INLINE_BYTES
    raw = pb.ModelInferRequest(model_name="m")  # the same elements as raw_input_contents (outside attack rt58)
    raw.inputs.add(name="text", datatype="BYTES", shape=[65_500])
    raw.raw_input_contents.append(bytes(4 * 65_500))
    assert servicer.decode_work(raw, raw.ByteSize()) >= offload.INLINE_BYTES
    numbers = pb.ModelInferRequest(model_name="m")  # raw numbers are only viewed
    numbers.inputs.add(name="x", datatype="FP32", shape=[65_500])
    numbers.raw_input_contents.append(bytes(4 * 65_500))
    assert servicer.decode_work(numbers, numbers.ByteSize()) < offload.INLINE_BYTES
    few = pb.ModelInferRequest(model_name="m")
    few.inputs.add(name="text", datatype="BYTES", shape=[3]).contents.bytes_contents.extend([b"a", b"b", b"c"])
    assert servicer.decode_work(few, few.ByteSize()) < offload.INLINE_BYTES


def test_a_binary_v2_body_of_many_bytes_elements_is_decoded_off_the_event_loop() -> None:
    """Each length-prefixed element counts as work (at most as many as 4-byte prefixes fit), moving a body of
    many small elements to the codec threads; only a body's size sends it to a worker process."""
    header = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[65000],"parameters":{"binary_data_size":260000}}]}'
    body = header + b"\0" * 260_000  # 65,000 empty elements: 260 KB, under INLINE_BYTES by size
    assert len(body) < offload.INLINE_BYTES
    assert offload.INLINE_BYTES <= v2_codec.decode_work(body, len(header)) < offload.PROCESS_BYTES
    texts = header + (struct.pack("<I", 96) + b"x" * 96) * 100  # 100 texts of 96 bytes: 10 KB
    assert v2_codec.decode_work(texts, len(header)) < offload.INLINE_BYTES
    escaped = header.replace(b"BYTES", b"BYT\\u0045S") + b"\0" * 260_000  # the same type, written with an escape
    assert v2_codec.decode_work(escaped, len(header) + 5) >= offload.INLINE_BYTES  # (outside attack rt58)
    numbers = header.replace(b"BYTES", b"FP32") + bytes(1_000_000)
    assert v2_codec.decode_work(numbers, len(header)) == len(header)  # raw numbers are only viewed
