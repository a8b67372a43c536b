"""What a model says about itself before its graph: producer and opsets, named one way everywhere;
:func:`read_header` reads them from a file without reading its weights."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

DEFAULT_DOMAIN = "ai.onnx"
"""The name shown for the default ONNX domain (``""`` in the file)."""


def producer(model: onnx.ModelProto) -> str:
    """``producer_name producer_version``, either part left out when empty ("" when both are)."""
    return " ".join(p for p in (model.producer_name, model.producer_version) if p)


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """The opset version each imported domain is at, the default domain named ``ai.onnx``."""
    return {o.domain or DEFAULT_DOMAIN: int(o.version) for o in model.opset_import}


@dataclass(frozen=True)
class FileHeader:
    """A model file's header, read without its graph's contents (weights above all)."""

    model: onnx.ModelProto
    """Every field of the file's ModelProto but ``graph`` (ir_version, opsets, producer, metadata, ...)."""
    graph_name: str
    graph_doc_string: str
    nodes: int
    """The nodes of the main graph (not of its subgraphs)."""


_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_NAME, _GRAPH_DOC_STRING = 7, 1, 2, 10
"""Field numbers in onnx.proto: ModelProto.graph; GraphProto.node, .name, .doc_string."""

_LENGTH_DELIMITED = 2


def read_header(path: Path) -> FileHeader:
    """The header of the ONNX file at ``path``, read with a memory cost of the header, not of the file.

    ``onnx.load`` parses the whole file (weights embedded in it included, whatever
    ``load_external_data`` says) and protobuf has no lazy parsing, so this walks the file's protobuf
    wire format over a memory map: the model's fields except ``graph`` are parsed by protobuf, the
    graph's name, doc string and node count are read from its fields, and the graph's other fields
    (initializers, ...) are skipped without being read. ValueError or OSError for a file that is not
    a protobuf message.
    """
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        rest = bytearray()
        name, doc_string, nodes = b"", b"", 0
        for number, wire, tag_start, start, end in _fields(data, 0, len(data)):
            if number != _MODEL_GRAPH or wire != _LENGTH_DELIMITED:
                rest += data[tag_start:end]
                continue
            for inner, inner_wire, _, inner_start, inner_end in _fields(data, start, end):
                if inner_wire != _LENGTH_DELIMITED:
                    continue
                if inner == _GRAPH_NODE:
                    nodes += 1
                elif inner == _GRAPH_NAME:
                    name = data[inner_start:inner_end]
                elif inner == _GRAPH_DOC_STRING:
                    doc_string = data[inner_start:inner_end]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(rest))
    return FileHeader(model, name.decode("utf-8", "replace"), doc_string.decode("utf-8", "replace"), nodes)


def _fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Each field of the message in ``data[start:end]``: number, wire type, where its tag starts, where
    its value starts (after the length of a length-delimited one) and where it ends."""
    position = start
    while position < end:
        tag_start = position
        tag, position = _varint(data, position)
        number, wire = tag >> 3, tag & 7
        value_start = position
        if wire == 0:
            _, position = _varint(data, position)
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        elif wire == _LENGTH_DELIMITED:
            length, value_start = _varint(data, position)
            position = value_start + length
        else:  # groups (wire types 3, 4) are not in onnx.proto
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {tag_start}")
        if position > end or number == 0:
            raise ValueError(f"not a protobuf message: field at byte {tag_start} runs past its end")
        yield number, wire, tag_start, value_start, position


def _varint(data: mmap.mmap, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while shift < 70:
        if position >= len(data):
            raise ValueError("not a protobuf message: it ends inside a number")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise ValueError(f"not a protobuf message: a number longer than 10 bytes at byte {position}")
