"""A bounded look at a ModelInferRequest's wire bytes before protobuf parses them.

Parsing builds one object per ``bytes_contents`` element, in C, holding the interpreter lock the whole
time: 30 million empty elements (a 60 MB message) take seconds and gigabytes. This walk reads only the
field tags and lengths on the path ``inputs`` (5) -> ``contents`` (5) -> ``bytes_contents`` (8),
counts the elements of all inputs together, and stops as soon as they pass the limit, so a flood is refused after at
most that many steps. Anything malformed is left for the real parser to name.
"""

from __future__ import annotations

from collections.abc import Iterator

from onnxserve.core import wire
from onnxserve.errors import InvalidInputError
from onnxserve.protocols.entry_count import MAX_ENTRIES

_INPUTS = 5  # ModelInferRequest.inputs
_NAME = 1  # InferInputTensor.name
_CONTENTS = 5  # InferInputTensor.contents
_BYTES_CONTENTS = 8  # InferTensorContents.bytes_contents
_LENGTH_DELIMITED = 2
MAX_FIELDS = MAX_ENTRIES
"""The most length-delimited entries a request or one of its inputs may hold (inputs, outputs, parameters...)."""


class _Malformed(Exception):
    """The bytes are not a well-formed message: the protobuf parser will say so."""


def _varint(data: memoryview, offset: int, end: int) -> tuple[int, int]:
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
    raise _Malformed


def _entries(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in ``data[start:end]``; others skipped."""
    offset = start
    while offset < end:
        key, offset = _varint(data, offset, end)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, offset = _varint(data, offset, end)
        elif kind == 1:
            offset += 8
        elif kind == 5:
            offset += 4
        elif kind == _LENGTH_DELIMITED:
            size, offset = _varint(data, offset, end)
            yield number, offset, offset + size
            offset += size
        else:
            raise _Malformed
        if offset > end:
            raise _Malformed


def _fields(data: memoryview, start: int, end: int) -> list[tuple[int, int, int]]:
    found = []
    for entry in _entries(data, start, end):
        found.append(entry)
        if len(found) > MAX_FIELDS:
            raise InvalidInputError(
                f"the request holds more than {MAX_FIELDS} entries (inputs, outputs, parameters, contents)"
            )
    return found


def _count_bytes_elements(data: memoryview, start: int, end: int, name: str, count: int) -> int:
    """``count`` plus the ``bytes_contents`` elements in ``data[start:end]``; refused past the limit."""
    for number, _, _ in _entries(data, start, end):
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
    """Refuse a ModelInferRequest whose inputs hold too many ``bytes_contents`` elements together, unparsed.

    Each element takes at least 2 bytes, so a message under twice the limit is not looked at.
    """
    if len(message) <= 2 * wire.MAX_BYTES_ELEMENTS:
        return
    data = memoryview(message)
    count = 0
    try:
        for number, start, end in _fields(data, 0, len(data)):
            if number != _INPUTS:
                continue
            fields = _fields(data, start, end)
            name = next((bytes(data[s:e]).decode("utf-8", "replace") for n, s, e in fields if n == _NAME), "")
            for field, s, e in fields:
                if field == _CONTENTS:
                    count = _count_bytes_elements(data, s, e, name, count)
    except _Malformed:
        return
