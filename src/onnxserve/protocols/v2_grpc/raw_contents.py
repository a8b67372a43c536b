"""A large ModelInferRequest parsed without copying its raw tensor bytes.

protobuf (upb) copies every ``bytes`` field while it parses a message, and makes a new Python ``bytes``
each time such a field is read: a 60 MiB ``raw_input_contents`` entry cost three times its size (the
received bytes, the message's copy, the bytes numpy viewed) for as long as its request lived. Here the
message's top-level fields are walked (their tags and lengths only), each ``raw_input_contents`` entry is
kept as a view of the received bytes, and only the other fields (names, shapes, parameters: small) go
to protobuf. The input tensors then view the received bytes: the request costs its own size.

Small messages are parsed whole (the walk would cost more than the copies it saves), and so is any
message the walk does not understand (a wrong wire type, a length past the end: protobuf names the
error) or one with more top-level fields than a request can sensibly have (parsing them is protobuf's
work, in C, not a Python loop's).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxserve.protocols.entry_count import MAX_ENTRIES
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

SPLIT_BYTES = 256 * 1024
"""Messages from this size on have their raw contents kept as views; smaller ones are parsed whole."""

MAX_TOP_FIELDS = 4 * MAX_ENTRIES
"""Top-level fields walked at most (inputs, their raw contents, outputs and parameters fit); past this
the message is parsed whole."""

_RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_LENGTH_DELIMITED = 2


@dataclass
class SplitMessage:
    """A ModelInferRequest's wire bytes in two parts."""

    rest: bytes
    """Every field but ``raw_input_contents``, for protobuf to parse."""
    raw: list[memoryview]
    """The ``raw_input_contents`` entries, in order: views of the received bytes."""


class _Unsplit(Exception):
    """The walk stops: the message is parsed whole."""


def _varint(data: bytes, offset: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while offset < end:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            break
    raise _Unsplit


def split(data: bytes) -> SplitMessage | None:
    """``data`` (a ModelInferRequest) with its raw contents apart; None: parse it whole (small, no raw
    contents, or not walked, see the module's docstring)."""
    if len(data) < SPLIT_BYTES:
        return None
    try:
        return _split(data)
    except _Unsplit:
        return None


def _split(data: bytes) -> SplitMessage | None:
    view = memoryview(data)
    end = len(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    kept_from = 0  # where the current run of other fields started
    offset = fields = 0
    while offset < end:
        fields += 1
        if fields > MAX_TOP_FIELDS:
            raise _Unsplit
        field_start = offset
        key, offset = _varint(data, offset, end)
        kind = key & 7
        if kind == 0:
            _, offset = _varint(data, offset, end)
        elif kind == 1:
            offset += 8
        elif kind == 5:
            offset += 4
        elif kind == _LENGTH_DELIMITED:
            size, offset = _varint(data, offset, end)
            if offset + size > end:
                raise _Unsplit
            if key >> 3 == _RAW_INPUT_CONTENTS:
                if field_start > kept_from:
                    rest.append(view[kept_from:field_start])
                raw.append(view[offset : offset + size])
                kept_from = offset + size
            offset += size
        else:
            raise _Unsplit
        if offset > end:
            raise _Unsplit
    if not raw:
        return None
    if kept_from < end:
        rest.append(view[kept_from:end])
    return SplitMessage(b"".join(rest), raw)
