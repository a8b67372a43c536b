"""Compare two ONNX models: signature, opsets, nodes, attributes, weights, and outputs on the same inputs.

``diff_models(a, b)`` reads A as the reference and B as the candidate (e.g. A plain, B optimized or
quantized). Nodes are matched as :mod:`onnxserve.toolkit.node_matching` describes; B's added nodes
are mapped to the A nodes they replaced where names and structure allow. Weights are compared by
name (or, for quantized initializers, dequantized against the float original they came from) with
max / mean absolute difference, relative L2 (``||b - a|| / ||a||``) and the count of changed elements.
The numeric comparison runs both models with ONNX Runtime on the same inputs (given, or generated
from the common signature, see :mod:`onnxserve.toolkit.sample_inputs`) and reports, per common output,
the max absolute difference and the cosine similarity.

:func:`remeasure` measures B's accuracy against A the way ``optimize`` did, with the toolkit's one
comparer (:mod:`onnxserve.toolkit.evaluation`) on the same evaluation inputs: those B's metadata
(``onnxserve.accuracy``) records, else the held-out evaluation sentences for a text model folder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from onnxserve.config import SessionOptions
from onnxserve.core.inline_runs import why_values_set_sizes
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import guarded_session, is_allocation_failure, stopped_after
from onnxserve.errors import InvalidInputError, ModelLoadError, OnnxServeError
from onnxserve.toolkit import model_header, sample_inputs
from onnxserve.toolkit.graph import node_ids, weight_array
from onnxserve.toolkit.model_file import load_model
from onnxserve.toolkit.node_matching import (
    QUANTIZED_SUFFIXES,
    Matching,
    attribute_text,
    attributes_of,
    match_graphs,
    tensor_digest,
)

Arrays = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: list[int | str | None]

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass(frozen=True)
class SignatureChange:
    kind: str  # "input" | "output"
    name: str
    change: str  # "added" | "removed" | "changed"
    a: TensorType | None
    b: TensorType | None


@dataclass(frozen=True)
class VersionChange:
    what: str  # "ir_version", "opset:<domain>", "producer"
    a: str | None
    b: str | None


@dataclass(frozen=True)
class NodeRef:
    id: str  # the node's name, or OPTYPE_INDEX when it has none (as in the graph document)
    op_type: str
    domain: str = ""


@dataclass(frozen=True)
class AttributeChange:
    name: str
    a: str | None
    b: str | None


@dataclass(frozen=True)
class NodeChange:
    a: NodeRef
    b: NodeRef
    matched_by: str  # "name" | "structure" | "outputs"
    reasons: list[str]  # "op_type", "attributes", "inputs", "weights", "outputs"
    attributes: list[AttributeChange] = field(default_factory=list)


@dataclass(frozen=True)
class Replacement:
    """An added B node and the A nodes it stands for.

    ``replaces``: removed A nodes it took the place of; ``rewrites``: A nodes still present whose
    outputs it now produces (part of their rewritten form). Both empty: it could not be mapped.
    """

    b: NodeRef
    replaces: list[NodeRef]
    rewrites: list[NodeRef] = field(default_factory=list)


@dataclass(frozen=True)
class WeightStats:
    max_abs_diff: float
    mean_abs_diff: float
    relative_l2: float | None  # None when A's weights are all zero
    changed: int
    size: int


@dataclass(frozen=True)
class InitializerChange:
    name: str  # A's name (B's for an added one)
    change: str  # "added" | "removed" | "changed" | "retyped" | "reshaped" | "quantized"
    a: TensorType | None
    b: TensorType | None
    stats: WeightStats | None = None
    b_names: list[str] = field(default_factory=list)  # the B initializers it became, when renamed/quantized


@dataclass(frozen=True)
class OutputComparison:
    """One output of both models, measured by the toolkit's one comparer (``evaluation.compare_runs``):
    the lowest cosine of its rows (last axis) and the arg-max agreement, where they apply."""

    name: str
    shape_a: list[int]
    shape_b: list[int]
    max_abs_diff: float | None
    mean_abs_diff: float | None
    cosine: float | None
    agreement: float | None = None


@dataclass(frozen=True)
class NumericComparison:
    ran: bool
    reason: str | None = None  # why not, when it did not run
    inputs: dict[str, list[int]] = field(default_factory=dict)
    generated: bool = True
    outputs: list[OutputComparison] = field(default_factory=list)


@dataclass
class ModelDiff:
    versions: list[VersionChange]
    signature: list[SignatureChange]
    nodes_added: list[NodeRef]
    nodes_removed: list[NodeRef]
    nodes_changed: list[NodeChange]
    nodes_renamed: list[tuple[NodeRef, NodeRef]]
    nodes_matched: int
    replacements: list[Replacement]
    initializers: list[InitializerChange]
    numeric: NumericComparison | None
    node_counts: tuple[int, int] = (0, 0)
    accuracy: Remeasured | None = None  # B's accuracy measured as optimize measured it
    matched: list[tuple[str, str, str]] = field(default_factory=list)  # (A id, B id, matched by) for all pairs

    @property
    def replaced(self) -> set[str]:
        """A's removed nodes that some added B node maps back to."""
        return {r.id for rep in self.replacements for r in rep.replaces}

    @property
    def unmapped(self) -> list[NodeRef]:
        """B's added nodes that map to nothing in A."""
        return [rep.b for rep in self.replacements if not rep.replaces and not rep.rewrites]

    @property
    def identical(self) -> bool:
        return not (
            self.versions
            or self.signature
            or self.nodes_added
            or self.nodes_removed
            or self.nodes_changed
            or self.initializers
        )

    def highlight_a(self) -> dict[str, str]:
        """A's node ids to highlight: ``removed`` or ``changed``."""
        marks = {n.id: "removed" for n in self.nodes_removed}
        marks.update({c.a.id: "changed" for c in self.nodes_changed})
        return marks

    def highlight_b(self) -> dict[str, str]:
        """B's node ids to highlight: ``added`` or ``changed``."""
        marks = {n.id: "added" for n in self.nodes_added}
        marks.update({c.b.id: "changed" for c in self.nodes_changed})
        return marks

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodes_renamed"] = [{"a": asdict(a), "b": asdict(b)} for a, b in self.nodes_renamed]
        data["node_counts"] = {"a": self.node_counts[0], "b": self.node_counts[1]}
        data["matched"] = [{"a": a, "b": b, "by": by} for a, b, by in self.matched]
        data["summary"] = {
            "identical": self.identical,
            "nodes_added": len(self.nodes_added),
            "nodes_removed": len(self.nodes_removed),
            "nodes_changed": len(self.nodes_changed),
            "nodes_replaced": len(self.replaced),
            "nodes_unmapped": len(self.unmapped),
            "initializers_changed": len(self.initializers),
        }
        return data


@dataclass(frozen=True)
class Remeasured:
    """B's accuracy against A on the evaluation inputs ``evaluated_on`` describes, beside what B's
    metadata recorded when it was optimized (``recorded``; None when it records nothing)."""

    evaluated_on: dict[str, Any]
    measured: dict[str, Any]
    recorded: dict[str, Any] | None


def remeasure(a: Path, b: Path) -> Remeasured | None:
    """Measure B against A on the evaluation set B was optimized with (None when it cannot be made
    again here: no record and no text folder, a record that needs the user's own files, or outputs
    that do not correspond)."""
    from onnxserve.core.pipeline import PipelineSpec
    from onnxserve.toolkit.evaluation import compare_models
    from onnxserve.toolkit.optimize import ACCURACY_METADATA
    from onnxserve.toolkit.samples import remake, text_pipeline

    file_a = a / MODEL_FILENAME if a.is_dir() else a
    file_b = b / MODEL_FILENAME if b.is_dir() else b
    model_b = load_model(file_b)
    stamped = {p.key: p.value for p in model_b.metadata_props}.get(ACCURACY_METADATA)
    record: dict[str, Any] | None = None
    if stamped:
        try:
            record = json.loads(stamped)
        except ValueError:
            record = None
    folder = b if b.is_dir() else (a if a.is_dir() else None)
    initializers = {t.name for t in model_b.graph.initializer}
    names = [i.name for i in model_b.graph.input if i.name not in initializers]
    text = text_pipeline(folder, names)
    spec = PipelineSpec.read(folder) if folder is not None else None
    recipe = record.get("evaluated_on") if record else None
    if not isinstance(recipe, dict):
        recipe = {"kind": "builtin-sentences", "split": "held-out"} if text is not None else None
    if recipe is None:
        return None
    samples = remake(model_b, text, recipe)
    if samples is None:
        return None
    try:
        measured = compare_models(file_a, file_b, samples, spec.task if spec else None)
    except OnnxServeError:  # outputs that differ in name or shape: the Outputs table says how
        return None
    recorded = record.get("accuracy") if record else None
    return Remeasured(samples.recipe, measured.to_dict(), recorded if isinstance(recorded, dict) else None)


def diff_models(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    *,
    samples: Arrays | None = None,
    run: bool = True,
    seed: int = 0,
    files: tuple[Path, Path] | None = None,
) -> ModelDiff:
    """Everything that differs from model ``a`` to model ``b`` (``run=False`` skips the numeric part).

    ``files``: the model files ``a`` and ``b`` were read from: weights kept in external data files are
    read beside them, and the models run from them."""
    matching = match_graphs(a.graph, b.graph)
    a_ref = _refs(a.graph)
    b_ref = _refs(b.graph)
    dirs = (files[0].parent, files[1].parent) if files is not None else (None, None)
    init_changes = _initializer_changes(a.graph, b.graph, dirs)
    changed_weights = {c.name for c in init_changes if c.change != "removed"}
    changes, renamed = _node_changes(matching, a_ref, b_ref, changed_weights)
    # An added node that produces what a kept A node produced belongs to that node's rewritten form
    # only when the node itself changed (a Gather now reading int8 weights); otherwise it is new.
    changed_a = {c.a.id for c in changes}
    replacements = [
        Replacement(
            b_ref[n],
            [a_ref[m] for m in replaced],
            [a_ref[m] for m in matching.rewrites.get(n, []) if a_ref[m].id in changed_a],
        )
        for n, replaced in sorted(matching.replaced.items())
    ]
    return ModelDiff(
        versions=_version_changes(a, b),
        signature=_signature_changes(a.graph, b.graph),
        nodes_added=[b_ref[n] for n in matching.added()],
        nodes_removed=[a_ref[n] for n in matching.removed()],
        nodes_changed=changes,
        nodes_renamed=renamed,
        nodes_matched=len(matching.b_to_a),
        replacements=replacements,
        initializers=init_changes,
        numeric=compare_outputs(a, b, samples=samples, seed=seed, files=files) if run else None,
        node_counts=(len(a.graph.node), len(b.graph.node)),
        matched=[(a_ref[m].id, b_ref[n].id, matching.how[n]) for n, m in sorted(matching.b_to_a.items())],
    )


def _refs(graph: onnx.GraphProto) -> list[NodeRef]:
    ids = node_ids(graph.node)
    return [NodeRef(ids[n], node.op_type, node.domain) for n, node in enumerate(graph.node)]


def _type(elem_type: int, dims: list[int | str | None]) -> TensorType:
    name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"
    return TensorType(name, list(dims))


def _version_changes(a: onnx.ModelProto, b: onnx.ModelProto) -> list[VersionChange]:
    changes: list[VersionChange] = []
    if a.ir_version != b.ir_version:
        changes.append(VersionChange("ir_version", str(a.ir_version), str(b.ir_version)))
    a_ops, b_ops = model_header.opsets(a), model_header.opsets(b)
    # Optimizers import every domain they know; a domain no node uses is listed apart, on one line.
    default = model_header.DEFAULT_DOMAIN
    used = {default} | {n.domain or default for m in (a, b) for n in m.graph.node}
    unused: tuple[list[str], list[str]] = ([], [])
    for domain in sorted(set(a_ops) | set(b_ops)):
        va, vb = a_ops.get(domain), b_ops.get(domain)
        if va == vb:
            continue
        if domain in used:
            changes.append(
                VersionChange(f"opset:{domain}", None if va is None else str(va), None if vb is None else str(vb))
            )
        else:
            unused[0].extend([f"{domain} {va}"] if va is not None else [])
            unused[1].extend([f"{domain} {vb}"] if vb is not None else [])
    if unused != ([], []):
        changes.append(VersionChange("opsets no node uses", ", ".join(unused[0]) or None, ", ".join(unused[1]) or None))
    pa, pb = model_header.producer(a), model_header.producer(b)
    if pa != pb:
        changes.append(VersionChange("producer", pa or None, pb or None))
    return changes


def _signature_changes(a: onnx.GraphProto, b: onnx.GraphProto) -> list[SignatureChange]:
    changes: list[SignatureChange] = []
    for kind in ("input", "output"):
        sa, sb = sample_inputs.signature(a, kind), sample_inputs.signature(b, kind)
        for name in list(sa) + [n for n in sb if n not in sa]:
            ta = _type(*sa[name]) if name in sa else None
            tb = _type(*sb[name]) if name in sb else None
            if ta is None:
                changes.append(SignatureChange(kind, name, "added", None, tb))
            elif tb is None:
                changes.append(SignatureChange(kind, name, "removed", ta, None))
            elif ta != tb:
                changes.append(SignatureChange(kind, name, "changed", ta, tb))
    return changes


def _node_changes(
    matching: Matching, a_ref: list[NodeRef], b_ref: list[NodeRef], changed_weights: set[str]
) -> tuple[list[NodeChange], list[tuple[NodeRef, NodeRef]]]:
    changes: list[NodeChange] = []
    renamed: list[tuple[NodeRef, NodeRef]] = []
    a_nodes, b_nodes = matching.a.graph.node, matching.b.graph.node
    for n in sorted(matching.b_to_a):
        m = matching.b_to_a[n]
        na, nb = a_nodes[m], b_nodes[n]
        reasons: list[str] = []
        if (na.op_type, na.domain) != (nb.op_type, nb.domain):
            reasons.append("op_type")
        attrs = _attribute_changes(na, nb)
        if attrs:
            reasons.append("attributes")
        if [matching.a_key(t) for t in na.input] != [matching.b_key(t) for t in nb.input]:
            reasons.append("inputs")
        if any(t in changed_weights for t in na.input if t in matching.a.initializers):
            reasons.append("weights")
        if len(na.output) != len(nb.output):
            reasons.append("outputs")
        if reasons:
            changes.append(NodeChange(a_ref[m], b_ref[n], matching.how[n], reasons, attrs))
        elif na.name != nb.name:
            renamed.append((a_ref[m], b_ref[n]))
    return changes, renamed


def _attribute_changes(a: onnx.NodeProto, b: onnx.NodeProto) -> list[AttributeChange]:
    sa, sb = attributes_of(a), attributes_of(b)
    ta = {x.name: x for x in a.attribute}
    tb = {x.name: x for x in b.attribute}
    return [
        AttributeChange(
            name,
            attribute_text(ta[name]) if name in ta else None,
            attribute_text(tb[name]) if name in tb else None,
        )
        for name in sorted(set(sa) | set(sb))
        if sa.get(name) != sb.get(name)
    ]


STATISTICS_CHUNK = 1 << 20
"""Values compared in float64 at a time: the statistics cost a chunk beside the two arrays, not 4x their size."""


def weight_stats(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> WeightStats:
    """Difference statistics of two same-shape arrays (computed in float64, a chunk at a time)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    largest, total, squares, norm_a, changed = 0.0, 0.0, 0.0, 0.0, 0
    for start in range(0, fa.size, STATISTICS_CHUNK):
        ca = fa[start : start + STATISTICS_CHUNK].astype(np.float64)
        cb = fb[start : start + STATISTICS_CHUNK].astype(np.float64)
        delta = np.abs(cb - ca)
        largest = float(np.maximum(largest, delta.max()))  # NaN stays NaN, as over the whole array
        total += float(delta.sum())
        squares += float(np.square(delta).sum())
        norm_a += float(np.square(ca).sum())
        changed += int(np.count_nonzero(ca != cb))
    size = int(fa.size)
    return WeightStats(
        max_abs_diff=largest,
        mean_abs_diff=total / size if size else 0.0,
        relative_l2=float(np.sqrt(squares) / np.sqrt(norm_a)) if norm_a > 0 else None,
        changed=changed,
        size=size,
    )


def _equal(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    """``np.array_equal`` (NaN equal to NaN for floats) of two same-shape arrays, a chunk at a time."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    nan = fa.dtype.kind in "fc" and fb.dtype.kind in "fc"
    return all(
        np.array_equal(fa[start : start + STATISTICS_CHUNK], fb[start : start + STATISTICS_CHUNK], equal_nan=nan)
        for start in range(0, fa.size, STATISTICS_CHUNK)
    )


def _array(tensor: onnx.TensorProto, base_dir: Path | None = None) -> npt.NDArray[Any]:
    return weight_array(tensor, base_dir)


def _init_type(tensor: onnx.TensorProto) -> TensorType:
    return _type(tensor.data_type, [int(d) for d in tensor.dims])


def _dequantized(
    quantized: onnx.TensorProto,
    scale: onnx.TensorProto,
    zero: onnx.TensorProto | None,
    shape: list[int],
    base_dir: Path | None = None,
) -> npt.NDArray[Any] | None:
    # float32, as the float original: the dequantized copy costs what that original does, not twice it
    q = _array(quantized, base_dir).astype(np.float32)
    s = _array(scale, base_dir).astype(np.float32)
    z = _array(zero, base_dir).astype(np.float32) if zero is not None else np.zeros_like(s)
    if list(q.shape) != shape:
        return None
    if s.size == 1:
        return (q - z.reshape(())) * s.reshape(())
    for axis, size in enumerate(q.shape):  # per-channel: scales along the one axis whose size they match
        if size == s.size:
            view = [1] * q.ndim
            view[axis] = size
            return (q - z.reshape(view)) * s.reshape(view)
    return None


def _initializer_changes(
    a: onnx.GraphProto, b: onnx.GraphProto, dirs: tuple[Path | None, Path | None] = (None, None)
) -> list[InitializerChange]:
    """The initializers that differ; ``dirs``: where each side's external data files are."""
    ia = {t.name: t for t in a.initializer}
    ib = {t.name: t for t in b.initializer}
    changes: list[InitializerChange] = []
    used_b: set[str] = set()
    for name, ta in ia.items():
        tb = ib.get(name)
        if tb is None:
            continue
        used_b.add(name)
        xa, xb = _array(ta, dirs[0]), _array(tb, dirs[1])
        if xa.shape != xb.shape:
            changes.append(InitializerChange(name, "reshaped", _init_type(ta), _init_type(tb)))
        elif xa.dtype != xb.dtype:
            stats = weight_stats(xa, xb) if xa.dtype.kind in "fiub" and xb.dtype.kind in "fiub" else None
            changes.append(InitializerChange(name, "retyped", _init_type(ta), _init_type(tb), stats))
        elif not _equal(xa, xb):
            changes.append(InitializerChange(name, "changed", _init_type(ta), _init_type(tb), weight_stats(xa, xb)))

    b_by_digest: dict[str, list[str]] = {}
    for name, tb in ib.items():
        if name not in used_b:
            b_by_digest.setdefault(tensor_digest(tb), []).append(name)
    for name, ta in ia.items():
        if name in ib:
            continue
        quantized = ib.get(name + "_quantized")
        scale = ib.get(name + "_scale")
        if quantized is not None and scale is not None:
            derived = [name + s for s in QUANTIZED_SUFFIXES if name + s in ib]
            used_b.update(derived)
            xa = _array(ta, dirs[0])
            deq = _dequantized(quantized, scale, ib.get(name + "_zero_point"), list(xa.shape), dirs[1])
            stats = weight_stats(xa, deq) if deq is not None else None
            changes.append(InitializerChange(name, "quantized", _init_type(ta), _init_type(quantized), stats, derived))
            continue
        same = [n for n in b_by_digest.get(tensor_digest(ta), []) if n not in used_b]
        if same:  # renamed, same content: not a change of weights
            used_b.add(same[0])
            continue
        changes.append(InitializerChange(name, "removed", _init_type(ta), None))
    for name, tb in ib.items():
        if name not in used_b:
            changes.append(InitializerChange(name, "added", None, _init_type(tb)))
    return changes


def _session(model: onnx.ModelProto | Path, which: str) -> Any:
    try:
        # guarded as served: the web page runs this in the server's process (core.division_guard)
        return guarded_session(model, options=SessionOptions(intra_op_num_threads=1), where=f"model {which}")
    except ModelLoadError as e:
        cause = str(e.__cause__ or e.message).strip().splitlines()[0]
        raise ModelLoadError(f"model {which}: ONNX Runtime cannot load it: {cause}") from None


@dataclass(frozen=True)
class RunLimits:
    """How large the inputs of a numeric comparison may be (the web page's diffs run within these)."""

    rows: int
    """The first axis of the first input: the comparison measures row by row."""
    values: int
    """Elements of all inputs together."""
    sizes_from_shapes: bool = False
    """Run only models whose tensors cannot grow past their inputs by the inputs' values
    (``inline_runs.why_values_set_sizes``): a generated input may ask such a graph for gigabytes."""
    seconds: float | None = None
    """The longest each model's run may take: past it the run is stopped (a small graph can ask for hours
    of compute) and the comparison is shown without the runs."""

    def refusal(self, feeds: Arrays) -> str | None:
        """Why ``feeds`` are too large to run, or None."""
        from onnxserve.toolkit.samples import batch_rows

        rows = batch_rows(dict(feeds))
        values = sum(int(v.size) for v in feeds.values())
        if rows > self.rows or values > self.values:
            return (
                f"not run: the inputs this comparison needs hold {rows} rows and {values} values, more than "
                f"the {self.rows} rows and {self.values} values it runs here"
            )
        return None


def compare_outputs(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    *,
    samples: Arrays | None = None,
    seed: int = 0,
    files: tuple[Path, Path] | None = None,
    limits: RunLimits | None = None,
) -> NumericComparison:
    """Run both models on the same inputs; compare each output they have in common.

    ``files``: run the models from these files (those ``a`` and ``b`` were read from), not from memory.
    ``limits``: inputs larger than these are not run (the comparison says why)."""
    sig_a = sample_inputs.signature(a.graph)
    sig_b = sample_inputs.signature(b.graph)
    if samples is None:
        missing = [n for n in sig_b if n not in sig_a]
        if missing:
            return NumericComparison(False, f"B needs inputs A does not have: {', '.join(missing)}")
        retyped = [n for n in sig_b if sig_a[n][0] != sig_b[n][0]]
        if retyped:
            return NumericComparison(False, f"inputs with different types in A and B: {', '.join(retyped)}")
        bounds = sample_inputs.index_bounds([a.graph, b.graph])
        try:
            feeds = sample_inputs.generate({n: sig_a[n] for n in sig_a}, bounds, seed)
        except InvalidInputError as e:
            return NumericComparison(False, e.message)
        generated = True
    else:
        feeds = {k: np.asarray(v) for k, v in samples.items()}
        generated = False
    for which, sig in (("A", sig_a), ("B", sig_b)):
        missing = [n for n in sig if n not in feeds]
        if missing:
            raise InvalidInputError(f"samples lack input(s) {', '.join(missing)} that model {which} needs")
    too_large = limits.refusal(feeds) if limits is not None else None
    if too_large is None and limits is not None and limits.sizes_from_shapes:
        too_large = next(
            (
                f"not run: model {which}'s tensors may grow by its input values ({why}), so its run on "
                "generated inputs is not bounded"
                for which, model in (("A", a), ("B", b))
                if (why := why_values_set_sizes(model)) is not None
            ),
            None,
        )
    if too_large is not None:
        return NumericComparison(False, too_large, {n: list(v.shape) for n, v in feeds.items()}, generated)
    try:
        seconds = limits.seconds if limits is not None else None
        out_a = _run(files[0] if files else a, "A", {n: feeds[n] for n in sig_a}, seconds)
        out_b = _run(files[1] if files else b, "B", {n: feeds[n] for n in sig_b}, seconds)
    except (ModelLoadError, InvalidInputError) as e:
        return NumericComparison(False, e.message, {n: list(v.shape) for n, v in feeds.items()}, generated)
    outputs = _compare(out_a, out_b, feeds)
    return NumericComparison(True, None, {n: list(v.shape) for n, v in feeds.items()}, generated, outputs)


def _run(
    model: onnx.ModelProto | Path, which: str, feeds: Arrays, seconds: float | None = None
) -> dict[str, npt.NDArray[Any]]:
    """``model``'s outputs for ``feeds``; a run still going after ``seconds`` is stopped (InvalidInputError)."""
    session = _session(model, which)
    names = [o.name for o in session.get_outputs()]
    with stopped_after(seconds) if seconds is not None else contextlib.nullcontext() as control:
        try:
            values = session.run(names, dict(feeds), control.options if control is not None else None)
        except Exception as e:  # ONNX Runtime's error types are not part of its public API
            reason = str(e).strip().splitlines()[0]
            if control is not None and control.terminated:
                raise InvalidInputError(
                    f"not run: model {which}'s run took longer than the {seconds:g} s it may take here, and was stopped"
                ) from None
            if is_allocation_failure(e):
                raise InvalidInputError(f"model {which} could not get the memory its run asks for: {reason}") from None
            raise InvalidInputError(f"model {which} refused the sample inputs: {reason}") from None
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def _compare(out_a: Arrays, out_b: Arrays, feeds: Arrays) -> list[OutputComparison]:
    """Each output both models have, by the one comparer where shapes and types allow a comparison."""
    from onnxserve.toolkit.evaluation import compare_runs
    from onnxserve.toolkit.samples import Samples

    common = [name for name in out_a if name in out_b]
    measurable = [
        n
        for n in common
        if out_a[n].shape == out_b[n].shape and out_a[n].dtype.kind in "fiub" and out_b[n].dtype.kind in "fiub"
    ]
    measured = {}
    if measurable:
        accuracy = compare_runs(
            lambda _: {n: out_a[n] for n in measurable},
            lambda _: {n: out_b[n] for n in measurable},
            Samples([dict(feeds)], "the diff's inputs"),
        )
        measured = {o.name: o for o in accuracy.outputs}
    comparisons: list[OutputComparison] = []
    for name in common:
        shape_a, shape_b = list(out_a[name].shape), list(out_b[name].shape)
        found = measured.get(name)
        if found is None:
            comparisons.append(OutputComparison(name, shape_a, shape_b, None, None, None))
        else:
            comparisons.append(
                OutputComparison(name, shape_a, shape_b, found.max_abs, found.mean_abs, found.cosine, found.agreement)
            )
    return comparisons
