"""Protobuf's wire format walked field by field, without parsing: tags and lengths only.

Two readers need to see into a protobuf message before (or instead of) protobuf parsing all of it: a
model file's header is read over a memory map without its weights (``toolkit.model_header``), and a
gRPC ModelInferRequest's ``bytes_contents`` elements are counted before the parser builds one object
per element (``protocols.v2_grpc.element_count``). Both walk with :func:`fields`.

The walk accepts what protobuf's own parser accepts: every wire type, groups included (an unknown
field may be a group, and the parser keeps it), so a reader that refuses on what it counts cannot be
sidestepped by a message the walk calls malformed while the parser takes it. What the parser refuses
(field number 0, wire types 6 and 7, a number longer than 10 bytes, a field running past its message,
a group that does not end or ends under another number, groups nested deeper than
:data:`MAX_GROUP_DEPTH`) raises :class:`MalformedMessage`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = range(6)
"""Protobuf's wire types."""

MAX_GROUP_DEPTH = 100
"""Groups nested deeper than this are refused, as protobuf's parser refuses them (its recursion limit)."""

Field = tuple[int, int, int, int, int]
"""A field: its number, wire type, where its tag starts, where its value starts (after the length of a
length-delimited one, after the start tag of a group) and where it ends (after a group's end tag)."""


class Bytes(Protocol):
    """What is walked: ``bytes``, a ``memoryview`` of them, or a memory-mapped file."""

    def __getitem__(self, index: int, /) -> int: ...


class MalformedMessage(ValueError):
    """The bytes are not a well-formed protobuf message."""


class TooManyFields(Exception):
    """A walk read more tags than its :class:`FieldBudget` allowed."""


class GroupField(Exception):
    """A walk told to refuse groups met one (its field number: ``args[0]``)."""


class FieldBudget:
    """The most tags that the walks given it may read together, every field counted (a group's own fields,
    unknown fields and each element of an unpacked repeated field included). Protobuf parses a message of
    millions of tiny unknown fields in a fraction of a second, while a walk in Python takes about a
    microsecond per tag, so a walk of a message from a client is given one."""

    __slots__ = ("left",)

    def __init__(self, tags: int) -> None:
        self.left = tags


def varint(data: Bytes, position: int, end: int) -> tuple[int, int]:
    """The base-128 number starting at ``position`` and where it ends; it must end before ``end``."""
    value = shift = 0
    while position < end:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise MalformedMessage(f"not a protobuf message: a number longer than 10 bytes at byte {position}")
    raise MalformedMessage("not a protobuf message: it ends inside a number")


def fields(
    data: Bytes, start: int, end: int, budget: FieldBudget | None = None, groups: bool = True
) -> Iterator[Field]:
    """Each field of the message in ``data[start:end]``, in order; a group is one field (see :data:`Field`).
    With a ``budget``, every tag read counts in it, and :class:`TooManyFields` is raised past it. Without
    ``groups``, a group's start raises :class:`GroupField` before its fields are read (a message whose
    schema has none)."""
    if not groups:
        return _tags(data, start, end, budget, groups=False)  # no group to step over: the tags are the fields
    return _fields(_tags(data, start, end, budget))


def _fields(tags: Iterator[Field]) -> Iterator[Field]:
    for number, wire_type, tag_start, value_start, value_end in tags:
        if wire_type == END_GROUP:
            raise MalformedMessage(f"not a protobuf message: a group ends at byte {tag_start} that never started")
        if wire_type == START_GROUP:
            value_end = _group_end(tags, number, tag_start)
        yield number, wire_type, tag_start, value_start, value_end


def _tags(data: Bytes, start: int, end: int, budget: FieldBudget | None, groups: bool = True) -> Iterator[Field]:
    """Every tag in ``data[start:end]`` with its value's extent; a group's start and end tags are two
    entries with nothing between value start and end, the group's fields the entries between them
    (without ``groups``: :class:`GroupField` at a start tag, :class:`MalformedMessage` at an end tag)."""
    position = start
    while position < end:
        if budget is not None:
            budget.left -= 1
            if budget.left < 0:
                raise TooManyFields
        tag_start = position
        tag = data[position]
        if tag < 0x80:  # a one-byte tag (fields 1 to 15), read here: most tags, and a call saved each
            position += 1
        else:
            tag, position = varint(data, position, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise MalformedMessage(f"not a protobuf message: field number 0 at byte {tag_start}")
        value_start = position
        if wire_type == VARINT:
            _, position = varint(data, position, end)
        elif wire_type == FIXED64:
            position += 8
        elif wire_type == LENGTH_DELIMITED:
            length = data[position] if position < end else 0x80
            if length < 0x80:  # a length under 128, the same
                value_start = position + 1
            else:
                length, value_start = varint(data, position, end)
            position = value_start + length
        elif wire_type == FIXED32:
            position += 4
        elif wire_type != START_GROUP and wire_type != END_GROUP:
            raise MalformedMessage(f"not a protobuf message: wire type {wire_type} at byte {tag_start}")
        elif not groups:
            if wire_type == START_GROUP:
                raise GroupField(number)
            raise MalformedMessage(f"not a protobuf message: a group ends at byte {tag_start} that never started")
        if position > end:
            raise MalformedMessage(f"not a protobuf message: the field at byte {tag_start} runs past its end")
        yield number, wire_type, tag_start, value_start, position


def _group_end(tags: Iterator[Field], number: int, tag_start: int) -> int:
    """Where the group that started at ``tag_start`` ends (after its end tag), its fields consumed."""
    open_groups = [number]
    for inner, wire_type, _, _, value_end in tags:
        if wire_type == START_GROUP:
            open_groups.append(inner)
            if len(open_groups) > MAX_GROUP_DEPTH:
                raise MalformedMessage(f"not a protobuf message: groups nested deeper than {MAX_GROUP_DEPTH}")
        elif wire_type == END_GROUP:
            if open_groups.pop() != inner:
                raise MalformedMessage(
                    f"not a protobuf message: the group at byte {tag_start} ends under another number"
                )
            if not open_groups:
                return value_end
    raise MalformedMessage(f"not a protobuf message: the group at byte {tag_start} never ends")
