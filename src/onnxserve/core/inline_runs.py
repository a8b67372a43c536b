"""Which executions of a model may run on the event loop itself, with no thread hand-off.

Handing a run to its instance thread and back costs two cross-thread wake-ups and a few dozen
microseconds of CPU: for a tiny model (an add, a small MLP) several times the run itself. Running it on
the event loop instead is safe only when its time is bounded and small, whatever a client sends, since
nothing else on the loop (other requests, other models, the probes) is served while it runs. The rule:

1. **The graph's cost is bounded by its input shapes** (:func:`why_not_shape_bounded`): every node is a
   default-domain operator on :data:`SHAPE_BOUNDED_OPS` (elementwise, MatMul/Gemm, activations,
   Softmax, Transpose, Concat, Cast, reductions, ...; no Loop/Scan/If, no NonZero/Compress/Unique, no
   subgraph), and every input that sets a size (Reshape's shape, Slice's bounds, Expand's shape,
   ConstantOfShape, Range, TopK's k, Pad's pads, Resize's sizes, reduction axes, ...) is computed from
   constants and input *shapes* only (initializers, ``Constant``, ``Shape``/``Size`` and allowlisted
   nodes over those), never from input *values*. Such a graph's every tensor shape, hence its work, is
   a function of the request's input shapes. The graph takes no text (BYTES) inputs or outputs.
2. **This exact set of input shapes has run, and run fast** (:class:`InlineRuns`): of the last runs
   (up to :data:`WINDOW`) of these shapes, on the instance thread or inline, the median took at most the
   model's ``inline_run_us`` and none took more than :data:`OUTLIER` times that. A run's time is the CPU
   time of the thread that ran it (the whole execution, conversions included): not the wall clock, so
   that a loaded machine preempting the thread does not count against the run; and the median, since on
   a virtual machine even CPU time swings several times with the host's load (the add model: 32 to
   160 us per run at a load average of 16). A shape set not seen yet runs on the thread first; one
   whose runs got slower stops running inline until most of its recent runs are fast again, and one run
   over ``OUTLIER`` times the limit keeps it on the thread for the next ``WINDOW`` runs; :data:`STRIKES`
   inline runs over that within :data:`STRIKE_SPAN` inline runs turn inline runs off for the model
   version (its cost depends on something the rule cannot see).
3. **Nothing else of that model version is running or waiting** (checked by the scheduler): the
   scheduler's queue and slots stay authoritative.

Bounded memory: at most :data:`SHAPE_SETS` shape sets are remembered per version (the least recently
used is forgotten; forgotten shapes run on the thread again first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from onnxserve.core.execution import Work

log = logging.getLogger(__name__)

WINDOW = 16
"""Runs remembered per shape set: their median decides, and any of them over ``OUTLIER`` x the limit vetoes."""

OUTLIER = 10
"""A run of more than this many times the limit keeps its shapes off the loop while it is remembered, and
counts as a strike when it ran inline."""

SHAPE_SETS = 64
"""Shape sets remembered per model version (least recently used forgotten first)."""

STRIKES = 3
"""Inline runs over ``OUTLIER`` x the limit, within ``STRIKE_SPAN`` inline runs, after which a model version
stops running inline (its cost does depend on something the rule cannot see, e.g. denormal floats): logged."""

STRIKE_SPAN = 1000
"""Inline runs within which ``STRIKES`` strikes turn inline runs off (isolated ones, a host's hiccups, do not)."""

SIZE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Pad": (1, 3),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "OneHot": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Dropout": (1, 2),
    "CumSum": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
}
"""Inputs (by position) of allowlisted operators that set a size, an axis or a count: they must be
shape-determined (constants, or computed from input shapes), never input values."""

SHAPE_BOUNDED_OPS = frozenset(
    {
        # elementwise, unary
        *("Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Cos", "Cosh", "Erf", "Exp"),
        *("Floor", "Identity", "IsInf", "IsNaN", "Log", "Neg", "Not", "Reciprocal", "Round", "Sign", "Sin"),
        *("Sinh", "Sqrt", "Tan", "Tanh", "BitwiseNot", "Cast", "CastLike", "Clip"),
        # activations
        *("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish"),
        *("Mish", "Softplus", "Softsign", "ThresholdedRelu", "Softmax", "LogSoftmax", "Hardmax"),
        # elementwise, binary and variadic
        *("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor"),
        *("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Where", "BitShift"),
        *("BitwiseAnd", "BitwiseOr", "BitwiseXor"),
        # linear algebra, convolution, normalization
        *("MatMul", "Gemm", "MatMulInteger", "Einsum", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool"),
        *("GlobalMaxPool", "BatchNormalization", "InstanceNormalization", "LayerNormalization"),
        *("LpNormalization", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
        # layout
        *("Transpose", "Flatten", "Concat", "Gather", "GatherElements", "GatherND", "Shape", "Size"),
        *("DepthToSpace", "SpaceToDepth", "Trilu", "Constant", "ArgMax", "ArgMin"),
        # size-setting inputs checked (SIZE_INPUTS)
        *SIZE_INPUTS,
    }
)
"""Operators whose cost is bounded by their input shapes (with ``SIZE_INPUTS`` shape-determined)."""

_DEFAULT_DOMAINS = ("", "ai.onnx")


def why_not_shape_bounded(model: onnx.ModelProto) -> str | None:
    """None when every execution's cost of ``model`` is bounded by its input shapes (see the module);
    otherwise why not, for the log (the first operator or input that breaks the rule)."""
    graph = model.graph
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.STRING:
            return f"{value.name!r} is text (BYTES)"
    static = _constants(graph, set())
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in SHAPE_BOUNDED_OPS:
            return f"operator {node.op_type} ({node.name or 'unnamed'}) may take time its input values decide"
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return f"operator {node.op_type} ({node.name or 'unnamed'}) has a subgraph"
        if why := _sized_by_values(node, SIZE_INPUTS.get(node.op_type, ()), static):
            return why
        _propagate(node, static)
    return None


def _constants(graph: onnx.GraphProto, outer: set[str]) -> set[str]:
    """The names of ``graph`` known from constants and input shapes before its first node: ``outer``'s, and
    its initializers (sparse ones included) that are not also inputs."""
    inputs = {value.name for value in graph.input}
    static = set(outer)
    static.update(init.name for init in graph.initializer if init.name not in inputs)
    static.update(init.values.name for init in graph.sparse_initializer if init.values.name not in inputs)
    return static


def _sized_by_values(node: onnx.NodeProto, positions: tuple[int, ...], static: set[str]) -> str | None:
    """Why ``node`` takes a size from input values (one of its inputs at ``positions`` is not ``static``)."""
    for position in positions:
        if position < len(node.input) and node.input[position] and node.input[position] not in static:
            return (
                f"operator {node.op_type} ({node.name or 'unnamed'}) takes a size from input values "
                f"({node.input[position]!r})"
            )
    return None


def _propagate(node: onnx.NodeProto, static: set[str]) -> None:
    """Add ``node``'s outputs to ``static`` when they follow from constants and shapes only."""
    if node.op_type in ("Shape", "Size") or all(not name or name in static for name in node.input):
        static.update(name for name in node.output if name)


GROWING_INPUTS: dict[str, tuple[int, ...]] = {
    "ConstantOfShape": (0,),
    "Expand": (1,),
    "Tile": (1,),
    "Pad": (1,),
    "Range": (0, 1, 2),
    "OneHot": (1,),
    "Resize": (2, 3),
    "Upsample": (1,),
}
"""The ``SIZE_INPUTS`` that can make a tensor larger than the inputs: the others (Reshape, Slice, TopK's
k, reduction axes, ...) only pick within what is there."""

REPEATING_OPS = frozenset(("Loop", "Scan"))
"""Operators that repeat a step: a step that doubles what it carries grows it exponentially, whatever sets
the count (a constant trip count with a condition from input values took +5.1 GB: outside attack rt19)."""


def why_values_set_sizes(model: onnx.ModelProto) -> str | None:
    """None when no tensor of ``model`` can grow past its inputs' sizes by their *values*: every
    :data:`GROWING_INPUTS` input, in the main graph and its subgraphs, is computed from constants and
    input shapes only, and no :data:`REPEATING_OPS` repeats a step; otherwise why not. Weaker than
    :func:`why_not_shape_bounded` (any other operator, fused ones included, subgraphs too): what a run of
    generated inputs may be asked to allocate (the web diff runs both models so:
    ``ConstantOfShape(5e8 * min(ceil(|x|), 1))`` took +1.9 GB on random inputs after a warm-up on zeros,
    outside attack rt18)."""
    return _grows_by_values(model.graph, set())


def _grows_by_values(graph: onnx.GraphProto, outer: set[str]) -> str | None:
    static = _constants(graph, outer)
    for node in graph.node:
        default = node.domain in _DEFAULT_DOMAINS
        if default and node.op_type in REPEATING_OPS:
            return f"operator {node.op_type} ({node.name or 'unnamed'}) repeats a step that may grow what it carries"
        if default and (why := _sized_by_values(node, GROWING_INPUTS.get(node.op_type, ()), static)):
            return why
        for attribute in node.attribute:
            for sub in (attribute.g,) if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                if why := _grows_by_values(sub, static):
                    return why
        _propagate(node, static)
    return None


def shape_key(work: Work) -> Hashable:
    """What decides a tensor execution's cost under the rule: its inputs' shapes and the outputs asked for."""
    assert work.feeds is not None
    return (tuple((name, array.shape) for name, array in work.feeds.items()), tuple(work.fetch))


class InlineRuns:
    """One model version's record of its recent run times per input shape set, and the inline decision.

    Used on the event loop only (no lock)."""

    def __init__(self, limit_us: int, name: str) -> None:
        self.limit_ns = limit_us * 1000
        self.outlier_ns = self.limit_ns * OUTLIER
        self.name = name
        self.executions = 0  # executions run on the event loop
        self.strikes: deque[int] = deque(maxlen=STRIKES)  # when the last strikes were (``executions`` then)
        self.off = False
        self._runs: OrderedDict[Hashable, deque[int]] = OrderedDict()

    def allows(self, key: Hashable) -> bool:
        """Whether an execution of these shapes may run on the event loop (the scheduler checks that
        nothing else of the model runs or waits)."""
        if self.off:
            return False
        runs = self._runs.get(key)
        if runs is None or max(runs) > self.outlier_ns:
            return False
        ordered = sorted(runs)
        return ordered[len(ordered) // 2] <= self.limit_ns

    def observed(self, key: Hashable, ns: int) -> None:
        """An execution of these shapes took ``ns`` (on the instance thread or inline)."""
        runs = self._runs.get(key)
        if runs is None:
            runs = self._runs[key] = deque(maxlen=WINDOW)
            if len(self._runs) > SHAPE_SETS:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(key)
        runs.append(ns)

    def ran_inline(self, key: Hashable, ns: int) -> None:
        """An execution of these shapes ran on the event loop in ``ns`` (successful or not)."""
        self.executions += 1
        self.observed(key, ns)
        if ns <= self.outlier_ns:
            return
        self.strikes.append(self.executions)
        if len(self.strikes) == STRIKES and self.executions - self.strikes[0] < STRIKE_SPAN and not self.off:
            self.off = True
            log.warning(
                "model %s: %d runs on the event loop took more than %d us though their shapes had run within "
                "%d us; its runs stay on its instance threads from now on",
                self.name,
                STRIKES,
                self.outlier_ns // 1000,
                self.limit_ns // 1000,
            )
