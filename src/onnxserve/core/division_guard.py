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
dividend is a constant holding no minimum, cannot overflow and is left as it is, and so is one of a known
type that does not trap (float, int8, unsigned, ...).

Names are read by scope, as ONNX Runtime reads them: an operand means what the graph holding the ``Div``
defines under its name or, where that graph defines nothing of the name, the nearest enclosing graph; a
constant, a value_info entry or an input/output type counts only in the graph that defines the name, and a
name defined twice there means nothing. Element types come from those declarations and from ONNX shape
inference, run on a copy without the large weights and without the declared value_info and output types.
The guard fails closed: a ``Div`` whose element type is unknown, or stated two ways, gets
:func:`any_type_guard`, exact for every type (it needs opset 11); below opset 11 such a model is refused
with a :class:`~onnxserve.errors.ModelLoadError` naming the node.

The model on disk is never changed: the served session (and the sessions of a diff, which the web page runs
in the server's process) is made from the rewritten copy in memory (``core.runtime.guarded_session``),
and the toolkit's verbs (inspect, diff, optimize) read the file as it is.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import Message
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper, numpy_helper

from onnxserve.errors import ModelLoadError

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
    to serve. ``where`` names the model in the log and in the :class:`ModelLoadError` raised for a model
    whose division of unknown type cannot be guarded (default opset below 11)."""
    if not _any_division(model):
        return None
    if any(_is_division(node) for function in model.functions for node in _function_nodes(function)):
        # A function's element types depend on where it is called: inline it, so every call is typed.
        model = onnx.inliner.inline_local_functions(model)
    scopes = list(_scopes(model.graph))
    divisions = [(scope, node) for scope in scopes for node in scope.graph.node if _is_division(node)]
    if all(_cannot_overflow(node, _known_values(scope, node)) for scope, node in divisions):
        return None  # every division has a constant divisor without -1, or a constant dividend without MIN
    types = _Types(scopes)
    if any(not types.element(scope, node) for scope, node in divisions):
        types.add(_inferred_scopes(model))
    names = _Names(model)
    opset = _default_opset(model)
    guarded = sum(_guard_graph(scope, types, names, opset, where) for scope in scopes)
    if guarded == 0:
        return None
    log.info("%s: %d division(s) guarded against INT_MIN / -1", where, guarded)
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


class _Scope:
    """One graph of the model and the names it defines. A name used in a graph means what that graph
    defines under it or, if it defines nothing of that name, what the nearest enclosing graph does: only
    that definition's declarations (value_info, input and output types, constants) say anything about it."""

    def __init__(self, graph: GraphProto, parent: _Scope | None, path: tuple[int, ...]) -> None:
        self.graph = graph
        self.parent = parent
        self.path = path  # (node, attribute, graph) indices from the main graph down to this one
        self.inputs = {info.name for info in graph.input}
        self.defined: Counter[str] = Counter(self.inputs | {tensor.name for tensor in graph.initializer})
        self.defined.update(name for node in graph.node for name in node.output if name)

    def owner(self, name: str) -> _Scope | None:
        """The scope whose definition ``name`` means here; None where it is defined twice there, or nowhere."""
        scope: _Scope | None = self
        while scope is not None:
            count = scope.defined[name]
            if count:
                return scope if count == 1 else None
            scope = scope.parent
        return None


def _scopes(graph: GraphProto, parent: _Scope | None = None, path: tuple[int, ...] = ()) -> Iterator[_Scope]:
    """``graph``'s scope and the scopes of every graph nested in its nodes' attributes, innermost first."""
    scope = _Scope(graph, parent, path)
    for i, node in enumerate(graph.node):
        for j, attribute in enumerate(node.attribute):
            if attribute.type == AttributeProto.GRAPH:
                yield from _scopes(attribute.g, scope, (*path, i, j, 0))
            elif attribute.type == AttributeProto.GRAPHS:
                for k, sub in enumerate(attribute.graphs):
                    yield from _scopes(sub, scope, (*path, i, j, k))
    yield scope


def _declarations(scope: _Scope) -> dict[str, set[int]]:
    """The element types a graph states for the names it defines itself (a graph's value_info entry for
    a name only another graph defines means nothing: ONNX Runtime ignores it)."""
    types: dict[str, set[int]] = {}
    graph = scope.graph
    stated = [(info.name, info.type.tensor_type.elem_type) for info in (*graph.input, *graph.output, *graph.value_info)]
    stated += [(tensor.name, tensor.data_type) for tensor in graph.initializer]
    for name, element in stated:
        if element and scope.defined[name] == 1:
            types.setdefault(name, set()).add(element)
    return types


class _Types:
    """Element types by scope: what the model declares, and what shape inference finds."""

    def __init__(self, scopes: list[_Scope]) -> None:
        self._by_path = {scope.path: _declarations(scope) for scope in scopes}

    def add(self, scopes: list[_Scope]) -> None:
        for scope in scopes:
            mine = self._by_path.get(scope.path)
            if mine is None:
                continue
            for name, elements in _declarations(scope).items():
                mine.setdefault(name, set()).update(elements)

    def element(self, scope: _Scope, node: NodeProto) -> int:
        """A division's element type: the one type every trustworthy statement about its operands and its
        result gives, or 0 (unknown) when there is none or they disagree."""
        found: set[int] = set()
        for name in (*node.input, *node.output):
            owner = scope.owner(name) if name else None
            if owner is not None:
                found |= self._by_path[owner.path].get(name, set())
        return found.pop() if len(found) == 1 else 0


def _inferred_scopes(model: onnx.ModelProto) -> list[_Scope]:
    """The scopes of ``model`` as ONNX shape inference types them, from a copy without its large weights
    and without the types the model states beyond its graphs' inputs (which are not to be believed)."""
    skeleton = _without_weights(model)
    for graph in _graphs(skeleton.graph):
        del graph.value_info[:]
        for info in graph.output:
            info.ClearField("type")
    try:
        return list(_scopes(onnx.shape_inference.infer_shapes(skeleton).graph))
    except Exception as e:  # onnx raises several types
        log.warning("shape inference failed (%s): divisions of unknown type get the guard for any type", e)
        return []


def _default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), default=0)


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


def _known_values(scope: _Scope, node: NodeProto) -> dict[str, np.ndarray]:
    """The values of ``node``'s operands fixed by the model, which a client cannot replace: small
    initializers that are not also graph inputs, and Constant nodes' values, of the graph whose
    definition each operand means there (see :class:`_Scope`)."""
    known: dict[str, np.ndarray] = {}
    for name in node.input:
        owner = scope.owner(name) if name else None
        if owner is None or name in owner.inputs:
            continue
        value = _constant(owner.graph, name)
        if value is not None:
            known[name] = value
    return known


def _constant(graph: GraphProto, name: str) -> np.ndarray | None:
    for tensor in graph.initializer:
        if tensor.name == name:
            return _small_array(tensor)
    for node in graph.node:
        if name not in node.output:
            continue
        if node.op_type != "Constant" or node.domain not in _ONNX_DOMAINS:
            return None
        for attribute in node.attribute:
            if attribute.name == "value":
                return _small_array(attribute.t)
            if attribute.name == "value_int":
                return np.array(attribute.i, dtype=np.int64)
            if attribute.name == "value_ints":
                return np.array(list(attribute.ints), dtype=np.int64)
        return None
    return None


def _small_array(tensor: TensorProto) -> np.ndarray | None:
    """A small constant's values; not a STRING one (numpy pads each string to the longest: no divisor)."""
    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.data_location != TensorProto.EXTERNAL and tensor.ByteSize() <= SKELETON_TENSOR_BYTES:
        return numpy_helper.to_array(tensor)
    return None


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


GENERIC_GUARD_OPSET = 11
"""The default-domain opset from which :func:`any_type_guard` can be built (``Equal`` takes every numeric
type from opset 11)."""

CAST_LIKE_OPSET = 15
"""From this opset :func:`any_type_guard` turns its condition into a number of the division's type with
``CastLike``; before it, it picks between the divisor and 1 with ``GatherElements`` (ONNX Runtime's
``Where`` has no int16, uint16 or uint64 kernel, so it cannot do the choosing)."""


def any_type_guard(
    dividend: str, divisor: str, fresh: Callable[[str], str], opset: int = CAST_LIKE_OPSET
) -> tuple[list[NodeProto], str]:
    """Nodes that compute a divisor safe for ``Div(dividend, divisor)`` whatever the element type, and its
    name, for a graph of default-domain ``opset`` (at least :data:`GENERIC_GUARD_OPSET`). No constant of
    the type is needed: ``zero = x - x``; with two's-complement wrapping, the dividend is its type's
    minimum exactly when ``dividend < 0 and 0 - dividend == dividend``, and the divisor is -1 exactly when
    ``divisor < 0 and n * n == n`` for ``n = 0 - divisor`` (only 0 and 1 are their own wrapped squares).
    Neither holds for a float or an unsigned type. Where both hold, the divisor becomes 1 (it gets
    ``k + k`` added, ``k`` the condition cast like the divisor; before opset 15, ``n`` is picked instead of
    it), so the answer is the minimum; every other quotient is unchanged. Sub, Mul and Equal wrap or
    compare, they never trap."""
    nodes: list[NodeProto] = []

    def node(op_type: str, inputs: list[str], **attributes: Any) -> str:
        output = fresh(op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [output], name=fresh(op_type.lower()), **attributes))
        return output

    zero_a = node("Sub", [dividend, dividend])
    at_minimum = node(
        "And", [node("Less", [dividend, zero_a]), node("Equal", [node("Sub", [zero_a, dividend]), dividend])]
    )
    zero_d = node("Sub", [divisor, divisor])
    flipped = node("Sub", [zero_d, divisor])
    by_minus_one = node(
        "And", [node("Less", [divisor, zero_d]), node("Equal", [node("Mul", [flipped, flipped]), flipped])]
    )
    both = node("And", [at_minimum, by_minus_one])
    if opset >= CAST_LIKE_OPSET:
        step = node("CastLike", [both, divisor])
        return nodes, node("Add", [divisor, node("Add", [step, step])])
    # [divisor, n] side by side on a new last axis, at the full broadcast shape, and the condition picks.
    shape = node("Shape", [both])
    choices = [node("Expand", [divisor, shape]), node("Expand", [flipped, shape])]
    picks = node("Cast", [both], to=TensorProto.INT64)
    if opset >= 13:
        axes = node("Constant", [], value=numpy_helper.from_array(np.array([-1], dtype=np.int64)))
        last = [node("Unsqueeze", [value, axes]) for value in (*choices, picks)]
        picked = node("GatherElements", [node("Concat", last[:2], axis=-1), last[2]], axis=-1)
        return nodes, node("Squeeze", [picked, axes])
    last = [node("Unsqueeze", [value], axes=[-1]) for value in (*choices, picks)]
    picked = node("GatherElements", [node("Concat", last[:2], axis=-1), last[2]], axis=-1)
    return nodes, node("Squeeze", [picked], axes=[-1])


def _guard_graph(scope: _Scope, types: _Types, names: _Names, opset: int, where: str) -> int:
    """Guard ``scope``'s graph's own divisions that could trap (not its subgraphs'); how many were guarded."""
    graph = scope.graph
    constants: dict[int, tuple[str, str, str]] = {}  # element type -> names of MIN, -1 and 2 in this graph
    prologue: list[NodeProto] = []
    nodes: list[NodeProto] = []
    guarded = 0
    for node in graph.node:
        if not _is_division(node) or len(node.input) != 2 or len(node.output) != 1:
            nodes.append(node)
            continue
        dividend, divisor = node.input
        element = types.element(scope, node)
        if (element and element not in TRAPPING_TYPES) or _cannot_overflow(node, _known_values(scope, node)):
            nodes.append(node)
            continue
        if not element:  # fail closed: a division of unknown type gets the guard that is exact for any type
            label = node.name or node.output[0]
            if opset < GENERIC_GUARD_OPSET:
                raise ModelLoadError(
                    f"{where}: Div node {label!r}: the element type of its operands cannot be determined, so it "
                    f"could be an integer division that INT_MIN / -1 crashes, and the model's opset {opset} has "
                    f"no operators for a guard that works for every type (opset {GENERIC_GUARD_OPSET} or later "
                    "has); the model is refused"
                )
            log.info("%s: Div node %r: element type unknown, guarded for any type", where, label)
            added, safe = any_type_guard(dividend, divisor, names.fresh, opset)
            nodes += added
        else:
            if element not in constants:
                dtype = TRAPPING_TYPES[element]
                constants[element] = (names.fresh("min"), names.fresh("minus_one"), names.fresh("two"))
                for name, value in zip(constants[element], (np.iinfo(dtype).min, -1, 2), strict=True):
                    tensor = numpy_helper.from_array(np.array(value, dtype=dtype), name)
                    prologue.append(
                        helper.make_node("Constant", [], [name], name=names.fresh("constant"), value=tensor)
                    )
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
