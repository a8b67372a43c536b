"""Which node of one ONNX graph is which node of another, and what replaced what.

Matching runs in three passes over the top-level graphs:

1. **by name**: nodes with the same non-empty name;
2. **by structure**, in B's topological order: an unmatched B node matches an unmatched A node with
   the same domain and op_type whose inputs come from the same places (the A counterparts of matched
   producers, the same graph inputs, initializers with the same name or the same content, or tensors
   whose names survived), preferring one whose attributes are equal too;
3. **by output tensor names**: same op_type, and an output tensor name in common.

What stays unmatched in B is *added*, in A *removed*. When B is an optimized or quantized form of A,
added nodes usually replace removed ones: B's added nodes are grouped through the new tensors they
pass among themselves, and each added node is mapped to the removed A nodes that lie between the
tensors it (through its group) consumes and produces that also exist in A: a backward walk in A from
the producers of those outputs, through removed nodes only, stopping at those inputs. Quantized
initializers (``W_quantized``, ``W_scale``, ``W_zero_point``) count as ``W``. An added node whose
walk finds nothing is reported as unmapped. The nodes of a group larger than :data:`LARGE_GROUP`
share the group's mapping (its boundary taken as a whole), so a large rewrite stays linear in time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import onnx
from onnx import helper

QUANTIZED_SUFFIXES = ("_quantized", "_scale", "_zero_point")
"""Suffixes ONNX Runtime's quantizer appends to the name of the initializer it quantized."""

LARGE_GROUP = 256
"""Added nodes in a group larger than this share one mapping (the group's), to stay linear in time."""

SourceKey = tuple[str, str | int, int]
"""Where a tensor comes from, in A's terms: (``"node"``, A node index, output index), (``"input"``,
name, 0), (``"init"``, A initializer name, 0) or (``"none"``, "", 0) for an omitted optional input."""


@dataclass
class GraphIndex:
    """Lookups over one top-level graph."""

    graph: onnx.GraphProto
    producer: dict[str, tuple[int, int]] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph)
        index.initializers = {t.name: t for t in graph.initializer}
        index.inputs = {i.name for i in graph.input if i.name not in index.initializers}
        index.outputs = {o.name for o in graph.output}
        for n, node in enumerate(graph.node):
            for k, name in enumerate(node.output):
                if name:
                    index.producer[name] = (n, k)
            for name in node.input:
                if name:
                    index.consumers.setdefault(name, []).append(n)
        index.digests = {name: tensor_digest(t) for name, t in index.initializers.items()}
        return index

    def has_tensor(self, name: str) -> bool:
        return name in self.producer or name in self.inputs or name in self.initializers


def tensor_digest(tensor: onnx.TensorProto) -> str:
    """A digest of an initializer's type, shape and content (its name left out)."""
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def attributes_of(node: onnx.NodeProto) -> dict[str, bytes]:
    """Attribute name -> a canonical serialized form, for equality."""
    return {a.name: a.SerializeToString(deterministic=True) for a in node.attribute}


def attribute_text(attribute: onnx.AttributeProto, limit: int = 80) -> str:
    """A short readable value of an attribute (graphs and tensors summarized)."""
    value = helper.get_attribute_value(attribute)
    if isinstance(value, onnx.GraphProto):
        text = f"<graph {value.name or ''} with {len(value.node)} nodes>"
    elif isinstance(value, onnx.TensorProto):
        dims = "x".join(str(d) for d in value.dims) or "scalar"
        text = f"<tensor {onnx.TensorProto.DataType.Name(value.data_type)} {dims}>"
    elif isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Matching:
    """The outcome of matching graph A to graph B (node indices in each graph's ``node`` list)."""

    a: GraphIndex
    b: GraphIndex
    b_to_a: dict[int, int]
    how: dict[int, str]  # B index -> "name" | "structure" | "outputs"
    replaced: dict[int, list[int]]  # added B index -> removed A indices it replaced (empty: unmapped)
    rewrites: dict[int, list[int]] = field(default_factory=dict)  # added B index -> kept A nodes it now serves

    @property
    def a_to_b(self) -> dict[int, int]:
        return {a: b for b, a in self.b_to_a.items()}

    def added(self) -> list[int]:
        return [n for n in range(len(self.b.graph.node)) if n not in self.b_to_a]

    def removed(self) -> list[int]:
        matched = set(self.b_to_a.values())
        return [n for n in range(len(self.a.graph.node)) if n not in matched]

    def b_key(self, tensor: str) -> SourceKey | None:
        """Where B's ``tensor`` comes from, in A's terms (None: from an unmatched B node)."""
        return _b_source(tensor, self.a, self.b, self.b_to_a)

    def a_key(self, tensor: str) -> SourceKey | None:
        return _a_source(tensor, self.a)


def _a_source(tensor: str, a: GraphIndex) -> SourceKey | None:
    if not tensor:
        return ("none", "", 0)
    if tensor in a.producer:
        n, k = a.producer[tensor]
        return ("node", n, k)
    if tensor in a.initializers:
        return ("init", tensor, 0)
    if tensor in a.inputs:
        return ("input", tensor, 0)
    return None


def _b_source(
    tensor: str, a: GraphIndex, b: GraphIndex, b_to_a: Mapping[int, int], content_names: Mapping[str, str] | None = None
) -> SourceKey | None:
    if not tensor:
        return ("none", "", 0)
    if tensor in b.producer:
        n, k = b.producer[tensor]
        if n in b_to_a:
            return ("node", b_to_a[n], k)
        return _a_source(tensor, a) if a.has_tensor(tensor) else None
    if tensor in b.initializers:
        if tensor in a.initializers:
            return ("init", tensor, 0)
        by_content = (content_names or {}).get(b.digests[tensor]) or original_name(tensor, a, b)
        return ("init", by_content, 0) if by_content else None
    if tensor in b.inputs:
        return ("input", tensor, 0) if tensor in a.inputs else None
    return None


def match_graphs(a_graph: onnx.GraphProto, b_graph: onnx.GraphProto) -> Matching:
    """Match A's nodes to B's, then map B's added nodes to the A nodes they replaced."""
    a, b = GraphIndex.of(a_graph), GraphIndex.of(b_graph)
    b_to_a: dict[int, int] = {}
    how: dict[int, str] = {}
    taken: set[int] = set()

    a_by_name: dict[str, int] = {}
    for n, node in enumerate(a_graph.node):
        if node.name:
            a_by_name.setdefault(node.name, n)
    for n, node in enumerate(b_graph.node):
        m = a_by_name.get(node.name) if node.name else None
        if m is not None and m not in taken:
            b_to_a[n], how[n] = m, "name"
            taken.add(m)

    content_names: dict[str, str] = {}
    for name, digest in a.digests.items():
        content_names.setdefault(digest, name)

    def a_keys(n: int) -> tuple[SourceKey | None, ...]:
        return tuple(_a_source(t, a) for t in a_graph.node[n].input)

    candidates: dict[tuple[str, str, tuple[SourceKey | None, ...]], list[int]] = {}
    for n, node in enumerate(a_graph.node):
        if n not in taken:
            candidates.setdefault((node.domain, node.op_type, a_keys(n)), []).append(n)

    for n, node in enumerate(b_graph.node):
        if n in b_to_a:
            continue
        keys = tuple(_b_source(t, a, b, b_to_a, content_names) for t in node.input)
        if any(k is None for k in keys):
            continue
        pool = [m for m in candidates.get((node.domain, node.op_type, keys), []) if m not in taken]
        if not pool:
            continue
        attrs = attributes_of(node)
        exact = [m for m in pool if attributes_of(a_graph.node[m]) == attrs]
        if not exact and not node.input:
            continue  # a source node (Constant) matches on its attributes or not at all
        chosen = (exact or pool)[0]
        b_to_a[n], how[n] = chosen, "structure"
        taken.add(chosen)

    for n, node in enumerate(b_graph.node):
        if n in b_to_a:
            continue
        for tensor in node.output:
            producer = a.producer.get(tensor)
            if producer is None or producer[0] in taken:
                continue
            if a_graph.node[producer[0]].op_type == node.op_type:
                b_to_a[n], how[n] = producer[0], "outputs"
                taken.add(producer[0])
                break

    matching = Matching(a, b, b_to_a, how, {})
    _replacements(matching)
    return matching


def original_name(tensor: str, a: GraphIndex, b: GraphIndex) -> str | None:
    """The A tensor that B's ``tensor`` stands for: the same name, or a quantized initializer's source."""
    if a.has_tensor(tensor):
        return tensor
    if tensor in b.initializers:
        for suffix in QUANTIZED_SUFFIXES:
            if tensor.endswith(suffix) and tensor[: -len(suffix)] in a.initializers:
                return tensor[: -len(suffix)]
    return None


def _replacements(matching: Matching) -> None:
    """Fill ``matching.replaced`` and, for added nodes that replaced nothing, ``matching.rewrites``.

    An added node that replaced no removed node but produces a tensor an A node still produces (a
    ``DequantizeLinear`` after a ``Gather`` that now reads int8 weights) belongs to that node's
    rewritten form: it is listed under ``rewrites``.
    """
    a, b = matching.a, matching.b
    added = set(matching.added())
    removed = set(matching.removed())
    shared: dict[int, list[int]] = {}
    for group in _groups(added, a, b):
        if len(group) > LARGE_GROUP:  # one boundary for the whole group: per node it would be quadratic
            inputs, outputs = _group_boundary(group, a, b)
            region = sorted(_region(outputs, inputs, removed, a))
            shared.update(dict.fromkeys(group, region))
    for n in sorted(added):
        if n in shared:
            region = shared[n]
            outputs = {t for t in b.graph.node[n].output if t and a.has_tensor(t)}
        else:
            inputs, outputs = _boundary(n, added, a, b)
            region = sorted(_region(outputs, inputs, removed, a))
        matching.replaced[n] = region
        if not region:
            kept = {a.producer[t][0] for t in outputs if t in a.producer and a.producer[t][0] not in removed}
            if kept:
                matching.rewrites[n] = sorted(kept)


def _groups(added: set[int], a: GraphIndex, b: GraphIndex) -> list[list[int]]:
    """Added B nodes connected through tensors that A does not have."""
    parent = {n: n for n in added}

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in added:
        for tensor in b.graph.node[n].input:
            producer = b.producer.get(tensor)
            if producer is not None and producer[0] in added and not a.has_tensor(tensor):
                parent[root(n)] = root(producer[0])
    groups: dict[int, list[int]] = {}
    for n in sorted(added):
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def _group_boundary(group: list[int], a: GraphIndex, b: GraphIndex) -> tuple[set[str], set[str]]:
    inputs: set[str] = set()
    outputs: set[str] = set()
    for n in group:
        node = b.graph.node[n]
        inputs.update(o for o in (original_name(t, a, b) for t in node.input if t) if o is not None)
        outputs.update(t for t in node.output if t and a.has_tensor(t))
    return inputs, outputs


def _boundary(start: int, added: set[int], a: GraphIndex, b: GraphIndex) -> tuple[set[str], set[str]]:
    """The A tensors an added B node reaches backward (inputs) and forward (outputs) through new tensors."""
    inputs: set[str] = set()
    outputs: set[str] = set()
    seen_back: set[int] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n in seen_back:
            continue
        seen_back.add(n)
        for tensor in b.graph.node[n].input:
            if not tensor:
                continue
            original = original_name(tensor, a, b)
            if original is not None:
                inputs.add(original)
            elif tensor in b.producer and b.producer[tensor][0] in added:
                stack.append(b.producer[tensor][0])
    seen_fwd: set[int] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n in seen_fwd:
            continue
        seen_fwd.add(n)
        for tensor in b.graph.node[n].output:
            if not tensor:
                continue
            if a.has_tensor(tensor):
                outputs.add(tensor)
            else:
                stack.extend(c for c in b.consumers.get(tensor, []) if c in added)
    return inputs, outputs


def _region(outputs: Iterable[str], stops: set[str], removed: set[int], a: GraphIndex) -> set[int]:
    """Removed A nodes on the way back from ``outputs`` to ``stops`` (through removed nodes only)."""
    region: set[int] = set()
    stack = [t for t in outputs if t not in stops]
    while stack:
        tensor = stack.pop()
        producer = a.producer.get(tensor)
        if producer is None or producer[0] not in removed or producer[0] in region:
            continue
        region.add(producer[0])
        stack.extend(t for t in a.graph.node[producer[0]].input if t and t not in stops)
    return region
