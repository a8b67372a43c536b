"""Integer division a client cannot turn into a crash: ``INT_MIN / -1`` guarded in every served graph.

ONNX Runtime's CPU kernel for an int32 or int64 ``Div`` divides with the processor's own instruction, which
traps when the quotient overflows: the type's minimum divided by -1. The trap is SIGFPE, which ends the
whole process (Python cannot catch a signal raised inside C code), so one request holding those two values
would stop the server for everyone. Division by zero is refused by ONNX Runtime itself (an error, which
becomes a 400), ``Mod`` (``fmod`` 0 or 1) computes without the trap, and int8/int16 division is done in a
wider type; a probe of the other operators whose kernels divide by values a client can choose (Range,
Reshape, SplitToSequence, Pad, Resize, STFT, DFT, Col2Im, ReduceMean, ...) found none that traps.

:func:`guard_division` rewrites each such ``Div`` -- in the main graph, in If/Loop/Scan bodies, and in
model-local functions (inlined first) -- so that its divisor is 1 wherever the dividend is the minimum and
the divisor is -1: the answer there is the minimum itself, the two's-complement wrap numpy also gives
(``divisor + 2 * (dividend == MIN and divisor == -1)``, three elementwise operators beside the division).
A ``Div`` whose divisor is a constant holding no -1 (the ``size / 2`` of shape arithmetic), or whose
dividend is a constant holding no minimum, cannot overflow and is left as it is. Element types come from
ONNX shape inference, run on a copy of the graph without its large weights.

The model on disk is never changed: the served session is made from the rewritten copy in memory, and the
toolkit's verbs (inspect, diff, optimize) read the file as it is.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import Message
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

TRAPPING_TYPES: dict[int, type[np.signedinteger[Any]]] = {TensorProto.INT32: np.int32, TensorProto.INT64: np.int64}
"""The element types whose division ONNX Runtime's CPU kernel does with a trapping instruction."""

SKELETON_TENSOR_BYTES = 64 * 1024
"""Initializers up to this size go into the copy that shape inference reads (shape constants); larger ones
(weights) are declared there by type and shape only, so inference never copies a model's weights."""

PREFIX = "onnxserve.division_guard"
"""The name prefix of the nodes and values the guard adds."""

_ONNX_DOMAINS = ("", "ai.onnx")


def guard_division(model: onnx.ModelProto, where: str = "the model") -> onnx.ModelProto | None:
    """``model`` with every integer ``Div`` that could trap guarded (see the module), or None when it has
    none: then nothing was changed or copied. May rewrite ``model`` in place; what it returns is the model
    to serve. ``where`` names the model in the log."""
    if not _any_division(model):
        return None
    if any(_is_division(node) for function in model.functions for node in _function_nodes(function)):
        # A function's element types depend on where it is called: inline it, so every call is typed.
        model = onnx.inliner.inline_local_functions(model)
    divisions = [node for graph in _graphs(model.graph) for node in graph.node if _is_division(node)]
    known = _known_values(model, {name for node in divisions for name in node.input})
    if all(_cannot_overflow(node, known) for node in divisions):
        return None  # every division has a constant divisor without -1, or a constant dividend without MIN
    types = _declared_types(model)
    if any(not _element_type(node, types) for node in divisions):
        types.update(_inferred_types(model))
    names = _Names(model)
    guarded = sum(_guard_graph(graph, types, known, names, where) for graph in list(_graphs(model.graph)))
    if guarded == 0:
        return None
    log.info("%s: %d integer division(s) guarded against INT_MIN / -1", where, guarded)
    return model


def _is_division(node: NodeProto) -> bool:
    return node.op_type == "Div" and node.domain in _ONNX_DOMAINS


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes, innermost first."""
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)
    yield graph


def _function_nodes(function: onnx.FunctionProto) -> Iterator[NodeProto]:
    for node in function.node:
        yield node
        for sub in _subgraphs(node):
            for graph in _graphs(sub):
                yield from graph.node


def _any_division(model: onnx.ModelProto) -> bool:
    graphs = (node for graph in _graphs(model.graph) for node in graph.node)
    functions = (node for function in model.functions for node in _function_nodes(function))
    return any(_is_division(node) for node in itertools.chain(graphs, functions))


def _element_type(node: NodeProto, types: dict[str, int]) -> int:
    """A division's element type (0: unknown)."""
    return next((types[name] for name in (*node.input, *node.output) if types.get(name)), 0)


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every value's element type that ONNX shape inference finds."""
    skeleton = _without_weights(model)
    try:
        return _declared_types(onnx.shape_inference.infer_shapes(skeleton))
    except Exception as e:  # onnx raises several types
        log.warning("shape inference failed (%s): integer divisions are found by declared types only", e)
        return {}


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element types the model states: its graphs' inputs, outputs, value_info and initializers."""
    types: dict[str, int] = {}
    for graph in _graphs(model.graph):
        for info in itertools.chain(graph.input, graph.output, graph.value_info):
            types[info.name] = info.type.tensor_type.elem_type
        for tensor in graph.initializer:
            types[tensor.name] = tensor.data_type
    return types


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are declared as typed inputs instead of carried."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if tensor.ByteSize() <= SKELETON_TENSOR_BYTES:
            skeleton.graph.initializer.append(tensor)
        else:
            skeleton.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float)):
            setattr(target, field.name, value)
        else:  # a repeated field
            getattr(target, field.name).extend(value)


def _known_values(model: onnx.ModelProto, wanted: set[str]) -> dict[str, np.ndarray]:
    """The ``wanted`` values fixed by the model, which a client cannot replace: small initializers that are
    not also graph inputs, and Constant nodes' values, anywhere in the model."""
    inputs = {info.name for graph in _graphs(model.graph) for info in graph.input}
    known: dict[str, np.ndarray] = {}
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.name in wanted and tensor.name not in inputs:
                _remember(known, tensor.name, tensor)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS and node.output and node.output[0] in wanted:
                for attribute in node.attribute:
                    if attribute.name == "value":
                        _remember(known, node.output[0], attribute.t)
                    elif attribute.name == "value_int":
                        known[node.output[0]] = np.array(attribute.i, dtype=np.int64)
                    elif attribute.name == "value_ints":
                        known[node.output[0]] = np.array(list(attribute.ints), dtype=np.int64)
    return known


def _remember(known: dict[str, np.ndarray], name: str, tensor: TensorProto) -> None:
    if tensor.data_location != TensorProto.EXTERNAL and tensor.ByteSize() <= SKELETON_TENSOR_BYTES:
        known[name] = numpy_helper.to_array(tensor)


class _Names:
    """Fresh value and node names, none of them already in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        taken: set[str] = set()
        for graph in _graphs(model.graph):
            taken.update(info.name for info in itertools.chain(graph.input, graph.output, graph.value_info))
            taken.update(tensor.name for tensor in graph.initializer)
            for node in graph.node:
                taken.update(node.output)
                taken.add(node.name)
        self._taken = taken
        self._count = itertools.count()

    def fresh(self, what: str) -> str:
        while True:
            name = f"{PREFIX}/{what}_{next(self._count)}"
            if name not in self._taken:
                self._taken.add(name)
                return name


def _cannot_overflow(node: NodeProto, known: dict[str, np.ndarray]) -> bool:
    """Whether a division's constant operands rule the overflow out (a constant of a type that does not
    trap, a divisor without -1, a dividend without its type's minimum)."""
    dividend, divisor = (known.get(name) for name in node.input[:2]) if len(node.input) >= 2 else (None, None)
    for value in (dividend, divisor):
        if value is not None and value.dtype not in (np.int32, np.int64):
            return True
    if divisor is not None and not np.any(divisor == -1):
        return True
    return dividend is not None and not np.any(dividend == np.iinfo(dividend.dtype).min)


def _guard_graph(
    graph: GraphProto, types: dict[str, int], known: dict[str, np.ndarray], names: _Names, where: str
) -> int:
    """Guard ``graph``'s own integer divisions (not its subgraphs'); how many were guarded."""
    constants: dict[int, tuple[str, str, str]] = {}  # element type -> names of MIN, -1 and 2 in this graph
    prologue: list[NodeProto] = []
    nodes: list[NodeProto] = []
    guarded = 0
    for node in graph.node:
        if not _is_division(node) or len(node.input) != 2 or len(node.output) != 1:
            nodes.append(node)
            continue
        dividend, divisor = node.input
        element = _element_type(node, types)
        if element == 0:
            log.warning(
                "%s: Div node %r: the element type of its inputs cannot be inferred; it is served unguarded",
                where,
                node.name or node.output[0],
            )
        if element not in TRAPPING_TYPES or _cannot_overflow(node, known):
            nodes.append(node)
            continue
        if element not in constants:
            dtype = TRAPPING_TYPES[element]
            constants[element] = (names.fresh("min"), names.fresh("minus_one"), names.fresh("two"))
            for name, value in zip(constants[element], (np.iinfo(dtype).min, -1, 2), strict=True):
                tensor = numpy_helper.from_array(np.array(value, dtype=dtype), name)
                prologue.append(helper.make_node("Constant", [], [name], name=names.fresh("constant"), value=tensor))
        minimum, minus_one, two = constants[element]
        at_minimum, by_minus_one, both, step, raised, safe = (
            names.fresh(what) for what in ("at_min", "by_minus_one", "overflow", "overflow_int", "step", "divisor")
        )
        nodes += [
            helper.make_node("Equal", [dividend, minimum], [at_minimum], name=names.fresh("equal")),
            helper.make_node("Equal", [divisor, minus_one], [by_minus_one], name=names.fresh("equal")),
            helper.make_node("And", [at_minimum, by_minus_one], [both], name=names.fresh("and")),
            helper.make_node("Cast", [both], [step], name=names.fresh("cast"), to=element),
            helper.make_node("Mul", [step, two], [raised], name=names.fresh("mul")),
            helper.make_node("Add", [divisor, raised], [safe], name=names.fresh("add")),
        ]
        guarded_node = NodeProto()
        guarded_node.CopyFrom(node)
        guarded_node.input[1] = safe
        nodes.append(guarded_node)
        guarded += 1
    if guarded:
        del graph.node[:]
        graph.node.extend(prologue + nodes)
    return guarded
