"""``onnxserve inspect``: what a model is, how big it is, and how much work it does at a given shape.

:func:`inspect_model` reads an ONNX file or a version folder (``model.onnx`` + ``onnxserve.json``)
without reading its weights: IR version, opsets, producer, inputs and outputs with their symbolic
dims, the operator histogram (nodes of sub-graphs included), parameters (initializer elements) and
their bytes, external data files, metadata properties, the pipeline spec, and FLOPs estimated for the
heavy operators at concrete input shapes.

FLOPs count a multiply-add as 2 and leave out bias additions and everything elementwise:

- ``MatMul`` / ``MatMulInteger`` / ``QLinearMatMul``: ``2 * prod(output shape) * K`` (K: A's last dim);
- ``Gemm``: ``2 * M * N * K``;
- ``Conv`` / ``ConvInteger`` / ``QLinearConv``: ``2 * prod(output shape) * (C_in / group) * prod(kernel)``;
- ``ConvTranspose``: ``2 * prod(input shape) * (C_out / group) * prod(kernel)``;
- ONNX Runtime's fused ``com.microsoft`` ``Attention``: the QKV projection ``2 * B * S * hidden * 3h``
  plus the two attention products ``2 * B * S * S * h`` each; ``MultiHeadAttention`` (separate 3-D
  query, key and value): the two products.

Shapes come from ONNX shape inference (with data propagation) on a copy whose input dims are made
concrete: ``--shape NAME=D0,D1,...`` for an input, or ``--shape DIM=N`` for a symbolic dim by its name;
every other symbolic dim defaults to 1, and the report says which defaults it took.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxserve.core.pipeline import PipelineSpec
from onnxserve.errors import InvalidInputError
from onnxserve.toolkit import model_header
from onnxserve.toolkit.graph import Dim, ValueInfo, value_info
from onnxserve.toolkit.model_file import load_model, locate_model

DEFAULT_DIM = 1
_SHAPE = re.compile(r"^\s*([^=]+?)\s*=\s*([0-9]+(?:\s*,\s*[0-9]+)*)\s*$")


@dataclass(frozen=True)
class ShapeRequest:
    """``--shape`` arguments: whole input shapes by input name, single dims by symbolic name."""

    inputs: dict[str, list[int]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)


def parse_shapes(texts: Iterable[str], graph_inputs: Sequence[ValueInfo]) -> ShapeRequest:
    """``name=1,128`` for an input (its rank must match), ``sequence=128`` for a symbolic dim."""
    by_name = {v.name: v for v in graph_inputs}
    symbolic = {d for v in graph_inputs for d in (v.shape or []) if isinstance(d, str)}
    request = ShapeRequest()
    for text in texts:
        match = _SHAPE.match(text)
        if match is None:
            raise InvalidInputError(f"--shape {text!r}: expected NAME=D0,D1,... (an input) or DIM=N (a symbolic dim)")
        name, dims = match.group(1), [int(d) for d in match.group(2).split(",")]
        if any(d <= 0 for d in dims):
            raise InvalidInputError(f"--shape {text!r}: dims must be positive")
        if name in by_name:
            known = by_name[name].shape
            if known is not None and len(known) != len(dims):
                raise InvalidInputError(
                    f"--shape {text!r}: input {name!r} has {len(known)} dims {_dims_text(known)}, not {len(dims)}"
                )
            for want, got in zip(known or [], dims, strict=False):
                if isinstance(want, int) and want != got:
                    raise InvalidInputError(
                        f"--shape {text!r}: input {name!r} has a fixed dim {want} where {got} was given"
                    )
            request.inputs[name] = dims
        elif name in symbolic:
            if len(dims) != 1:
                raise InvalidInputError(f"--shape {text!r}: a symbolic dim takes one number")
            request.dims[name] = dims[0]
        else:
            known_names = ", ".join([*by_name, *sorted(symbolic)]) or "none"
            raise InvalidInputError(f"--shape {text!r}: no input or symbolic dim named {name!r}; known: {known_names}")
    return request


@dataclass(frozen=True)
class ExternalFile:
    location: str
    tensors: int
    bytes: int
    present: bool


@dataclass(frozen=True)
class FlopsEstimate:
    total: int
    by_op: dict[str, int]
    input_shapes: dict[str, list[int]]
    defaults: dict[str, int]
    """Symbolic dims that took the default value."""
    unestimated: list[str]
    """Heavy nodes whose shapes inference could not make concrete."""


@dataclass
class InspectReport:
    file: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    graph_name: str
    doc_string: str
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    op_histogram: dict[str, int]
    nodes: int
    parameters: int
    parameter_bytes: int
    initializers: int
    external_data: list[ExternalFile]
    metadata: dict[str, str]
    flops: FlopsEstimate
    pipeline: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect_model(path: Path, *, shapes: Sequence[str] = ()) -> InspectReport:
    """Inspect MODEL (a file or a version folder) without reading its weights."""
    location = locate_model(path)
    model = load_model(location.file)
    inputs, outputs = graph_signature(model)
    request = parse_shapes(shapes, inputs)
    spec = PipelineSpec.read(location.folder) if location.folder is not None else None
    parameters, parameter_bytes = parameter_size(model)
    producer = model_header.producer(model)
    return InspectReport(
        file=str(location.file),
        ir_version=model.ir_version,
        opsets=model_header.opsets(model),
        producer=producer,
        graph_name=model.graph.name,
        doc_string=model.doc_string or model.graph.doc_string,
        inputs=inputs,
        outputs=outputs,
        op_histogram=op_histogram(model),
        nodes=sum(op_histogram(model).values()),
        parameters=parameters,
        parameter_bytes=parameter_bytes,
        initializers=len(model.graph.initializer),
        external_data=external_files(model, location.file.parent),
        metadata={p.key: p.value for p in model.metadata_props},
        flops=estimate_flops(model, request),
        pipeline=spec.model_dump(mode="json") if spec is not None else None,
    )


def graph_signature(model: onnx.ModelProto) -> tuple[list[ValueInfo], list[ValueInfo]]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [value_info(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [value_info(v) for v in model.graph.output]


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per operator (``domain::Op`` outside the default domain), sub-graphs included, most first."""
    counts: Counter[str] = Counter()
    for node in _all_nodes(model.graph):
        counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(counts.most_common())


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_nodes(sub)


def parameter_size(model: onnx.ModelProto) -> tuple[int, int]:
    """Elements and bytes of all initializers (read from the protos' dims, not from the data)."""
    count = size = 0
    for tensor in model.graph.initializer:
        elements = int(np.prod(list(tensor.dims), dtype=np.int64)) if tensor.dims else 1
        count += elements
        size += elements * _itemsize(tensor.data_type)
    return count, size


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:  # strings and types numpy lacks: their size is not fixed
        return 0


def external_files(model: onnx.ModelProto, base_dir: Path) -> list[ExternalFile]:
    """The external data files the initializers name, with the bytes they use and whether they exist."""
    files: dict[str, list[int]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        length = int(entries["length"]) if "length" in entries else 0
        seen = files.setdefault(location, [0, 0])
        seen[0] += 1
        seen[1] += length
    return [
        ExternalFile(location, tensors, size, (base_dir / location).is_file())
        for location, (tensors, size) in sorted(files.items())
    ]


# ---------------------------------------------------------------------------------------------- FLOPs


def concrete_inputs(inputs: Sequence[ValueInfo], request: ShapeRequest) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Each input's concrete shape, and the symbolic dims that took the default."""
    shapes: dict[str, list[int]] = {}
    defaults: dict[str, int] = {}
    for value in inputs:
        if value.name in request.inputs:
            shapes[value.name] = request.inputs[value.name]
            continue
        dims: list[int] = []
        for index, dim in enumerate(value.shape or []):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, str) and dim in request.dims:
                dims.append(request.dims[dim])
            else:
                key = dim if isinstance(dim, str) and dim else f"{value.name}[{index}]"
                defaults[key] = DEFAULT_DIM
                dims.append(DEFAULT_DIM)
        shapes[value.name] = dims
    return shapes, defaults


def estimate_flops(model: onnx.ModelProto, request: ShapeRequest) -> FlopsEstimate:
    inputs, _ = graph_signature(model)
    shapes, defaults = concrete_inputs(inputs, request)
    shaped = _with_input_shapes(model, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception:  # inference is best effort; what stays unknown is reported as unestimated
        inferred = shaped
    known: dict[str, list[Dim]] = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        tensor = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor.HasField("shape"):
            known[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    for init in model.graph.initializer:
        known[init.name] = list(init.dims)
    by_op: Counter[str] = Counter()
    unestimated: list[str] = []
    for node in model.graph.node:
        if node.op_type not in FLOP_OPS:
            continue
        flops = node_flops(node, known)
        if flops is None:
            unestimated.append(node.name or node.op_type)
        else:
            by_op[node.op_type] += flops
    return FlopsEstimate(sum(by_op.values()), dict(by_op.most_common()), shapes, defaults, unestimated)


def _with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> onnx.ModelProto:
    """A structural copy (no weight data is read) whose graph inputs have the given concrete dims."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    named: dict[str, int] = {}  # symbolic dim -> the value it takes, to fix the exporter's value_info too
    for info in copy.graph.input:
        if info.name not in shapes or not info.type.HasField("tensor_type"):
            continue
        shape = info.type.tensor_type.shape
        for dim, value in zip(shape.dim, shapes[info.name], strict=False):
            if dim.HasField("dim_param") and dim.dim_param:
                named.setdefault(dim.dim_param, value)
        shape.ClearField("dim")
        for d in shapes[info.name]:
            shape.dim.add().dim_value = d
    for info in (*copy.graph.value_info, *copy.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param in named:
                    dim.dim_value = named[dim.dim_param]
    return copy


FLOP_OPS = frozenset(
    {
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "Gemm",
        "Conv",
        "ConvInteger",
        "QLinearConv",
        "ConvTranspose",
        "Attention",
        "MultiHeadAttention",
    }
)


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, list[Dim]]) -> int | None:
    """The FLOPs of one heavy node, or None when a shape it needs is unknown."""

    def concrete(name: str) -> list[int] | None:
        dims = shapes.get(name)
        if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        return [int(d) for d in dims if isinstance(d, int)]

    op = node.op_type
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = concrete(node.input[0])
        out = concrete(node.output[0])
        if a is None or out is None:
            return None
        return 2 * _prod(out) * a[-1]
    if op == "Gemm":
        a, b = concrete(node.input[0]), concrete(node.input[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        attrs = {x.name: x.i for x in node.attribute if x.type == onnx.AttributeProto.INT}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return 2 * m * n * k
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        weight_index = 3 if op == "QLinearConv" else 1
        w, out = concrete(node.input[weight_index]), concrete(node.output[0])
        if w is None or out is None:
            return None
        return 2 * _prod(out) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = concrete(node.input[0]), concrete(node.input[1])
        if x is None or w is None:
            return None
        return 2 * _prod(x) * _prod(w[1:])
    if op == "Attention" and node.domain == "com.microsoft":
        x, w = concrete(node.input[0]), concrete(node.input[1])
        if x is None or w is None or len(x) != 3 or len(w) != 2:
            return None
        batch, seq, _ = x
        qk_hidden = (w[1] - _v_hidden(node, w[1])) // 2
        projection = 2 * batch * seq * w[0] * w[1]
        return projection + 2 * batch * seq * seq * qk_hidden + 2 * batch * seq * seq * _v_hidden(node, w[1])
    if op == "MultiHeadAttention" and node.domain == "com.microsoft":
        query = concrete(node.input[0])
        key = concrete(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        value = concrete(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if query is None or key is None or value is None or not len(query) == len(key) == len(value) == 3:
            return None  # packed QKV and 4-D key/value layouts are not estimated
        batch, seq, width = query
        return 2 * batch * seq * key[1] * width + 2 * batch * seq * value[1] * value[2]
    return None


def _v_hidden(node: onnx.NodeProto, total: int) -> int:
    """The V width of a fused Attention's packed QKV weight (``qkv_hidden_sizes``, else a third)."""
    for attribute in node.attribute:
        if attribute.name == "qkv_hidden_sizes" and len(attribute.ints) == 3:
            return int(attribute.ints[2])
    return total // 3


def _prod(dims: Sequence[int]) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def _dims_text(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
