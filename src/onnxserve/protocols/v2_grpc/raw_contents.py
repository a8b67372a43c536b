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

from onnxserve.core import protobuf_wire
from onnxserve.protocols.entry_count import MAX_ENTRIES
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

SPLIT_BYTES = 256 * 1024
"""Messages from this size on have their raw contents kept as views; smaller ones are parsed whole."""

MAX_TOP_FIELDS = 4 * MAX_ENTRIES
"""Fields walked at most (``core.protobuf_wire``: inputs, their raw contents, outputs and parameters
fit); past this the message is parsed whole."""

_RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


@dataclass
class SplitMessage:
    """A ModelInferRequest's wire bytes in two parts."""

    rest: bytes
    """Every field but ``raw_input_contents``, for protobuf to parse."""
    raw: list[memoryview]
    """The ``raw_input_contents`` entries, in order: views of the received bytes."""


def split(data: bytes) -> SplitMessage | None:
    """``data`` (a ModelInferRequest) with its raw contents apart; None: parse it whole (small, no raw
    contents, or not walked, see the module's docstring)."""
    if len(data) < SPLIT_BYTES:
        return None
    try:
        return _split(data)
    except (protobuf_wire.MalformedMessage, protobuf_wire.TooManyFields):
        return None


def _split(data: bytes) -> SplitMessage | None:
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    kept_from = 0  # where the current run of other fields started
    budget = protobuf_wire.FieldBudget(MAX_TOP_FIELDS)
    for number, wire_type, tag_start, value_start, value_end in protobuf_wire.fields(view, 0, len(data), budget):
        if number == _RAW_INPUT_CONTENTS and wire_type == protobuf_wire.LENGTH_DELIMITED:
            if tag_start > kept_from:
                rest.append(view[kept_from:tag_start])
            raw.append(view[value_start:value_end])
            kept_from = value_end
    if not raw:
        return None
    if kept_from < len(data):
        rest.append(view[kept_from:])
    return SplitMessage(b"".join(rest), raw)
