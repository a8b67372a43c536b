"""What a model says about itself before its graph: producer and opsets, named one way everywhere;
:func:`read_header` reads them from a file without reading its weights."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxserve.core import protobuf_wire

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
    external: tuple[tuple[str, int], ...] = ()
    """Each external data reference of the file's tensors (initializers and attribute tensors, of subgraphs
    too): its file (``location``) and ``length`` (-1 when it runs to the file's end), one per tensor."""
    all_nodes: int = 0
    """Every node of the file: the main graph's, its subgraphs' (If, Loop, Scan bodies, at any depth)
    and its model-local functions'."""
    strings: int = 0
    """The string values of its tensors (``string_data`` of initializers and attribute tensors) and of its
    attributes' string lists, at any depth: each costs a Python object when read, far more than its bytes
    in the file (a one-character string: 3 bytes stored, about 60 read)."""


_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_NAME, _GRAPH_DOC_STRING = 7, 1, 2, 10
"""Field numbers in onnx.proto: ModelProto.graph; GraphProto.node, .name, .doc_string."""

_GRAPH_INITIALIZER, _TENSOR_EXTERNAL_DATA, _ENTRY_KEY, _ENTRY_VALUE = 5, 13, 1, 2
"""GraphProto.initializer; TensorProto.external_data; StringStringEntryProto.key, .value."""

_MODEL_FUNCTIONS, _FUNCTION_NODE, _NODE_ATTRIBUTE, _ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS = 25, 7, 5, 6, 11
"""ModelProto.functions; FunctionProto.node; NodeProto.attribute; AttributeProto.g, .graphs."""

_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS, _ATTRIBUTE_STRINGS, _TENSOR_STRING_DATA = 5, 10, 9, 6
"""AttributeProto.t, .tensors, .strings; TensorProto.string_data."""

MAX_GRAPH_DEPTH = 100
"""Graphs nested deeper than this are refused (protobuf's parser refuses them too: its recursion limit)."""


def read_header(path: Path) -> FileHeader:
    """The header of the ONNX file at ``path``, read with a memory cost of the header, not of the file.

    ``onnx.load`` parses the whole file (weights embedded in it included, whatever
    ``load_external_data`` says) and protobuf has no lazy parsing, so this walks the file's protobuf
    wire format over a memory map: the model's fields except ``graph`` and ``functions`` are parsed by
    protobuf, the graph's name, doc string and node count are read from its fields, every node (of
    subgraphs and functions too) is counted and every tensor's external data reference read, and the
    rest (initializers' values, ...) is skipped without being read. ValueError or OSError for a file
    that is not a protobuf message.
    """
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        rest = bytearray()
        name, doc_string, nodes = b"", b"", 0
        walk = _Walk(data)
        for number, wire, tag_start, start, end in protobuf_wire.fields(data, 0, len(data)):
            if number == _MODEL_FUNCTIONS and wire == protobuf_wire.LENGTH_DELIMITED:
                walk.graph(start, end, _FUNCTION_NODE, 0)  # not parsed: walked
                continue
            if number != _MODEL_GRAPH or wire != protobuf_wire.LENGTH_DELIMITED:
                rest += data[tag_start:end]
                continue
            walk.graph(start, end, _GRAPH_NODE, 0)
            for inner, inner_wire, _, inner_start, inner_end in protobuf_wire.fields(data, start, end):
                if inner_wire != protobuf_wire.LENGTH_DELIMITED:
                    continue
                if inner == _GRAPH_NODE:
                    nodes += 1
                elif inner == _GRAPH_NAME:
                    name = data[inner_start:inner_end]
                elif inner == _GRAPH_DOC_STRING:
                    doc_string = data[inner_start:inner_end]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(rest))
    return FileHeader(
        model,
        name.decode("utf-8", "replace"),
        doc_string.decode("utf-8", "replace"),
        nodes,
        tuple(walk.external),
        walk.nodes,
        walk.strings,
    )


class _Walk:
    """Every node of a model file and every external data reference of its tensors, at any depth."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.nodes = 0
        self.strings = 0
        self.external: list[tuple[str, int]] = []  # (location, length; -1: to the file's end)

    def graph(self, start: int, end: int, node_field: int, depth: int) -> None:
        """The graph (or function, whose nodes are ``node_field``) in ``data[start:end]``."""
        if depth > MAX_GRAPH_DEPTH:
            raise ValueError(f"graphs nested deeper than {MAX_GRAPH_DEPTH}")
        for number, wire, _, field_start, field_end in protobuf_wire.fields(self.data, start, end):
            if wire != protobuf_wire.LENGTH_DELIMITED:
                continue
            if number == node_field:
                self.nodes += 1
                self._node(field_start, field_end, depth)
            elif number == _GRAPH_INITIALIZER and node_field == _GRAPH_NODE:
                self._tensor(field_start, field_end)

    def _node(self, start: int, end: int, depth: int) -> None:
        for number, wire, _, attribute_start, attribute_end in protobuf_wire.fields(self.data, start, end):
            if number != _NODE_ATTRIBUTE or wire != protobuf_wire.LENGTH_DELIMITED:
                continue
            for field, field_wire, _, value_start, value_end in protobuf_wire.fields(
                self.data, attribute_start, attribute_end
            ):
                if field_wire != protobuf_wire.LENGTH_DELIMITED:
                    continue
                if field in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
                    self.graph(value_start, value_end, _GRAPH_NODE, depth + 1)
                elif field in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
                    self._tensor(value_start, value_end)
                elif field == _ATTRIBUTE_STRINGS:
                    self.strings += 1

    def _tensor(self, start: int, end: int) -> None:
        """The external data reference of the TensorProto in ``data[start:end]``, if it has one, and its
        string values."""
        location, length = "", -1
        for number, wire, _, entry_start, entry_end in protobuf_wire.fields(self.data, start, end):
            if number == _TENSOR_STRING_DATA and wire == protobuf_wire.LENGTH_DELIMITED:
                self.strings += 1
                continue
            if number != _TENSOR_EXTERNAL_DATA or wire != protobuf_wire.LENGTH_DELIMITED:
                continue
            key = value = b""
            for field, field_wire, _, field_start, field_end in protobuf_wire.fields(self.data, entry_start, entry_end):
                if field_wire == protobuf_wire.LENGTH_DELIMITED and field == _ENTRY_KEY:
                    key = self.data[field_start:field_end]
                elif field_wire == protobuf_wire.LENGTH_DELIMITED and field == _ENTRY_VALUE:
                    value = self.data[field_start:field_end]
            if key == b"location":
                location = value.decode("utf-8", "replace")
            elif key == b"length" and value.isdigit():
                length = int(value[:20])
        if location:
            self.external.append((location, length))
