"""A bounded look at a ModelInferRequest's wire bytes before protobuf parses them.

Parsing builds an object for each ``bytes_contents`` element, each entry of a list or map (a repeated key
too) and each tensor, in C, holding the interpreter lock the whole time: 30 million empty elements (a 60 MB
message) take seconds and gigabytes, and so do millions of parameters. This walk reads only the field tags
and lengths of the request, its inputs and outputs and their contents, counts the elements of all inputs
together and the entries of every list and map, and stops as soon as they pass the limits, so a flood is
refused after at most that many steps; a message of more fields of any kind than a request needs is
refused too (:data:`MAX_WALKED_FIELDS`). Anything malformed is left for the real parser to name
(``core.protobuf_wire`` walks what the parser accepts, groups included, so no message the parser takes
escapes the count).
"""

from __future__ import annotations

from collections.abc import Iterator

from onnxserve.core import protobuf_wire, wire
from onnxserve.errors import InvalidInputError
from onnxserve.protocols import offload
from onnxserve.protocols.entry_count import MAX_ENTRIES
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

_PARAMETERS = 4  # ModelInferRequest.parameters, InferInputTensor.parameters (maps: one entry a field)
_INPUTS = 5  # ModelInferRequest.inputs
_OUTPUTS = 6  # ModelInferRequest.outputs
_RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
_LISTS = frozenset((_PARAMETERS, _INPUTS, _OUTPUTS, _RAW_INPUT_CONTENTS))
_NAME = 1  # InferInputTensor.name
_CONTENTS = 5  # InferInputTensor.contents
_OUTPUT_PARAMETERS = 2  # InferRequestedOutputTensor.parameters
_BYTES_CONTENTS = 8  # InferTensorContents.bytes_contents
MAX_FIELDS = MAX_ENTRIES
"""The most entries a request's list or map may hold (inputs, outputs, raw_input_contents, the parameters of
the request or of one tensor)."""

MAX_ALL_ENTRIES = 4 * MAX_FIELDS
"""The most entries a request's lists and maps may hold together, each map entry counted as sent (a repeated
key too: protobuf keeps the last, after building every one). protobuf builds an object for each, holding the
interpreter lock: 100 outputs of 60,000 parameters each (47.6 MB) took seconds and 4 GB a call; 31 million
entries of one empty key (62 MB, 60 KB gzipped), 1.7 s and 1.2 GB, and the memory stayed taken after the
call was refused (outside attack rt54: health probes 3 to 10 s, the server at its 6 GiB cap)."""

UNWALKED_BYTES = offload.INLINE_BYTES
"""A message smaller than this (parsed on the event loop: ``offload``) is not walked: a parse of it takes a
few milliseconds and megabytes at most, and its lists are counted once parsed (:func:`check_entries`)."""

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


class _Entries:
    """The entries of a request's lists and maps as the walk meets them: each list's, and all together."""

    def __init__(self) -> None:
        self.total = 0

    def count(self, entries: int) -> int:
        """One more entry of a list holding ``entries`` so far: its new count (refused past the bounds)."""
        self.total += 1
        if entries >= MAX_FIELDS:
            raise _too_many_entries()
        if self.total > MAX_ALL_ENTRIES:
            raise InvalidInputError(
                f"the request holds more than {MAX_ALL_ENTRIES} entries in its lists and parameter maps together "
                "(inputs, outputs, raw_input_contents, parameters; each map entry counted as sent)"
            )
        return entries + 1


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


def _walk_input(
    data: memoryview, start: int, end: int, entries: _Entries, elements: int, budget: protobuf_wire.FieldBudget
) -> int:
    """Count one input's parameters (in ``entries``) and its ``bytes_contents`` elements: ``elements`` plus
    them."""
    name = ""
    contents = []
    parameters = 0
    for field, s, e in _entries(data, start, end, budget):
        if field == _NAME:
            name = bytes(data[s:e]).decode("utf-8", "replace")
        elif field == _PARAMETERS:
            parameters = entries.count(parameters)
        elif field == _CONTENTS:
            contents.append((s, e))
    for s, e in contents:
        elements = _count_bytes_elements(data, s, e, name, elements, budget)
    return elements


def check_unparsed(message: bytes) -> None:
    """Refuse a ModelInferRequest of ``UNWALKED_BYTES`` or more whose lists or maps hold too many entries
    (``MAX_FIELDS`` in one, ``MAX_ALL_ENTRIES`` together), whose inputs hold too many ``bytes_contents``
    elements together, or which has more than :data:`MAX_WALKED_FIELDS` fields of any kind, unparsed."""
    if len(message) < UNWALKED_BYTES:
        return
    data = memoryview(message)
    budget = protobuf_wire.FieldBudget(MAX_WALKED_FIELDS)
    entries = _Entries()
    lists = dict.fromkeys(_LISTS, 0)
    elements = 0
    try:
        for number, start, end in _entries(data, 0, len(data), budget):
            if number not in lists:
                continue
            lists[number] = entries.count(lists[number])
            if number == _INPUTS:
                elements = _walk_input(data, start, end, entries, elements, budget)
            elif number == _OUTPUTS:
                parameters = 0
                for field, _, _ in _entries(data, start, end, budget):
                    if field == _OUTPUT_PARAMETERS:
                        parameters = entries.count(parameters)
    except protobuf_wire.TooManyFields:
        raise InvalidInputError(
            f"the request holds more than {MAX_WALKED_FIELDS} protobuf fields; send repeated numbers packed (as "
            "protobuf 3 writes them) or as raw_input_contents"
        ) from None
    except protobuf_wire.MalformedMessage:
        return
