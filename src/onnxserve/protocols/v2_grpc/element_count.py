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

import numpy as np

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
_SHAPE = 3  # InferInputTensor.shape
_OUTPUT_PARAMETERS = 2  # InferRequestedOutputTensor.parameters
_BYTES_CONTENTS = 8  # InferTensorContents.bytes_contents
_DELIMITED = protobuf_wire.LENGTH_DELIMITED
_BYTES_TAG = _BYTES_CONTENTS << 3 | _DELIMITED  # its tag: one byte
_VARINT_CONTENTS = frozenset(range(1, 6))  # bool, int, int64, uint, uint64: numbers of one byte and more
MAX_VARINT_BYTES = 10
"""The most bytes one varint takes."""
MAX_SHAPE_BYTES = wire.MAX_RANK * MAX_VARINT_BYTES
"""A shape whose pieces (packed, or one dimension a field) take more bytes than this together has more than
``MAX_RANK`` dimensions."""
MAX_ALL_SHAPE_BYTES = 256 * 1024
"""The most bytes the shapes of all a request's inputs may take together: protobuf makes 8 bytes of each,
and 65,536 inputs of 320-byte shapes (22 MB, 81 KB of gzip) became 21 million dimensions, 293 MB once parsed
while the in-flight budget counted 22 MB (outside attack rt58). 65,535 inputs of shape [N] take 131 KB."""

MAX_PACKED_NUMBERS = 4 * 1024 * 1024
"""The most numbers packed as varints in a walked request's contents together (``bool``, ``int``, ``int64``,
``uint``, ``uint64`` contents): protobuf unpacks each into 4 or 8 bytes and the codec copies them again, so a
64 MB message of one-byte zeros became 1 GB (a packed shape of 66 million dimensions too, before its rank
was checked: outside attack rt56). Tensors that large travel as ``raw_input_contents``."""
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

MAX_OTHER_FIELDS = 4 * MAX_FIELDS
"""The most fields a walked request may hold besides its list and map entries and its BYTES elements (names,
datatypes, shapes, packed numbers: a few a tensor; unknown fields and numbers sent unpacked too: 65,535
inputs each with all its fields once were 720,000 fields to walk, 1 s, outside attack rt56). The walk
takes about half a microsecond a field in Python, protobuf a hundredth of that: 557,000 empty unknown groups
(1.1 MB, 1.1 KB gzipped) or a million two-byte unknown fields took the walk 0.5 to 1.8 s a message, holding
the interpreter lock in the codec threads (outside attack rt55: 32 such calls timed out honest large requests,
and beside a flood of model calls left the gRPC port unanswered)."""

MAX_WALKED_FIELDS = wire.MAX_BYTES_ELEMENTS + MAX_FIELDS
"""The most protobuf fields the walk reads in one message, of every kind together: every BYTES element
one request may hold, plus as many others. A message of more (millions of tiny unknown fields, or numbers
of a repeated field sent unpacked) is refused before the walk, about a microsecond per field in Python,
takes longer than protobuf's parse of it would."""


def _too_many_entries() -> InvalidInputError:
    return InvalidInputError(
        f"the request holds more than {MAX_FIELDS} entries (inputs, outputs, parameters, contents)"
    )


class _Walk:
    """One message's walk by tag and length: the entries of its lists and maps (each list's, and all
    together), its BYTES elements and its other fields counted as they are met, each refused past its bound."""

    def __init__(self, message: bytes) -> None:
        self.data = memoryview(message)
        self._budget = protobuf_wire.FieldBudget(MAX_WALKED_FIELDS)
        self._entries = 0
        self._others = 0
        self.elements = 0
        self.numbers = 0  # numbers packed as varints in contents, at least
        self.shapes = 0  # bytes of every input's shape together

    def fields(self, start: int, end: int) -> Iterator[protobuf_wire.Field]:
        """The fields in ``data[start:end]`` (no group: :class:`protobuf_wire.GroupField`)."""
        return protobuf_wire.fields(self.data, start, end, self._budget, groups=False)

    def entry(self, entries: int) -> int:
        """One more entry of a list or map holding ``entries`` so far: its new count."""
        self._entries += 1
        if entries >= MAX_FIELDS:
            raise _too_many_entries()
        if self._entries > MAX_ALL_ENTRIES:
            raise InvalidInputError(
                f"the request holds more than {MAX_ALL_ENTRIES} entries in its lists and parameter maps together "
                "(inputs, outputs, raw_input_contents, parameters; each map entry counted as sent)"
            )
        return entries + 1

    def other(self) -> None:
        """One more field that is neither an entry nor a BYTES element: a name, a datatype, a shape, packed
        numbers; an unknown field, a number of a repeated field sent unpacked."""
        self._others += 1
        if self._others > MAX_OTHER_FIELDS:
            raise InvalidInputError(
                f"the request holds more than {MAX_OTHER_FIELDS} protobuf fields besides its list entries and "
                "BYTES elements (unknown fields, or numbers sent unpacked); send repeated numbers packed (as "
                "protobuf 3 writes them) or as raw_input_contents"
            )

    def varints(self, start: int, end: int, name: str) -> None:
        """The numbers packed in ``data[start:end]`` (one per byte under 128), counted with those before."""
        size = end - start
        if self.numbers + size <= MAX_PACKED_NUMBERS:  # a number takes a byte at least: no need to count
            self.numbers += size
            return
        self.numbers += int(np.count_nonzero(np.frombuffer(self.data[start:end], dtype=np.uint8) < 0x80))
        if self.numbers > MAX_PACKED_NUMBERS:
            raise InvalidInputError(
                f"input {name!r}: its contents bring the request's numbers packed as varints (bool, int, int64, "
                f"uint and uint64 contents) to more than {MAX_PACKED_NUMBERS}; send large tensors as "
                "raw_input_contents (as tritonclient does)"
            )

    def element(self, name: str) -> None:
        """One more BYTES element (a tag read: counted in the budget too)."""
        self.elements += 1
        self._budget.left -= 1
        if self._budget.left < 0:
            raise protobuf_wire.TooManyFields
        if self.elements > wire.MAX_BYTES_ELEMENTS:
            raise InvalidInputError(
                f"input {name!r}: contents.bytes_contents brings the request's inputs to more than "
                f"{wire.MAX_BYTES_ELEMENTS} BYTES elements; at most {wire.MAX_BYTES_ELEMENTS} are allowed in "
                "one request"
            )


def check_entries(request: pb.ModelInferRequest) -> None:
    """Refuse a parsed ModelInferRequest whose ``parameters`` (its own, or one tensor's), ``inputs``,
    ``outputs`` or ``raw_input_contents`` hold more than :data:`MAX_FIELDS` entries, as the walk of
    :func:`check_unparsed` does for a large message before parsing. A message it does not walk (under
    ``UNWALKED_BYTES``) parses in a few milliseconds, but 150,000 parameters in one were accepted (outside
    attack rt21). One ``len`` a list and a tensor."""
    lists = (request.parameters, request.inputs, request.outputs, request.raw_input_contents)
    if max(len(entries) for entries in lists) > MAX_FIELDS:
        raise _too_many_entries()
    for tensors in (request.inputs, request.outputs):
        for tensor in tensors:
            if len(tensor.parameters) > MAX_FIELDS:
                raise _too_many_entries()


def _walk_input(walk: _Walk, start: int, end: int) -> None:
    """Count one input's parameters, its ``bytes_contents`` elements and its other fields."""
    name = ""
    contents = []
    parameters = 0
    shape = 0  # bytes of the shape's packed pieces, and one a dimension sent unpacked
    for field, wire_type, _, s, e in walk.fields(start, end):
        delimited = wire_type == _DELIMITED
        if delimited and field == _PARAMETERS:
            parameters = walk.entry(parameters)
            continue
        walk.other()
        if delimited and field == _NAME:
            name = bytes(walk.data[s:e]).decode("utf-8", "replace")
        elif field == _SHAPE:
            # protobuf joins every piece of a repeated field: 200,000 packed pieces of 320 bytes each made a
            # shape of 64 million dimensions, 512 MB once parsed (outside attack rt57), so the pieces count
            # together.
            piece = e - s if delimited else 1
            shape += piece
            walk.shapes += piece
            if shape > MAX_SHAPE_BYTES:
                raise InvalidInputError(
                    f"input {name!r}: shape has more than {wire.MAX_RANK} dimensions; at most {wire.MAX_RANK} are "
                    "allowed"
                )
            if walk.shapes > MAX_ALL_SHAPE_BYTES:
                raise InvalidInputError(
                    f"the request's shapes take more than {MAX_ALL_SHAPE_BYTES} bytes together; send fewer inputs"
                )
        elif delimited and field == _CONTENTS:
            contents.append((s, e))
    for s, e in contents:
        _walk_contents(walk, s, e, name)


def _walk_contents(walk: _Walk, start: int, end: int, name: str) -> None:
    """Count one input's ``bytes_contents`` elements and the other fields of its contents. An element (its tag
    one byte, ``_BYTES_TAG``) is stepped over here, a few times faster than the general walk (a million
    empty ones, 2 MB, 2 KB gzipped: 0.66 s there); any other field goes through it."""
    data = walk.data
    position = start
    while position < end:
        if data[position] != _BYTES_TAG:
            field, wire_type, _, value_start, position = next(walk.fields(position, end))
            walk.other()
            if wire_type == _DELIMITED and field in _VARINT_CONTENTS:
                walk.varints(value_start, position, name)
            continue
        walk.element(name)
        position += 1
        length = data[position] if position < end else 0x80
        if length < 0x80:
            position += 1
        else:
            length, position = protobuf_wire.varint(data, position, end)
        position += length
        if position > end:
            raise protobuf_wire.MalformedMessage("not a protobuf message: a field runs past its end")


def _walk_output(walk: _Walk, start: int, end: int) -> None:
    """Count one output's parameters and its other fields."""
    parameters = 0
    for field, wire_type, _, _, _ in walk.fields(start, end):
        if wire_type == _DELIMITED and field == _OUTPUT_PARAMETERS:
            parameters = walk.entry(parameters)
        else:
            walk.other()


def check_unparsed(message: bytes) -> None:
    """Refuse a ModelInferRequest of ``UNWALKED_BYTES`` or more whose lists or maps hold too many entries
    (``MAX_FIELDS`` in one, ``MAX_ALL_ENTRIES`` together), whose inputs hold too many ``bytes_contents``
    elements together, which holds more than ``MAX_OTHER_FIELDS`` other fields, a group, or more than
    :data:`MAX_WALKED_FIELDS` fields of any kind, unparsed."""
    if len(message) < UNWALKED_BYTES:
        return
    walk = _Walk(message)
    lists = dict.fromkeys(_LISTS, 0)
    try:
        for number, wire_type, _, start, end in walk.fields(0, len(message)):
            if not (wire_type == _DELIMITED and number in lists):
                walk.other()
                continue
            lists[number] = walk.entry(lists[number])
            if number == _INPUTS:
                _walk_input(walk, start, end)
            elif number == _OUTPUTS:
                _walk_output(walk, start, end)
    except protobuf_wire.GroupField as e:
        raise InvalidInputError(
            f"the request holds a group (protobuf wire type 3, field {e.args[0]}); no KServe message has one"
        ) from None
    except protobuf_wire.TooManyFields:
        raise InvalidInputError(
            f"the request holds more than {MAX_WALKED_FIELDS} protobuf fields; send repeated numbers packed (as "
            "protobuf 3 writes them) or as raw_input_contents"
        ) from None
    except protobuf_wire.MalformedMessage:
        return
