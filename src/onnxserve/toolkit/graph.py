"""One document that describes an ONNX graph for people and for the views built on it.

:func:`build_graph` reads a :class:`onnx.ModelProto` into a :class:`GraphDocument`: the nodes (with
attributes as JSON values and the module path that exporters record in node names or metadata), the
edges between them, the shapes that ONNX shape inference finds (symbolic dims kept as their names),
and a statistical summary of every initializer. ``GraphDocument.to_json()`` is the ``onnxserve inspect
--format json`` document; the SVG and HTML views and ``onnxserve diff`` are built on it.

The JSON document (``"format": "onnxserve.graph/1"``)::

    {"format", "name", "ir_version", "producer", "opsets": {domain: version}, "metadata": {k: v},
     "inputs"/"outputs": [{"name", "dtype", "shape": [int | "dim" | null]}],
     "nodes": [{"name", "op_type", "domain", "inputs", "outputs", "attributes", "module"}],
     "edges": [{"source", "target", "tensor"}],     # node names, or "input:NAME" / "output:NAME"
     "values": {tensor: {"dtype", "shape"}},          # what shape inference knows
     "initializers": {name: {"dtype", "shape", "count", "bytes", "external", "min", "max", "mean",
                             "std", "sparsity", "histogram": {"edges": [21 floats], "counts": [20 ints]}}},
     "warnings": [str]}

Node names are unique in the document: an unnamed or repeated node gets ``OPTYPE_INDEX``.
"""

from __future__ import annotations

import ast
import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import orjson
from onnx import numpy_helper

from onnxserve.errors import InvalidInputError
from onnxserve.toolkit import model_header

FORMAT = "onnxserve.graph/1"
HISTOGRAM_BINS = 20
INPUT_PREFIX, OUTPUT_PREFIX = "input:", "output:"
SAMPLE_VALUES = 2000
"""Values of each initializer kept for the HTML viewer (the first ones, in C order)."""
SMALL_TENSOR = 16
"""Tensor attributes (and Constant values) with at most this many elements are shown in full."""

Dim = int | str | None


@dataclass(frozen=True)
class ValueInfo:
    """A tensor's element type and shape (ints, symbolic dim names, or None where unknown)."""

    name: str
    dtype: str
    shape: list[Dim] | None


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any]
    module: str
    """The module path, ``/``-separated (``encoder/layer.0/attention``); empty at the top."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    tensor: str


@dataclass(frozen=True)
class Histogram:
    edges: list[float]
    counts: list[int]


@dataclass(frozen=True)
class WeightSummary:
    """An initializer's type, size and (numeric ones) statistics over all its values."""

    name: str
    dtype: str
    shape: list[int]
    count: int
    bytes: int
    external: bool
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    sparsity: float | None = None
    """Fraction of values that are exactly zero."""
    histogram: Histogram | None = None


@dataclass(frozen=True)
class WeightPage:
    """A slice of a weight's values, flattened in C order."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    total: int
    values: list[Any]


@dataclass
class GraphDocument:
    name: str
    ir_version: int
    producer: str
    opsets: dict[str, int]
    metadata: dict[str, str]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    nodes: list[Node]
    edges: list[Edge]
    values: dict[str, ValueInfo]
    initializers: dict[str, WeightSummary]
    warnings: list[str] = field(default_factory=list)
    samples: dict[str, list[Any]] = field(default_factory=dict)
    """The first values of each numeric initializer (for the HTML viewer); not part of ``to_json()``."""

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form (see the module docstring)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "opsets": dict(self.opsets),
            "metadata": dict(self.metadata),
            "inputs": [_value_json(v) for v in self.inputs],
            "outputs": [_value_json(v) for v in self.outputs],
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [asdict(e) for e in self.edges],
            "values": {name: {"dtype": v.dtype, "shape": v.shape} for name, v in self.values.items()},
            "initializers": {name: summary_json(w) for name, w in self.initializers.items()},
            "warnings": list(self.warnings),
        }


def _value_json(value: ValueInfo) -> dict[str, Any]:
    return {"name": value.name, "dtype": value.dtype, "shape": value.shape}


def summary_json(weight: WeightSummary) -> dict[str, Any]:
    """A weight's (or any tensor's) summary as JSON, without its name."""
    data = asdict(weight)
    del data["name"]
    return data


def build_graph(
    model: onnx.ModelProto,
    *,
    base_dir: Path | None = None,
    sample_values: int = SAMPLE_VALUES,
    release_weights: bool = False,
) -> GraphDocument:
    """Describe ``model``; ``base_dir`` is where its external data files are (the model's folder).

    ``sample_values``: how many values of each initializer to keep in ``GraphDocument.samples``.
    ``release_weights``: drop the large tensors' values from ``model`` (which is changed) once the
    initializers are summarized (one at a time), so that shape inference, which copies the model,
    copies the graph without its weights.
    """
    graph = model.graph
    warnings: list[str] = []
    summaries: dict[str, WeightSummary] = {}
    samples: dict[str, list[Any]] = {}
    for tensor in graph.initializer:
        summary, sample = _read_weight(tensor, base_dir, warnings, sample_values)
        summaries[tensor.name] = summary
        if sample is not None:
            samples[tensor.name] = sample
    if release_weights:
        release_model_values(model)
    values = _inferred_values(model, warnings)
    initializers = {t.name: t for t in graph.initializer}
    inputs = [value_info(v) for v in graph.input if v.name not in initializers]
    outputs = [value_info(v) for v in graph.output]
    for v in (*inputs, *outputs):
        values.setdefault(v.name, v)
    for tensor in graph.initializer:
        values.setdefault(tensor.name, ValueInfo(tensor.name, _dtype_name(tensor.data_type), list(tensor.dims)))
    nodes = _nodes(graph.node)
    edges = _edges(nodes, inputs, outputs)
    return GraphDocument(
        name=graph.name,
        ir_version=model.ir_version,
        producer=model_header.producer(model),
        opsets=model_header.opsets(model),
        metadata={p.key: p.value for p in model.metadata_props},
        inputs=inputs,
        outputs=outputs,
        nodes=nodes,
        edges=edges,
        values=values,
        initializers=summaries,
        warnings=warnings,
        samples=samples,
    )


def weight_array(tensor: onnx.TensorProto, base_dir: Path | None) -> npt.NDArray[Any]:
    """The initializer's values, read from its external data file when it has one; a STRING tensor's as
    an object array of its bytes (``string_array``)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return string_array(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor, str(base_dir) if base_dir is not None else "")
    return numpy_helper.to_array(tensor)


def string_array(tensor: onnx.TensorProto) -> npt.NDArray[Any]:
    """A STRING tensor's values as an object array of ``bytes``, each as long as it is stored.

    ``numpy_helper.to_array`` makes a fixed-width unicode array, every element padded to the longest at
    4 bytes a character: one 100,000-character string among 5,000 one-character ones (a 115 KB file) took
    2 GB, with the interpreter held (outside attack rt17). A count that does not match the dims is a
    ``ValueError``, as numpy's."""
    values = np.empty(len(tensor.string_data), dtype=object)
    values[:] = list(tensor.string_data)
    return values.reshape(tuple(tensor.dims))


KEPT_VALUES = 1024
"""``release_values`` keeps tensors of at most this many elements: shapes and axes that shape inference reads."""

_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def release_values(tensor: onnx.TensorProto) -> None:
    """Drop the values of a tensor of more than ``KEPT_VALUES`` elements (its name, type and dims stay)."""
    if int(np.prod(list(tensor.dims), dtype=np.int64)) > KEPT_VALUES:
        for name in _VALUE_FIELDS:
            tensor.ClearField(name)


def release_model_values(model: onnx.ModelProto) -> None:
    """``release_values`` of the main graph's initializers and tensor attributes (Constant values).

    Protobuf gives the memory back only with the whole message: copy what is left to a new one to free it."""
    for tensor in model.graph.initializer:
        release_values(tensor)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                release_values(attribute.t)


def weight_values(
    model: onnx.ModelProto, name: str, offset: int = 0, limit: int = 1000, *, base_dir: Path | None = None
) -> WeightPage:
    """``limit`` values of initializer ``name`` from flat position ``offset`` (C order)."""
    if offset < 0 or limit < 0:
        raise InvalidInputError(f"offset and limit must be >= 0, not {offset} and {limit}")
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return page_of(tensor, weight_array(tensor, base_dir), offset, limit)
    raise InvalidInputError(f"the model has no initializer named {name!r}")


def page_of(tensor: onnx.TensorProto, values: npt.NDArray[Any], offset: int, limit: int) -> WeightPage:
    """``limit`` of ``values`` (the initializer ``tensor``'s, as ``weight_array`` reads them) from ``offset``."""
    if offset < 0 or limit < 0:
        raise InvalidInputError(f"offset and limit must be >= 0, not {offset} and {limit}")
    flat = values.reshape(-1)
    chunk = flat[offset : offset + limit]
    if chunk.dtype.kind == "O":  # a STRING tensor's: its values may be long
        chunk = _strings_page(chunk)
    return WeightPage(
        tensor.name, _dtype_name(tensor.data_type), list(tensor.dims), offset, int(flat.size), _plain(chunk)
    )


STRING_PAGE_BYTES = 1 << 20
"""The bytes of string values one page holds at most: a page ends before the value that would pass it,
and a first value longer than it is cut to it (a page of numbers is at most 10,000 values)."""


def _strings_page(chunk: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The leading values of ``chunk`` (bytes) that fit ``STRING_PAGE_BYTES``, at least one (cut to it)."""
    total = 0
    for index, value in enumerate(chunk):
        total += len(value)
        if total > STRING_PAGE_BYTES:
            if index == 0:
                first = np.empty(1, dtype=object)
                first[0] = bytes(value[:STRING_PAGE_BYTES])
                return first
            return chunk[:index]
    return chunk


def _read_weight(
    tensor: onnx.TensorProto, base_dir: Path | None, warnings: list[str], sample_values: int
) -> tuple[WeightSummary, list[Any] | None]:
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    shape = list(tensor.dims)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dtype = _dtype_name(tensor.data_type)
    try:
        array = weight_array(tensor, base_dir)
    except Exception as e:  # a missing or short external data file
        warnings.append(f"initializer {tensor.name!r}: values not readable ({type(e).__name__}: {e})")
        return WeightSummary(tensor.name, dtype, shape, count, 0, external), None
    sample = _plain(array.reshape(-1)[:sample_values]) if sample_values > 0 else None
    return array_summary(tensor.name, array, dtype=dtype, external=external), sample


STATISTICS_CHUNK = 1 << 20
"""Values converted to float64 at a time: a summary costs one chunk beside the array, not 2x its size."""


def array_summary(
    name: str, array: npt.NDArray[Any], *, dtype: str | None = None, external: bool = False
) -> WeightSummary:
    """Statistics of any array (used for weights and for intermediate tensors), in float64 chunks."""
    shape = [int(d) for d in array.shape]
    dtype = dtype or str(array.dtype)
    plain = WeightSummary(name, dtype, shape, int(array.size), int(array.nbytes), external)
    if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
        return plain
    flat = array.reshape(-1)
    count, zeros, total, low, high = 0, 0, 0.0, np.inf, -np.inf
    for finite, chunk_zeros in _finite_chunks(flat):
        zeros += chunk_zeros
        if finite.size:
            count += int(finite.size)
            total += float(finite.sum())
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if count == 0:
        return plain
    mean = total / count
    squares = 0.0
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    edges: npt.NDArray[Any] | None = None
    histogram_fits = True
    for finite, _ in _finite_chunks(flat):  # a second pass: deviations from the mean, and the histogram
        squares += float(np.square(finite - mean).sum())
        if histogram_fits and finite.size:
            try:
                chunk_counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS, range=(low, high))
                counts += chunk_counts
            except ValueError:  # a range too narrow for 20 bins at this magnitude (huge int64 sentinels)
                histogram_fits = False
    histogram = (
        Histogram([float(e) for e in edges], [int(c) for c in counts]) if histogram_fits and edges is not None else None
    )
    return WeightSummary(
        name,
        dtype,
        shape,
        int(array.size),
        int(array.nbytes),
        external,
        min=low,
        max=high,
        mean=mean,
        std=float(np.sqrt(squares / count)),
        sparsity=zeros / flat.size,
        histogram=histogram,
    )


def _finite_chunks(flat: npt.NDArray[Any]) -> Iterator[tuple[npt.NDArray[np.float64], int]]:
    """The finite values of ``flat`` as float64, ``STATISTICS_CHUNK`` at a time, each with its count of zeros."""
    for start in range(0, flat.size, STATISTICS_CHUNK):
        chunk = flat[start : start + STATISTICS_CHUNK].astype(np.float64)
        yield chunk[np.isfinite(chunk)], int(np.count_nonzero(chunk == 0))


def module_path(node: onnx.NodeProto) -> str:
    """The module hierarchy an exporter recorded for ``node``, ``/``-separated; "" when none.

    TorchScript exports name nodes ``/encoder/layer.0/attention/MatMul``; the dynamo exporter
    records ``pkg.torch.onnx.name_scopes`` (``['', 'model', 'model.encoder', ...]``) in node metadata.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = _scopes(prop.value)
            if scopes is not None:
                return scopes
    if node.name.startswith("/") and node.name.count("/") > 1:
        return node.name.strip("/").rsplit("/", 1)[0]
    return ""


def _scopes(text: str) -> str | None:
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return None
    parts: list[str] = []
    parent = ""
    for scope in scopes[:-1]:  # the last scope is the operation itself
        if not scope:
            continue
        parts.append(scope[len(parent) + 1 :] if parent and scope.startswith(parent + ".") else scope)
        parent = scope
    return "/".join(parts)


def node_ids(protos: Iterable[onnx.NodeProto]) -> list[str]:
    """The document's name of each node: its own name, or ``OPTYPE_INDEX`` for a nameless or repeated
    one (or one that looks like a graph input/output id). ``onnxserve diff`` uses the same ids."""
    ids: list[str] = []
    seen: set[str] = set()
    for index, proto in enumerate(protos):
        name = proto.name
        if not name or name in seen or name.startswith((INPUT_PREFIX, OUTPUT_PREFIX)):
            name = f"{proto.op_type}_{index}"
            while name in seen:
                name += "_"
        seen.add(name)
        ids.append(name)
    return ids


def _nodes(protos: Iterable[onnx.NodeProto]) -> list[Node]:
    nodes: list[Node] = []
    protos = list(protos)
    for name, proto in zip(node_ids(protos), protos, strict=True):
        nodes.append(
            Node(
                name=name,
                op_type=proto.op_type,
                domain=proto.domain,
                inputs=list(proto.input),
                outputs=list(proto.output),
                attributes={a.name: attribute_value(a) for a in proto.attribute},
                module=module_path(proto),
            )
        )
    return nodes


def _edges(nodes: list[Node], inputs: list[ValueInfo], outputs: list[ValueInfo]) -> list[Edge]:
    producer: dict[str, str] = {v.name: INPUT_PREFIX + v.name for v in inputs}
    for node in nodes:
        for out in node.outputs:
            if out:
                producer[out] = node.name
    edges: list[Edge] = []
    for node in nodes:
        for tensor in dict.fromkeys(node.inputs):
            if tensor and tensor in producer:
                edges.append(Edge(producer[tensor], node.name, tensor))
    for value in outputs:
        if value.name in producer:
            edges.append(Edge(producer[value.name], OUTPUT_PREFIX + value.name, value.name))
    return edges


def attribute_value(attribute: onnx.AttributeProto) -> Any:
    """An attribute as a JSON value: numbers, strings, lists; tensors and graphs as small summaries."""
    value = onnx.helper.get_attribute_value(attribute)
    return _json_value(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float | int | str) or value is None:
        return value
    if isinstance(value, onnx.TensorProto):
        return _tensor_attribute(value)
    if isinstance(value, onnx.GraphProto):
        return {"graph": value.name, "nodes": len(value.node)}
    if isinstance(value, onnx.SparseTensorProto):
        return {"sparse_tensor": list(value.dims)}
    if isinstance(value, onnx.TypeProto):
        return str(value).strip()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _tensor_attribute(tensor: onnx.TensorProto) -> dict[str, Any]:
    described: dict[str, Any] = {"dtype": _dtype_name(tensor.data_type), "shape": list(tensor.dims)}
    count = int(np.prod(list(tensor.dims), dtype=np.int64)) if tensor.dims else 1
    if count <= SMALL_TENSOR and tensor.data_location != onnx.TensorProto.EXTERNAL:
        with contextlib.suppress(Exception):  # an unusual element type: the dtype and shape still tell the story
            described["value"] = _plain(weight_array(tensor, None).reshape(-1))
    return described


def _plain(array: npt.NDArray[Any]) -> list[Any]:
    """``array``'s values as JSON's: strings as text, numbers as numbers; a float16 or float32 value as the
    shortest text that reads back as the same value in its own type (not float64's long tail), and a value
    that is not finite as its name (``nan``, ``inf``, ``-inf``). Vectorized: a page of 10,000 float32
    values took 27 ms value by value (``astype(str)``), on the event loop, and a flood of weights pages held
    the probes 11 to 30 s (outside attack rt45); now about 1 ms."""
    if array.dtype.kind in "SO":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in array.tolist()]
    if array.dtype.kind not in "biuf":
        array = array.astype(np.float32)
    values: list[Any]
    if array.dtype == np.float32:
        # orjson writes each float32 as its shortest text, which reads back as that float
        values = orjson.loads(orjson.dumps(np.ascontiguousarray(array), option=orjson.OPT_SERIALIZE_NUMPY))
    elif array.dtype == np.float16:
        values = _float16_values()[array.view(np.uint16)].tolist()
    else:
        values = array.tolist()
    if array.dtype.kind == "f":
        for at in np.flatnonzero(~np.isfinite(array)).tolist():
            values[at] = str(array[at])
    return values


@functools.cache
def _float16_values() -> npt.NDArray[np.float64]:
    """Each of the 65,536 float16 bit patterns' value, read from its shortest float16 text (NaN for those
    that are not finite: :func:`_plain` names them); built once, in about 0.1 s."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.isfinite(every)
    values = np.full(every.shape, np.nan)
    values[finite] = [float(text) for text in every[finite].astype(str)]
    return values


def _inferred_values(model: onnx.ModelProto, warnings: list[str]) -> dict[str, ValueInfo]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # inference is best effort: unknown custom ops, > 2 GB protos
        warnings.append(f"shape inference failed: {type(e).__name__}: {e}")
        inferred = model
    values: dict[str, ValueInfo] = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        values[info.name] = value_info(info)
    return values


def value_info(info: onnx.ValueInfoProto) -> ValueInfo:
    kind = info.type.WhichOneof("value")
    if kind != "tensor_type":
        return ValueInfo(info.name, kind or "unknown", None)
    tensor = info.type.tensor_type
    shape: list[Dim] | None = None
    if tensor.HasField("shape"):
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in tensor.shape.dim
        ]
    return ValueInfo(info.name, _dtype_name(tensor.elem_type), shape)


def _dtype_name(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type not in _NAMED else _NAMED[elem_type]
    except Exception:  # types numpy does not have
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


_NAMED: Mapping[int, str] = {
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.UNDEFINED: "undefined",
}
