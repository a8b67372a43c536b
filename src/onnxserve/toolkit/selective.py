"""Selective int8: quantize every node that can keep the accuracy budget, keep the sensitive ones in float.

Per-channel int8 of every MatMul is blunt: a few nodes (often an outlier-heavy projection, the first
or last layer, attention scores) carry most of the error. The search:

1. quantize everything; if the worst case on the *search* split keeps the budget, done;
2. else every MatMul whose input has **outlier channels** (a few input channels far larger than the
   rest on the search inputs, :mod:`onnxserve.toolkit.outlier_channels`) takes those channels through
   a float side product and the rest in per-tensor int8, the other MatMuls in plain per-tensor int8,
   the other candidates (small Gathers, Convs, ...) in float: if that keeps the budget, the split
   MatMuls are ranked by sensitivity (3. below) and the least sensitive go back to plain per-tensor
   int8 (the split costs an element-wise Mul, a small Gather, a small float MatMul and an Add each),
   bisecting on how many, each count really measured; the most that keeps the budget, done;
3. else every MatMul in block-wise int8 (:mod:`onnxserve.toolkit.blockwise_quantization`: one scale per
   128, else per 32, values of the weight and of the input, instead of one per input tensor), the
   other candidates in float: if that keeps the budget, it is the start of **mixed** int8: the
   block-wise MatMuls are ranked by sensitivity and the least sensitive go back to per-tensor dynamic
   int8 (about twice as fast as block-wise on ONNX Runtime's CPU kernels), bisecting on how many,
   each count really measured; the most that keeps the budget, done;
4. rank the quantizable nodes by sensitivity: each node's own relative output error when its inputs
   and weights are rounded the way ONNX Runtime's quantizer rounds them (weights symmetric int8 per
   output channel, 7-bit where ``reduce_range``; activations asymmetric uint8 per tensor), measured on
   the float model's real intermediate values for the search inputs (worst over inputs);
5. keep the top 1, 2, 4, ... nodes in float (``nodes_to_exclude``) until the budget holds, then bisect
   to the fewest; each candidate is really quantized and measured, the ranking only orders the tries;
6. size: the float nodes holding the most weight bytes (an embedding table, say) are put back into
   int8 one at a time (at most :data:`SIZE_TRIES`), each kept in int8 only if the budget still holds;
7. size again: the MatMuls still in float are tried in block-wise int8 (all of them; blocks of 128,
   else 32), kept so only if the budget holds, and then mixed as in 3.

A Gather over a large embedding table is a candidate like the others, but its int8 form is per-row
(:mod:`onnxserve.toolkit.embedding_quantization`), and so is the rounding its sensitivity is measured
with; which tables ended in int8, and their sizes, are reported.

The int8 schemes the search may give a MatMul can be narrowed (``--int8-schemes``, :data:`SCHEMES`;
all three by default), as ONNX Runtime's and Optimum's quantizers let users pick what is quantized how:

- without ``per-tensor``, no MatMul is per-tensor int8: step 1, the split (2.), the move back to
  per-tensor int8 of the mixed steps and the float search (4.-7.) are skipped, so the search is
  3. alone, every MatMul block-wise int8 (a faster search, a slower model);
- without ``outlier-channels``, step 2 is skipped (as is measuring the MatMuls' input channels);
- without ``block-wise``, steps 3 and 7 are.

A result that needs every quantizable node in float is no int8 model: the search reports failure.
The chosen model is then checked on the *held-out* split by the caller (:mod:`onnxserve.toolkit.optimize`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from onnxserve.errors import OptimizeError
from onnxserve.toolkit.blockwise_quantization import BLOCKS
from onnxserve.toolkit.embedding_quantization import embedding_tables, row_error
from onnxserve.toolkit.evaluation import Accuracy, AccuracyBudget, compare_models, open_session, session_runner
from onnxserve.toolkit.outlier_channels import channel_peaks, outlier_channels
from onnxserve.toolkit.quantize import QuantizeSettings, quantize
from onnxserve.toolkit.samples import Samples

QUANTIZABLE = ("MatMul", "Gemm", "Conv", "Attention", "Gather", "LSTM", "EmbedLayerNormalization")
"""Operators ONNX Runtime's int8 quantizer rewrites (its IntegerOps registry, Transpose aside)."""

PER_TENSOR, OUTLIER_CHANNELS, BLOCK_WISE = "per-tensor", "outlier-channels", "block-wise"
SCHEMES = (PER_TENSOR, OUTLIER_CHANNELS, BLOCK_WISE)
"""The int8 schemes the search may give a MatMul, in the order it tries them: ONNX Runtime's dynamic
int8 (per-channel weights, one activation scale per tensor), the same with a MatMul's outlier input
channels through a float side product, block-wise int8 (one scale per block of values)."""

SIZE_TRIES = 2
"""Float nodes (the heaviest) tried back in int8 after the search, for size."""

HEAVY = 0.05
"""A float node is worth a size try when it holds at least this share of the model's weight bytes."""


@dataclass(frozen=True)
class Trial:
    float_nodes: int
    accuracy: dict[str, Any]
    passed: bool
    blockwise_nodes: int = 0  # of the float_nodes, how many were block-wise int8
    block: int | None = None  # their values per scale
    split_nodes: int = 0  # MatMuls with their outlier input channels in float


@dataclass
class Selection:
    """What the search chose: the model, the nodes kept in float (most sensitive first) and those
    kept out of per-tensor int8 in block-wise int8."""

    model: onnx.ModelProto
    float_nodes: list[str]
    candidates: int
    passed: bool
    accuracy: Accuracy  # on the search split
    sensitivity: dict[str, float] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)  # embedding tables: size, int8 or not
    blockwise_nodes: list[str] = field(default_factory=list)
    block: int | None = None  # values per scale of the block-wise nodes
    split_nodes: dict[str, list[int]] = field(default_factory=dict)  # MatMul -> its input channels in float
    schemes: tuple[str, ...] = SCHEMES  # the int8 schemes the search was allowed

    def to_dict(self) -> dict[str, Any]:
        return {
            "int8_schemes": list(self.schemes),
            "float_nodes": self.float_nodes,
            "blockwise_int8_nodes": self.blockwise_nodes,
            "blockwise_block": self.block,
            "outlier_channel_nodes": self.split_nodes,
            "quantizable_nodes": self.candidates,
            "passed_on_search_split": self.passed,
            "search_accuracy": self.accuracy.to_dict(),
            "sensitivity": {
                n: self.sensitivity[n]
                for n in [*self.float_nodes, *self.blockwise_nodes, *self.split_nodes]
                if n in self.sensitivity
            },
            "trials": [
                {
                    "float_nodes": t.float_nodes,
                    "blockwise_nodes": t.blockwise_nodes,
                    "block": t.block,
                    "outlier_channel_nodes": t.split_nodes,
                    "passed": t.passed,
                    **t.accuracy,
                }
                for t in self.trials
            ],
            "embedding_tables": self.tables,
        }


def check_schemes(schemes: Collection[str]) -> None:
    """An :class:`OptimizeError` naming what is wrong with ``schemes`` (``--int8-schemes``), if anything."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise OptimizeError(f"--int8-schemes {unknown[0]!r}: choose from {', '.join(SCHEMES)}")
    if not schemes:
        raise OptimizeError(f"--int8-schemes: name at least one of {', '.join(SCHEMES)}")
    if OUTLIER_CHANNELS in schemes and PER_TENSOR not in schemes:
        raise OptimizeError(
            f"--int8-schemes {OUTLIER_CHANNELS} needs {PER_TENSOR}: a split MatMul takes the rest of its input "
            "in per-tensor int8"
        )


def parse_schemes(text: str) -> tuple[str, ...]:
    """``--int8-schemes``' comma-separated names, checked, in the order the search tries them."""
    named = {part.strip() for part in text.split(",") if part.strip()}
    check_schemes(named)
    return tuple(s for s in SCHEMES if s in named)


def name_nodes(src: Path, dst: Path) -> Path:
    """``src`` when every node has a unique name, else a copy at ``dst`` where each gets one
    (``OpType_index``): the quantizer excludes nodes by name."""
    model = onnx.load(str(src))
    names = [n.name for n in model.graph.node]
    if all(names) and len(set(names)) == len(names):
        return src
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(model, str(dst))
    return dst


def quantizable(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes the quantizer may rewrite (a Gather only over a float table)."""
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    found = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in QUANTIZABLE:
            continue
        if node.op_type == "Gather" and (not node.input or node.input[0] not in floats):
            continue
        found.append(node.name)
    return found


def _fake_activation(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Dynamic quantization of an activation: asymmetric uint8, one scale per tensor, range with 0."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    result: npt.NDArray[Any] = (q - zero) * scale
    return result


def _fake_weight(w: npt.NDArray[Any], axis: int | None, reduce_range: bool) -> npt.NDArray[Any]:
    """Symmetric int8 weights, one scale per channel along ``axis`` (None: per tensor)."""
    top = 63.0 if reduce_range else 127.0
    if axis is None:
        peak = np.abs(w).max(keepdims=True)
    else:
        peak = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis % w.ndim), keepdims=True)
    scale = np.where(peak > 0, peak / top, 1.0)
    result: npt.NDArray[Any] = np.clip(np.round(w / scale), -top - 1, top) * scale
    return result


def _relative(ref: npt.NDArray[Any], approx: npt.NDArray[Any]) -> float:
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - approx)) / norm if norm > 0 else 0.0


def sensitivity(
    model_file: Path, names: list[str], samples: Samples, work: Path, reduce_range: bool
) -> dict[str, float]:
    """Each node's own relative output error under int8 rounding, worst over the sample inputs."""
    model = onnx.load(str(model_file))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    per_row = {t.name for t in embedding_tables(model)}
    nodes = {n.name: n for n in model.graph.node if n.name in set(names)}
    wanted: list[str] = []
    for node in nodes.values():
        if node.op_type in ("MatMul", "Gemm", "Attention"):
            for value in node.input[: 2 if node.op_type != "Attention" else 1]:
                if value and value not in weights and value not in wanted:
                    wanted.append(value)
    scores = {name: 0.0 for name in nodes}
    rounded: dict[tuple[str, bool], npt.NDArray[Any]] = {}  # each weight rounded once, not once per sample
    judged: set[str] = set()  # nodes judged by their weights alone: the same on every sample
    for values in _intermediates(model, wanted, samples, work):
        for name, node in nodes.items():
            if name in judged:
                continue
            error = _node_error(node, values, weights, reduce_range, per_row, rounded)
            scores[name] = max(scores[name], error)
            if node.op_type not in ("MatMul", "Gemm", "Attention"):
                judged.add(name)
    return scores


def input_channels(model_file: Path, names: Collection[str], samples: Samples, work: Path) -> dict[str, list[int]]:
    """The outlier input channels of each MatMul named in ``names`` (see
    :func:`onnxserve.toolkit.outlier_channels.outlier_channels`), from its float input on the sample
    inputs; MatMuls without any are left out."""
    model = onnx.load(str(model_file))
    nodes = {n.name: n for n in model.graph.node if n.name in set(names) and n.op_type == "MatMul"}
    peaks: dict[str, npt.NDArray[np.float64]] = {}
    for values in _intermediates(model, sorted({n.input[0] for n in nodes.values()}), samples, work):
        for name, node in nodes.items():
            if node.input[0] in values:
                found = channel_peaks(values[node.input[0]])
                peaks[name] = np.maximum(peaks[name], found) if name in peaks else found
    channels = {name: outlier_channels(p) for name, p in peaks.items()}
    return {name: found for name, found in channels.items() if found}


def _intermediates(
    model: onnx.ModelProto, wanted: list[str], samples: Samples, work: Path
) -> Iterator[dict[str, npt.NDArray[Any]]]:
    """For each batch of ``samples``: the float values named in ``wanted`` (graph inputs, intermediate
    values) as float64, the float model run with those values as extra outputs."""
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for value in wanted:
        if value not in present:
            probe_model.graph.output.append(helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
    probe = work / "probe.onnx"
    onnx.save(probe_model, str(probe))
    try:
        run = session_runner(open_session(probe))
        for feeds in samples.batches:
            yield {
                k: np.asarray(v, dtype=np.float64)
                for k, v in {**feeds, **run(feeds)}.items()
                if k in wanted and np.asarray(v).dtype.kind == "f"
            }
    finally:
        probe.unlink(missing_ok=True)


def _node_error(
    node: onnx.NodeProto,
    values: dict[str, npt.NDArray[Any]],
    weights: dict[str, npt.NDArray[Any]],
    reduce_range: bool,
    per_row: Collection[str] = (),
    rounded: dict[tuple[str, bool], npt.NDArray[Any]] | None = None,
) -> float:
    """The node's relative output error under int8 rounding on one sample's ``values``; ``rounded``
    keeps each weight's rounding (by name and whether it was transposed) for the next samples."""
    cache: dict[tuple[str, bool], npt.NDArray[Any]] = {} if rounded is None else rounded

    def weight(name: str, w: npt.NDArray[Any], transposed: bool) -> npt.NDArray[Any]:
        key = (name, transposed)
        if key not in cache:
            cache[key] = _fake_weight(w, -1, reduce_range)
        return cache[key]

    op = node.op_type
    if op in ("MatMul", "Gemm", "Attention"):
        a_name, b_name = node.input[0], node.input[1]
        a = values.get(a_name, weights.get(a_name))
        b = values.get(b_name, weights.get(b_name))
        if a is None or b is None:
            return 0.0
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        ta = op == "Gemm" and bool(attrs.get("transA", 0))
        tb = op == "Gemm" and bool(attrs.get("transB", 0))
        a = a.T if ta else a
        b = b.T if tb else b
        qa = weight(a_name, a, ta) if a_name in weights else _fake_activation(a)
        qb = weight(b_name, b, tb) if b_name in weights else _fake_activation(b)
        try:
            return _relative(np.matmul(a, b), np.matmul(qa, qb))
        except ValueError:  # shapes that do not multiply as plain matrices: judge the weight alone
            return _relative(b, qb)
    # Conv, Gather, LSTM, EmbedLayerNormalization: the rounding error of their float weights
    errors = [
        row_error(weights[w])
        if w in per_row
        else _relative(weights[w], _fake_weight(weights[w], 0 if op == "Conv" else None, reduce_range))
        for w in node.input
        if w in weights and weights[w].ndim >= 2
    ]
    return max(errors, default=0.0)


def select(
    model: onnx.ModelProto,
    settings: QuantizeSettings,
    calibration: Samples | None,
    search: Samples,
    budget: AccuracyBudget,
    task: str | None,
    step: Callable[[str], None] = lambda _text: None,
    schemes: Collection[str] = SCHEMES,
) -> Selection:
    """The int8 model with the fewest float nodes that keeps ``budget`` on ``search`` (the pass
    ``optimize`` runs), its MatMuls in the int8 ``schemes`` allowed: the quantizer works on files, so the
    search runs in a temporary folder of its own."""
    check_schemes(schemes)
    with tempfile.TemporaryDirectory(prefix="onnxserve-selective-") as work:
        model_file = Path(work) / "source.onnx"
        onnx.save(model, str(model_file))
        selection = _search(model_file, Path(work), settings, calibration, search, budget, task, step, schemes)
    selection.schemes = tuple(s for s in SCHEMES if s in schemes)
    return selection


def _search(
    model_file: Path,
    work: Path,
    settings: QuantizeSettings,
    calibration: Samples | None,
    search: Samples,
    budget: AccuracyBudget,
    task: str | None,
    step: Callable[[str], None] = lambda _text: None,
    schemes: Collection[str] = SCHEMES,
) -> Selection:
    """The int8 model with the fewest float nodes that keeps ``budget`` on ``search``, its MatMuls in the
    int8 ``schemes`` allowed."""
    per_tensor = PER_TENSOR in schemes
    named = name_nodes(model_file, work / "named.onnx")
    candidates = quantizable(onnx.load_model(str(named), load_external_data=False))
    trials: list[Trial] = []
    tables: dict[Path, list[dict[str, Any]]] = {}  # each try's embedding tables

    def trial(
        exclude: list[str],
        blockwise: list[str] | None = None,
        block: int = BLOCKS[-1],
        outliers: dict[str, list[int]] | None = None,
    ) -> tuple[Path, Accuracy, bool]:
        out = work / f"selective-{len(trials)}.onnx"
        blockwise = blockwise or []
        step(
            f"int8: trying with {len(exclude)} of {len(candidates)} nodes out of int8, {len(blockwise)} block-wise, "
            f"{len(outliers or {})} with outlier channels in float"
        )
        tables[out] = quantize(named, out, settings, calibration, exclude, blockwise, block, outliers)
        accuracy = compare_models(named, out, search, task)
        passed = not budget.violations(accuracy)
        trials.append(
            Trial(
                len(exclude),
                _brief(accuracy),
                passed,
                len(blockwise),
                block if blockwise else None,
                len(outliers or {}),
            )
        )
        return out, accuracy, passed

    if per_tensor or not candidates:
        full, full_accuracy, passed = trial([])
        if passed or not candidates:
            return Selection(onnx.load(str(full)), [], len(candidates), passed, full_accuracy, {}, trials, tables[full])
    rewritable = _matmuls(named)
    table_readers = {
        n for t in embedding_tables(onnx.load_model(str(named), load_external_data=False)) for n in t.nodes
    }
    others = [n for n in candidates if n not in table_readers]  # the tables stay per-row int8
    blockwise = [n for n in others if n in rewritable]
    floats = [n for n in others if n not in rewritable]
    channels: dict[str, list[int]] = {}
    if OUTLIER_CHANNELS in schemes:
        step(f"int8: measuring the input channels of {len(blockwise)} MatMuls")
        channels = input_channels(named, blockwise, search, work)
    passed = False
    last_blockwise: tuple[Path, Accuracy, int] | None = None  # for a search that ends there
    if channels:  # outlier channels in float, the rest per-tensor int8; other candidates float
        with contextlib.suppress(OptimizeError):  # ONNX Runtime's quantizer could not rewrite it: block-wise
            out, accuracy, passed = trial(floats, None, BLOCKS[-1], channels)
        if passed:
            step(f"int8: measuring the sensitivity of {len(channels)} MatMuls with outlier channels")
            scores = sensitivity(named, list(channels), search, work, settings.reduce_range)
            split, out, accuracy = _fewer_split(trial, floats, channels, scores, (out, accuracy))
            return Selection(
                onnx.load(str(out)),
                floats,
                len(candidates),
                True,
                accuracy,
                scores,
                trials,
                tables[out],
                split_nodes=split,
            )
    for block in BLOCKS if blockwise and BLOCK_WISE in schemes else ():  # every MatMul block-wise, others float
        try:
            out, accuracy, passed = trial(others, blockwise, block)
        except OptimizeError:  # ONNX Runtime's block-wise quantizer could not rewrite this graph
            break
        last_blockwise = (out, accuracy, block)
        if passed and not per_tensor:  # no MatMul may go back to per-tensor int8: done
            return Selection(
                onnx.load(str(out)), floats, len(candidates), True, accuracy, {}, trials, tables[out], blockwise, block
            )
        if passed:
            step(f"int8: measuring the sensitivity of {len(blockwise)} block-wise MatMuls")
            scores = sensitivity(named, blockwise, search, work, settings.reduce_range)
            kept, out, accuracy = _fewer_blockwise(trial, floats, blockwise, block, scores, (out, accuracy))
            return Selection(
                onnx.load(str(out)), floats, len(candidates), True, accuracy, scores, trials, tables[out], kept, block
            )
    if not per_tensor:  # the float search keeps every other node per-tensor int8: not allowed
        if last_blockwise is None:
            raise OptimizeError(
                f"int8 schemes {', '.join(s for s in SCHEMES if s in schemes)}: ONNX Runtime's quantizer "
                "could not rewrite this model's MatMuls in them"
            )
        out, accuracy, block = last_blockwise
        return Selection(
            onnx.load(str(out)), floats, len(candidates), False, accuracy, {}, trials, tables[out], blockwise, block
        )
    step(f"int8: measuring the sensitivity of {len(candidates)} nodes")
    scores = sensitivity(named, candidates, search, work, settings.reduce_range)
    ranking = sorted(candidates, key=lambda n: -scores.get(n, 0.0))
    failing, best = 0, None
    k = 1
    while k < len(ranking):
        out, accuracy, passed = trial(ranking[:k])
        if passed:
            best = (k, out, accuracy)
            break
        failing, k = k, k * 2
    if best is None:  # only an all-float model would keep the budget: that is no int8 model
        return Selection(onnx.load(str(full)), [], len(candidates), False, full_accuracy, scores, trials, tables[full])
    while best[0] - failing > 1:
        middle = (failing + best[0]) // 2
        out, accuracy, passed = trial(ranking[:middle])
        if passed:
            best = (middle, out, accuracy)
        else:
            failing = middle
    count, out, accuracy = best
    kept = ranking[:count]
    sizes = _weight_bytes(named)
    total = sum(sizes.values()) or 1
    heavy = sorted((n for n in kept if sizes.get(n, 0) >= HEAVY * total), key=lambda n: -sizes.get(n, 0))
    for name in heavy[:SIZE_TRIES]:
        fewer = [n for n in kept if n != name]
        tried, tried_accuracy, passed = trial(fewer)
        if passed:
            kept, out, accuracy = fewer, tried, tried_accuracy
    matmuls = [n for n in kept if n in rewritable]  # the MatMuls still in float: block-wise int8?
    chosen: list[str] = []
    chosen_block = None
    for block in BLOCKS if matmuls and BLOCK_WISE in schemes else ():
        try:
            tried_file, tried_accuracy, passed = trial(kept, matmuls, block)
        except OptimizeError:
            break
        if passed:
            floats = [n for n in kept if n not in matmuls]
            chosen, out, accuracy = _fewer_blockwise(
                trial, floats, matmuls, block, scores, (tried_file, tried_accuracy)
            )
            kept = [*floats, *chosen]
            chosen_block = block
            break
    float_nodes = [n for n in kept if n not in chosen]
    return Selection(
        onnx.load(str(out)),
        float_nodes,
        len(candidates),
        True,
        accuracy,
        scores,
        trials,
        tables[out],
        chosen,
        chosen_block,
    )


def _fewer_blockwise(
    trial: Callable[[list[str], list[str] | None, int], tuple[Path, Accuracy, bool]],
    floats: list[str],
    blockwise: list[str],
    block: int,
    scores: dict[str, float],
    passing: tuple[Path, Accuracy],
) -> tuple[list[str], Path, Accuracy]:
    """Mixed int8: the fewest of ``blockwise`` (a choice that keeps the budget, ``floats`` in float) still
    block-wise, the others in per-tensor dynamic int8, which ONNX Runtime runs about twice as fast.

    The least sensitive are moved first; the search bisects on how many move (assuming that moving
    more never helps the accuracy), each count really quantized and measured. Returns the nodes
    left block-wise, the model file and its accuracy."""
    order = sorted(blockwise, key=lambda n: scores.get(n, 0.0))  # least sensitive first
    best: tuple[int, Path, Accuracy] = (0, *passing)
    failing = len(order) + 1  # every one of them per-tensor has not been tried
    while failing - best[0] > 1:
        middle = (best[0] + failing) // 2
        rest = order[middle:]
        out, accuracy, passed = trial([*floats, *rest], rest, block)
        if passed:
            best = (middle, out, accuracy)
        else:
            failing = middle
    moved, out, accuracy = best
    return [n for n in blockwise if n not in order[:moved]], out, accuracy


def _fewer_split(
    trial: Callable[[list[str], list[str] | None, int, dict[str, list[int]] | None], tuple[Path, Accuracy, bool]],
    floats: list[str],
    channels: dict[str, list[int]],
    scores: dict[str, float],
    passing: tuple[Path, Accuracy],
) -> tuple[dict[str, list[int]], Path, Accuracy]:
    """The fewest of the MatMuls in ``channels`` (a choice that keeps the budget with all of them split,
    ``floats`` in float) still split, the others in plain per-tensor int8, which saves the split's extra
    work. The least sensitive are moved first, bisecting on how many as :func:`_fewer_blockwise` does.
    Returns the MatMuls left split (with their channels), the model file and its accuracy."""
    order = sorted(channels, key=lambda n: scores.get(n, 0.0))  # least sensitive first
    best: tuple[int, Path, Accuracy] = (0, *passing)
    failing = len(order) + 1  # every one of them plain per-tensor int8 has not been tried
    while failing - best[0] > 1:
        middle = (best[0] + failing) // 2
        out, accuracy, passed = trial(floats, None, BLOCKS[-1], {n: channels[n] for n in order[middle:]})
        if passed:
            best = (middle, out, accuracy)
        else:
            failing = middle
    moved, out, accuracy = best
    return {n: channels[n] for n in channels if n not in order[:moved]}, out, accuracy


def _matmuls(model_file: Path) -> set[str]:
    """The MatMuls with a constant 2-D float weight: those block-wise int8 can rewrite."""
    model = onnx.load_model(str(model_file), load_external_data=False)
    weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights}


def _weight_bytes(model_file: Path) -> dict[str, int]:
    """Node name -> bytes of the float initializers it reads."""
    model = onnx.load(str(model_file))
    sizes = {t.name: len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer}
    return {n.name: sum(sizes.get(i, 0) for i in n.input) for n in model.graph.node}


def _brief(accuracy: Accuracy) -> dict[str, Any]:
    return {"cosine": accuracy.cosine, "agreement": accuracy.agreement, "max_abs_diff": accuracy.max_abs}
