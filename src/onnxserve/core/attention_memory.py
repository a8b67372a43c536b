"""How much memory one execution of a text model takes, and how much all of them take at once.

The token budget (``max_batch_tokens``) counts rows x tokens, but an encoder's execution holds, besides
a few activations per token (rows x tokens x the widest hidden layer), the attention scores of one
layer at a time: rows x heads x tokens x tokens floats, several copies of them (the scores, the mask
added, the softmax). So at the token budget the demo MiniLM's 32 rows of 256 tokens take several times
what 64 rows of 128 take. ``ExecutionMemory`` estimates an execution from its rows and padded length:

    live = 4 x (TOKEN_COPIES x widest x rows x tokens + SCORE_COPIES x heads x rows x tokens²)
    bytes = live + min(2 x live, HEAP_SLACK)

``heads`` and ``widest`` come from the graph (``attention_shape``, called by ``runtime.ModelSession``):
its shapes are inferred once at load for a probe batch of ``PROBE_ROWS`` rows of ``PROBE_TOKENS`` tokens
(ONNX shape inference with data propagation, the weights left out; ONNX Runtime's symbolic inference too
where ONNX Runtime's contrib ops stand in the graph, as after ``optimize --fuse``), and the attention's
Softmax input shows ``[rows, heads, tokens, tokens]`` (or ``[rows x heads, tokens, tokens]``; a fused
``Attention`` op says ``num_heads``). The widest layer is also read from the weight matrices multiplied
by the tokens. The copies were measured on the demo MiniLM (peak RSS of one execution above the
process's resting size) and rounded up; the estimate was then checked against tiny encoders of every
architecture the exporter takes, plain and fused (``tests/adversarial/test_estimate_architectures.py``;
docs/limits.md, "Memory a run takes").

Two bounds use the estimate:

- one execution stays within ``max_execution_bytes`` (``dynamic_batching.max_execution_bytes``, default
  ``MAX_EXECUTION_BYTES``): requests merge only while the batch fits (``core.batching``), and a
  large request is cut into chunks that fit (``core.chunking``), a single row never cut;
- all text model executions in the process together stay within ``EXECUTION_BYTES_AT_ONCE``
  (``ExecutionRoom``, one for the server): an execution waits for room before it starts, in arrival
  order, and returns it when its thread is done. One execution larger than the whole room runs alone.
  Small executions (the usual short texts) never wait unless large ones hold the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

MiB = 1024 * 1024

MAX_EXECUTION_BYTES = 256 * MiB
"""The default bound on one text model execution's estimated memory (``dynamic_batching.max_execution_bytes``)."""

EXECUTION_BYTES_AT_ONCE = 512 * MiB
"""The estimated memory of all text model executions running at once, server-wide: two at the default bound."""

TOKEN_COPIES = 6
"""Activations kept per token, in units of the graph's widest per-token tensor (measured, rounded up)."""

SCORE_COPIES = 5
"""Attention score tensors alive at once, per head and token pair (measured, rounded up)."""

FLOAT_BYTES = 4

HEAP_SLACK = 64 * MiB
"""What the C allocator holds beyond the live tensors, at most: tensors under its mmap threshold (4 MiB, see
``core.memory``) come from its heaps, which keep the blocks freed between live ones, so an execution of
mostly small tensors peaked at up to 2.05 times its live estimate (the demo MiniLM, 16 x 64; 1.6 times at
64 x 32), and a large one took its live estimate and a few tens of MB of them. Twice the live estimate is
added, up to this."""

PROBE_ROWS = 3
PROBE_TOKENS = 13
"""The probe batch the graph's shapes are inferred for: dimensions that tell rows and tokens apart."""

FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
"""ONNX Runtime's fused attention ops, whose ``num_heads`` says the heads."""

PROJECTIONS = (
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "Attention",
    "QAttention",
)
"""Ops whose second input is a weight matrix applied to every token: both its dimensions are per-token widths."""

SMALL_INITIALIZER = 4096
"""Initializers of at most this many elements (shapes, axes) stay in the probe graph; larger ones (weights)
are replaced by inputs of their shape."""


@dataclass(frozen=True)
class ExecutionMemory:
    """A text model's attention shape, for estimating what an execution of it takes."""

    heads: int  # attention heads (per layer; layers run one after another)
    widest: int  # the widest per-token tensor (the feed-forward layer's)
    fixed_length: int = 0  # the graph's fixed sequence length, if any: every row is padded to it

    def bytes(self, rows: int, tokens: int) -> int:
        """Estimated peak memory of one execution of ``rows`` rows padded to ``tokens`` tokens."""
        tokens = self.fixed_length or tokens
        per_row = TOKEN_COPIES * self.widest * tokens + SCORE_COPIES * self.heads * tokens * tokens
        live = FLOAT_BYTES * rows * per_row
        return live + min(2 * live, HEAP_SLACK)


def attention_shape(model: onnx.ModelProto, where: str = "the model") -> tuple[int, int] | None:
    """(heads, widest per-token dimension) of the encoder ``model``, or None when the graph shows no
    attention (no Softmax, or shapes that cannot be inferred): its executions are then bounded in tokens
    only. Only graphs with a Softmax or a fused attention op are probed."""
    ops = {node.op_type for node in model.graph.node}
    if not ops & {"Softmax", *FUSED_ATTENTION}:
        return None
    try:
        return _attention_shape(model)
    except Exception as e:  # a graph shape inference cannot follow: no estimate, as for a graph without attention
        log.info("%s: no attention shape inferred (%s); its executions are bounded in tokens only", where, e)
        return None


def _attention_shape(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(heads, widest per-token dimension) of ``model``'s attention, from its shapes inferred for a probe batch."""
    graph = model.graph
    fused = [
        attribute.i
        for node in graph.node
        if node.op_type in FUSED_ATTENTION
        for attribute in node.attribute
        if attribute.name == "num_heads"
    ]
    probe = _probe_model(model)
    shapes = _known_shapes(onnx.shape_inference.infer_shapes(probe, data_prop=True))
    if any(node.domain not in ("", "ai.onnx") for node in graph.node):
        # ONNX's inference knows no ONNX Runtime contrib op (``optimize --fuse``: SkipLayerNormalization,
        # BiasGelu, EmbedLayerNormalization...): every shape after the first is unknown, and the widest
        # layer read as the embedding's. ONNX Runtime's symbolic inference follows them.
        shapes.update(_contrib_shapes(probe))
    heads = max(fused, default=0)
    for node in graph.node:
        if node.op_type == "Softmax" and node.input and node.input[0] in shapes:
            heads = max(heads, _heads(shapes[node.input[0]]))
    if heads <= 0:
        return None
    widest = max(
        (s[2] for s in shapes.values() if len(s) == 3 and s[0] == PROBE_ROWS and s[1] == PROBE_TOKENS), default=0
    )
    return heads, max(widest, _weight_width(graph), 1)


def _weight_width(graph: onnx.GraphProto) -> int:
    """The widest per-token layer its weights tell: the largest dimension of a matrix multiplied by the tokens
    (``MatMul``, ``Gemm``, a fused ``Attention``'s packed QKV...). Where shape inference stops at an op it
    does not know, the feed-forward layer's width is still read."""
    matrices = {t.name: list(t.dims) for t in graph.initializer if len(t.dims) == 2}
    return max(
        (
            max(matrices[node.input[1]])
            for node in graph.node
            if node.op_type in PROJECTIONS and len(node.input) > 1 and node.input[1] in matrices
        ),
        default=0,
    )


def _known_shapes(inferred: onnx.ModelProto) -> dict[str, list[int]]:
    """The tensors of ``inferred`` whose every dimension is known, with their shapes."""
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    return shapes


def _contrib_shapes(probe: onnx.ModelProto) -> dict[str, list[int]]:
    """The shapes ONNX Runtime's symbolic shape inference tells of ``probe`` (contrib ops included); what
    it leaves unknown, or all of them if it fails, is left out. Its own ``infer_shapes`` is not called: where
    a shape stays unknown it writes the model to ``sym_shape_infer_temp.onnx`` in the working directory."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank
        inference._preprocess(probe)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return _known_shapes(inference.out_mp_)
    except Exception as e:  # an op it cannot follow (or no sympy): what ONNX's own inference told stands
        log.debug("symbolic shape inference failed: %s", e)
        return {}


def _heads(shape: Sequence[int]) -> int:
    """Heads of an attention Softmax's input: ``[rows, heads, tokens, tokens]``, ``[rows x heads, tokens, tokens]``."""
    if len(shape) == 4 and shape[0] == PROBE_ROWS and shape[2] == shape[3] == PROBE_TOKENS:
        return shape[1]
    if len(shape) == 3 and shape[1] == shape[2] == PROBE_TOKENS and shape[0] % PROBE_ROWS == 0:
        return shape[0] // PROBE_ROWS
    return 0


def _probe_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its weights (inputs of their shapes instead), its inputs' dynamic dimensions set to
    the probe batch: what shape inference needs to tell every tensor's shape, a few KB."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        probe = onnx.ValueInfoProto()
        probe.CopyFrom(value)
        for axis, dim in enumerate(probe.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = PROBE_ROWS if axis == 0 else PROBE_TOKENS
        inputs.append(probe)
    kept = []
    for tensor in graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        if count <= SMALL_INITIALIZER and tensor.data_location != TensorProto.EXTERNAL:
            kept.append(tensor)
        else:
            inputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    probe_graph = helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output), kept)
    probe = helper.make_model(probe_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    return probe


class ExecutionRoom:
    """Estimated bytes of the executions running at once, bounded: ``take`` waits, in arrival order, until
    an execution fits (one larger than the whole room when nothing else runs); ``give`` returns it."""

    def __init__(self, capacity: int = EXECUTION_BYTES_AT_ONCE) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def fits(self, size: int) -> bool:
        return not self._waiting and (self.used + size <= self.capacity or self.used == 0)

    async def take(self, size: int) -> None:
        """Hold ``size`` bytes of the room (at once when they fit and nobody waits)."""
        if size <= 0:
            return
        if self.fits(size):
            self.used += size
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, turn)
        self._waiting.append(entry)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give(size)  # it was given the room just as its caller went away
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._wake()
            raise

    def give(self, size: int) -> None:
        if size <= 0:
            return
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            size, turn = self._waiting[0]
            if turn.done():
                self._waiting.popleft()
                continue
            if self.used + size > self.capacity and self.used > 0:
                return
            self._waiting.popleft()
            self.used += size
            turn.set_result(None)


@dataclass(frozen=True, eq=False)
class ExecutionBound:
    """What bounds a text model version's executions: its estimate, the most one may take, and the room
    they take it from."""

    memory: ExecutionMemory
    limit: int
    room: ExecutionRoom

    def fits(self, rows: int, tokens: int) -> bool:
        """Whether one execution of ``rows`` rows of ``tokens`` tokens stays within the limit."""
        return self.memory.bytes(rows, tokens) <= self.limit

    def size(self, rows: int, tokens: int) -> int:
        return self.memory.bytes(rows, tokens)


SERVER_ROOM = ExecutionRoom()
"""The room of every text model execution in the process (``EXECUTION_BYTES_AT_ONCE``)."""
