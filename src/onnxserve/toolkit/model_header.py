"""What a model says about itself before its graph: producer and opsets, named one way everywhere;
:func:`read_header` reads them from a file without reading its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxserve.core import protobuf_wire
from onnxserve.toolkit.file_bytes import FileBytes

DEFAULT_DOMAIN = "ai.onnx"
"""The name shown for the default ONNX domain (``""`` in the file)."""


def producer(model: onnx.ModelProto) -> str:
    """``producer_name producer_version``, either part left out when empty ("" when both are)."""
    return " ".join(p for p in (model.producer_name, model.producer_version) if p)


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """The opset version each imported domain is at, the default domain named ``ai.onnx``."""
    return {o.domain or DEFAULT_DOMAIN: int(o.version) for o in model.opset_import}


@dataclass(frozen=True)
class Contents:
    """What a model file holds, counted from its wire format without parsing it (what a document of it
    costs beyond its bytes)."""

    external: tuple[tuple[str, int], ...] = ()
    """Each external data reference of the file's tensors (initializers and attribute tensors, of subgraphs
    too): its file (``location``) and ``length`` (-1 when it runs to the file's end), one per tensor."""
    all_nodes: int = 0
    """Every node of the file: the main graph's, its subgraphs' (If, Loop, Scan bodies, at any depth)
    and its model-local functions'."""
    declared: int = 0
    """The bytes the values of its tensors stored in the file take once read, by their dims and type
    (initializers, sparse ones as dense, and attribute tensors, of subgraphs too; not STRING ones, nor
    those in external data files), twice for values in typed fields (protobuf's array, then numpy's):
    typed fields store small values in fewer bytes (an int64 0 in ``int64_data`` is one byte of file,
    sixteen read; an INT8 in ``int32_data`` one byte, five read), and a sparse tensor is made dense to run."""
    names: int = 0
    """The bytes of its nodes' input, output and node names and doc strings, at any depth: each name
    appears several times in a graph document."""
    values: int = 0
    """Its graphs' input, output and value_info entries, at any depth: each is a value in a graph
    document."""
    value_bytes: int = 0
    """The bytes of those entries (names and types: a shape of millions of dims is one entry)."""
    list_items: int = 0
    """The numbers in its nodes' attribute lists (``ints``, ``floats``; packed ints counted at one a byte,
    at most their count), at any depth: each is a Python number in a graph document."""
    strings: int = 0
    """The string values of its tensors (``string_data`` of initializers and attribute tensors) and of its
    attributes' string lists, at any depth: each costs a Python object when read, far more than its bytes
    in the file (a one-character string: 3 bytes stored, about 60 read)."""


@dataclass(frozen=True)
class FileHeader:
    """A model file's header, read without its graph's contents (weights above all)."""

    model: onnx.ModelProto
    """Every field of the file's ModelProto but ``graph`` (ir_version, opsets, producer, metadata, ...)."""
    graph_name: str
    graph_doc_string: str
    nodes: int
    """The nodes of the main graph (not of its subgraphs)."""
    contents: Contents
    """Its tensors, nodes, values and strings at any depth, counted."""


_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_NAME, _GRAPH_DOC_STRING = 7, 1, 2, 10
"""Field numbers in onnx.proto: ModelProto.graph; GraphProto.node, .name, .doc_string."""

_GRAPH_INITIALIZER, _TENSOR_EXTERNAL_DATA, _ENTRY_KEY, _ENTRY_VALUE = 5, 13, 1, 2
"""GraphProto.initializer; TensorProto.external_data; StringStringEntryProto.key, .value."""

_MODEL_FUNCTIONS, _FUNCTION_NODE, _NODE_ATTRIBUTE, _ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS = 25, 7, 5, 6, 11
"""ModelProto.functions; FunctionProto.node; NodeProto.attribute; AttributeProto.g, .graphs."""

_MODEL_TRAINING_INFO, _TRAINING_GRAPHS = 20, (1, 2)
"""ModelProto.training_info; TrainingInfoProto.initialization, .algorithm (graphs, parsed with the model)."""

_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS, _ATTRIBUTE_STRINGS, _TENSOR_STRING_DATA = 5, 10, 9, 6
"""AttributeProto.t, .tensors, .strings; TensorProto.string_data."""

_ATTRIBUTE_FLOATS, _ATTRIBUTE_INTS = 7, 8
"""AttributeProto.floats, .ints."""

_TENSOR_DIMS, _TENSOR_DATA_TYPE, _SPARSE_VALUES, _SPARSE_DIMS = 1, 2, 1, 3
"""TensorProto.dims, .data_type; SparseTensorProto.values, .dims."""

_GRAPH_SPARSE_INITIALIZER, _ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 15, 22, 23
"""GraphProto.sparse_initializer; AttributeProto.sparse_tensor, .sparse_tensors."""

_NODE_NAME_FIELDS = frozenset((1, 2, 3, 6))
"""NodeProto.input, .output, .name, .doc_string."""

_GRAPH_VALUE_FIELDS = frozenset((11, 12, 13))
"""GraphProto.input, .output, .value_info."""

_TYPED_FIELD_BYTES = {4: 4, 5: 4, 7: 8, 10: 8, 11: 8}
"""TensorProto's typed value fields (float_data, int32_data, int64_data, double_data, uint64_data) and the
bytes protobuf keeps per element of each once parsed (an INT8 or BOOL value in int32_data takes 4)."""

_STRING_TYPE = 8
"""TensorProto.STRING: its values are counted one by one (``strings``)."""


def _element_bytes(data_type: int) -> int:
    """Bytes of one element of an ONNX tensor type read into memory (8 for a type onnx does not know)."""
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8


MAX_GRAPH_DEPTH = 100
"""Graphs nested deeper than this are refused (protobuf's parser refuses them too: its recursion limit)."""


def read_header(path: Path) -> FileHeader:
    """The header of the ONNX file at ``path``, read with a memory cost of the header, not of the file.

    ``onnx.load`` parses the whole file (weights embedded in it included, whatever
    ``load_external_data`` says) and protobuf has no lazy parsing, so this walks the file's protobuf
    wire format read by position (``toolkit.file_bytes``: a memory map of a file cut short while it is read
    ends the process): the model's fields except ``graph`` and ``functions`` are parsed by
    protobuf, the graph's name, doc string and node count are read from its fields, every node (of
    subgraphs and functions too) is counted and every tensor's external data reference read, and the
    rest (initializers' values, ...) is skipped without being read. ValueError or OSError for a file
    that is not a protobuf message.
    """
    with path.open("rb") as file:
        data = FileBytes(file)
        if not len(data):
            raise ValueError("an empty file is no ONNX model")
        rest = bytearray()
        name, doc_string, nodes = b"", b"", 0
        walk = _Walk(data)
        for number, wire, tag_start, start, end in protobuf_wire.fields(data, 0, len(data)):
            if number == _MODEL_FUNCTIONS and wire == protobuf_wire.LENGTH_DELIMITED:
                walk.graph(start, end, _FUNCTION_NODE, 0)  # not parsed: walked
                continue
            if number == _MODEL_TRAINING_INFO and wire == protobuf_wire.LENGTH_DELIMITED:
                # not parsed: walked (its graphs are parsed with the model, and count as subgraphs: a training
                # graph of a million nodes escaped the node limit, outside attack rt19)
                for inner, inner_wire, _, inner_start, inner_end in protobuf_wire.fields(data, start, end):
                    if inner in _TRAINING_GRAPHS and inner_wire == protobuf_wire.LENGTH_DELIMITED:
                        walk.graph(inner_start, inner_end, _GRAPH_NODE, 1)
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
        walk.contents(),
    )


class _Walk:
    """Every node of a model file and every external data reference of its tensors, at any depth."""

    def __init__(self, data: FileBytes) -> None:
        self.data = data
        self.nodes = 0
        self.strings = 0
        self.declared = 0
        self.names = 0
        self.values = 0
        self.value_bytes = 0
        self.list_items = 0
        self.external: list[tuple[str, int]] = []  # (location, length; -1: to the file's end)

    def contents(self) -> Contents:
        return Contents(
            external=tuple(self.external),
            all_nodes=self.nodes,
            declared=self.declared,
            names=self.names,
            values=self.values,
            value_bytes=self.value_bytes,
            list_items=self.list_items,
            strings=self.strings,
        )

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
            elif number == _GRAPH_SPARSE_INITIALIZER and node_field == _GRAPH_NODE:
                self._sparse(field_start, field_end)
            elif number in _GRAPH_VALUE_FIELDS and node_field == _GRAPH_NODE:
                self.value_bytes += field_end - field_start
                self.values += 1

    def _node(self, start: int, end: int, depth: int) -> None:
        for number, wire, _, attribute_start, attribute_end in protobuf_wire.fields(self.data, start, end):
            if wire != protobuf_wire.LENGTH_DELIMITED:
                continue
            if number in _NODE_NAME_FIELDS:
                self.names += attribute_end - attribute_start
                continue
            if number != _NODE_ATTRIBUTE:
                continue
            for field, field_wire, _, value_start, value_end in protobuf_wire.fields(
                self.data, attribute_start, attribute_end
            ):
                if field_wire != protobuf_wire.LENGTH_DELIMITED:
                    self.list_items += field in (_ATTRIBUTE_FLOATS, _ATTRIBUTE_INTS)  # one unpacked item
                    continue
                if field in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
                    self.graph(value_start, value_end, _GRAPH_NODE, depth + 1)
                elif field in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
                    self._tensor(value_start, value_end)
                elif field == _ATTRIBUTE_STRINGS:
                    self.strings += 1
                elif field == _ATTRIBUTE_FLOATS:
                    self.list_items += (value_end - value_start) // 4
                elif field == _ATTRIBUTE_INTS:
                    self.list_items += value_end - value_start
                elif field in (_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS):
                    self._sparse(value_start, value_end)

    def _tensor(self, start: int, end: int) -> None:
        """The external data reference of the TensorProto in ``data[start:end]``, if it has one, and its
        string values."""
        location, length = "", -1
        elements, data_type, parsed = 1, 0, 0
        for number, wire, _, entry_start, entry_end in protobuf_wire.fields(self.data, start, end):
            if number == _TENSOR_STRING_DATA and wire == protobuf_wire.LENGTH_DELIMITED:
                self.strings += 1
                continue
            if number in _TYPED_FIELD_BYTES:
                parsed = _TYPED_FIELD_BYTES[number]
                continue
            if number == _TENSOR_DIMS:
                elements *= self._product(wire, entry_start, entry_end)
                continue
            if number == _TENSOR_DATA_TYPE and wire == protobuf_wire.VARINT:
                data_type = protobuf_wire.varint(self.data, entry_start, entry_end)[0]
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
        elif data_type != _STRING_TYPE:  # values in a typed field are held by protobuf, then by numpy
            self.declared += elements * (_element_bytes(data_type) + parsed)

    def _sparse(self, start: int, end: int) -> None:
        """A SparseTensorProto's dense size (what running it takes: ONNX Runtime makes it dense), by its
        dims and its values' type."""
        elements, data_type = 1, 0
        for number, wire, _, field_start, field_end in protobuf_wire.fields(self.data, start, end):
            if number == _SPARSE_DIMS:
                elements *= self._product(wire, field_start, field_end)
            elif number == _SPARSE_VALUES and wire == protobuf_wire.LENGTH_DELIMITED:
                for inner, inner_wire, _, value_start, value_end in protobuf_wire.fields(
                    self.data, field_start, field_end
                ):
                    if inner == _TENSOR_DATA_TYPE and inner_wire == protobuf_wire.VARINT:
                        data_type = protobuf_wire.varint(self.data, value_start, value_end)[0]
        if data_type != _STRING_TYPE:
            self.declared += elements * _element_bytes(data_type)

    def _product(self, wire: int, start: int, end: int) -> int:
        """The product of the dims in one ``dims`` field: one number, or a packed run of them (a negative
        dim, as int64 wraps it, counts as its unsigned value: far too large, as such a tensor is)."""
        if wire == protobuf_wire.VARINT:
            return protobuf_wire.varint(self.data, start, end)[0]
        if wire != protobuf_wire.LENGTH_DELIMITED:
            return 1
        product, position = 1, start
        while position < end:
            value, position = protobuf_wire.varint(self.data, position, end)
            product *= value
        return product
