"""A bounded look at a ModelInferRequest's wire bytes before protobuf parses them.

Parsing builds one object per ``bytes_contents`` element, in C, holding the interpreter lock the whole
time: 30 million empty elements (a 60 MB message) take seconds and gigabytes. This walk reads only the
field tags and lengths on the path ``inputs`` (5) -> ``contents`` (5) -> ``bytes_contents`` (8),
counts the elements of all inputs together, and stops as soon as they pass the limit, so a flood is
refused after at most that many steps; a message of more fields of any kind than a request needs is
refused too (:data:`MAX_WALKED_FIELDS`). Anything malformed is left for the real parser to name
(``core.protobuf_wire`` walks what the parser accepts, groups included, so no message the parser takes
escapes the count).
"""

from __future__ import annotations

from collections.abc import Iterator

from onnxserve.core import protobuf_wire, wire
from onnxserve.errors import InvalidInputError
from onnxserve.protocols.entry_count import MAX_ENTRIES
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

_INPUTS = 5  # ModelInferRequest.inputs
_NAME = 1  # InferInputTensor.name
_CONTENTS = 5  # InferInputTensor.contents
_BYTES_CONTENTS = 8  # InferTensorContents.bytes_contents
MAX_FIELDS = MAX_ENTRIES
"""The most length-delimited entries a request or one of its inputs may hold (inputs, outputs, parameters...)."""


MAX_WALKED_FIELDS = wire.MAX_BYTES_ELEMENTS + MAX_FIELDS
"""The most protobuf fields the walk reads in one message, of every kind together: every BYTES element
one request may hold, plus as many others. A message of more (millions of tiny unknown fields, or numbers
of a repeated field sent unpacked) is refused before the walk, about a microsecond per field in Python,
takes longer than protobuf's parse of it would."""


def _entries(
    data: memoryview, start: int, end: int, budget: protobuf_wire.FieldBudget
) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in ``data[start:end]``; others skipped."""
    for number, wire_type, _, value_start, value_end in protobuf_wire.fields(data, start, end, budget):
        if wire_type == protobuf_wire.LENGTH_DELIMITED:
            yield number, value_start, value_end


def _too_many_entries() -> InvalidInputError:
    return InvalidInputError(
        f"the request holds more than {MAX_FIELDS} entries (inputs, outputs, parameters, contents)"
    )


def _fields(data: memoryview, start: int, end: int, budget: protobuf_wire.FieldBudget) -> list[tuple[int, int, int]]:
    found = []
    for entry in _entries(data, start, end, budget):
        found.append(entry)
        if len(found) > MAX_FIELDS:
            raise _too_many_entries()
    return found


def check_entries(request: pb.ModelInferRequest) -> None:
    """Refuse a parsed ModelInferRequest whose ``parameters`` (its own, or one tensor's), ``inputs``,
    ``outputs`` or ``raw_input_contents`` hold more than :data:`MAX_FIELDS` entries, as the walk of
    :func:`check_bytes_contents` does for a large message before parsing. A message it does not walk
    (2 MiB at most) still parses in a fraction of a second, but 150,000 parameters in one were
    accepted (outside attack rt21). One ``len`` a list and a tensor."""
    lists = (request.parameters, request.inputs, request.outputs, request.raw_input_contents)
    if max(len(entries) for entries in lists) > MAX_FIELDS:
        raise _too_many_entries()
    for tensors in (request.inputs, request.outputs):
        for tensor in tensors:
            if len(tensor.parameters) > MAX_FIELDS:
                raise _too_many_entries()


def _count_bytes_elements(
    data: memoryview, start: int, end: int, name: str, count: int, budget: protobuf_wire.FieldBudget
) -> int:
    """``count`` plus the ``bytes_contents`` elements in ``data[start:end]``; refused past the limit."""
    for number, _, _ in _entries(data, start, end, budget):
        if number == _BYTES_CONTENTS:
            count += 1
            if count > wire.MAX_BYTES_ELEMENTS:
                raise InvalidInputError(
                    f"input {name!r}: contents.bytes_contents brings the request's inputs to more than "
                    f"{wire.MAX_BYTES_ELEMENTS} BYTES elements; at most {wire.MAX_BYTES_ELEMENTS} are allowed in "
                    "one request"
                )
    return count


def check_bytes_contents(message: bytes) -> None:
    """Refuse a ModelInferRequest whose inputs hold too many ``bytes_contents`` elements together, or more
    than :data:`MAX_WALKED_FIELDS` fields of any kind, unparsed.

    Each element takes at least 2 bytes, so a message under twice the limit is not looked at.
    """
    if len(message) <= 2 * wire.MAX_BYTES_ELEMENTS:
        return
    data = memoryview(message)
    budget = protobuf_wire.FieldBudget(MAX_WALKED_FIELDS)
    count = 0
    try:
        for number, start, end in _fields(data, 0, len(data), budget):
            if number != _INPUTS:
                continue
            fields = _fields(data, start, end, budget)
            name = next((bytes(data[s:e]).decode("utf-8", "replace") for n, s, e in fields if n == _NAME), "")
            for field, s, e in fields:
                if field == _CONTENTS:
                    count = _count_bytes_elements(data, s, e, name, count, budget)
    except protobuf_wire.TooManyFields:
        raise InvalidInputError(
            f"the request holds more than {MAX_WALKED_FIELDS} protobuf fields; send repeated numbers packed (as "
            "protobuf 3 writes them) or as raw_input_contents"
        ) from None
    except protobuf_wire.MalformedMessage:
        return
