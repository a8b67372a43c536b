"""Outlier channels kept in float: per-tensor int8 MatMuls whose few large input channels do not set the scale.

Dynamic int8 quantizes a MatMul's input with one scale per tensor. A transformer's LayerNorm and GELU
outputs carry a few *channels* (the same few feature dimensions for every token and every input) up
to 15 times larger than the rest (all-MiniLM-L6-v2's feed-forward MatMuls); they set the scale, and
every other channel is rounded to a handful of levels. That, not the weights, is why the search kept
those MatMuls out of per-tensor int8. Split the product along the input dimension (the decomposition
of LLM.int8(), with the channels fixed ahead of time)::

    MatMul(x, W)   ->   Add(MatMul(Mul(x, keep), W_inliers), MatMul(Gather(x, channels, axis=-1), W[channels]))

``keep`` is 1 but 0 on the outlier channels and ``W_inliers`` is ``W`` with those rows zeroed: the
first MatMul (the original node, same name) is what ONNX Runtime's quantizer turns into per-tensor
int8, now with a scale set by the ordinary channels; the second multiplies the few outlier channels in
float32 (``k`` x ``N`` weights: a few KB). The extra work is an element-wise Mul, a small Gather, a
``k``-deep MatMul and an Add: a fraction of what block-wise int8 costs over per-tensor int8.

Which channels: :func:`outlier_channels`, from the largest magnitude of each input channel over the
search inputs (the same float intermediate values selective int8's sensitivity pass reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

CHANNELS = 8
"""The most input channels kept in float per MatMul."""

RATIO = 4.0
"""A channel is an outlier when its largest magnitude is at least this many times the median channel's."""

SUFFIXES = ("_inliers", "_outlier_gather", "_outliers", "_outlier_add")
"""The names of the nodes a rewrite adds, after the MatMul's name (the side MatMul stays float)."""


def outlier_channels(peaks: npt.NDArray[Any], limit: int = CHANNELS, ratio: float = RATIO) -> list[int]:
    """The input channels (largest first, at most ``limit``) whose peak magnitude ``peaks[c]`` is at
    least ``ratio`` times the median channel's; none when the channels are alike."""
    median = float(np.median(peaks))
    order = [int(c) for c in np.argsort(-peaks, kind="stable")[:limit]]
    return [c for c in order if median > 0 and float(peaks[c]) >= ratio * median]


def channel_peaks(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Largest magnitude of each channel (the last axis) of ``values``."""
    flat = np.abs(np.asarray(values, dtype=np.float64)).reshape(-1, values.shape[-1])
    peaks: npt.NDArray[np.float64] = flat.max(axis=0)
    return peaks


def side_nodes(name: str) -> list[str]:
    """The nodes :func:`split_outliers` adds for MatMul ``name``; the quantizer must leave them in float."""
    return [f"{name}{suffix}" for suffix in SUFFIXES]


def split_outliers(model: onnx.ModelProto, channels: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` where each MatMul named in ``channels`` (a constant 2-D float weight) takes
    its listed input channels through a float side product; other nodes, and MatMuls whose list is
    empty or whose weight is not a constant, are unchanged."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    weights = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        picked = sorted(set(channels.get(node.name, ())))
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if not picked or weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        if max(picked) >= w.shape[0]:
            nodes.append(node)
            continue
        base = node.name
        keep = np.ones(w.shape[0], dtype=np.float32)
        keep[picked] = 0.0
        inliers = w.copy()
        inliers[picked, :] = 0.0
        graph.initializer.extend(
            [
                numpy_helper.from_array(keep, f"{base}_keep"),
                numpy_helper.from_array(inliers, f"{base}_inlier_weight"),
                numpy_helper.from_array(np.asarray(picked, dtype=np.int64), f"{base}_outlier_index"),
                numpy_helper.from_array(np.ascontiguousarray(w[picked, :]), f"{base}_outlier_weight"),
            ]
        )
        x, y = node.input[0], node.output[0]
        mul, gather, side, add = side_nodes(base)
        masked, picked_values = f"{base}_masked", f"{base}_picked"
        inlier_product, outlier_product = f"{base}_inlier_product", f"{base}_outlier_product"
        nodes.append(helper.make_node("Mul", [x, f"{base}_keep"], [masked], name=mul))
        matmul = onnx.NodeProto()
        matmul.CopyFrom(node)
        matmul.input[:] = [masked, f"{base}_inlier_weight"]
        matmul.output[:] = [inlier_product]
        nodes.append(matmul)
        nodes.append(helper.make_node("Gather", [x, f"{base}_outlier_index"], [picked_values], name=gather, axis=-1))
        nodes.append(
            helper.make_node("MatMul", [picked_values, f"{base}_outlier_weight"], [outlier_product], name=side),
        )
        nodes.append(helper.make_node("Add", [inlier_product, outlier_product], [y], name=add))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:  # the rewritten MatMuls' own weights, unless something else reads them
        graph.initializer.remove(tensor)
    return result


def split_nodes(model: onnx.ModelProto) -> list[str]:
    """The MatMuls :func:`split_outliers` rewrote in ``model`` (after quantization too)."""
    suffix = SUFFIXES[-1]
    return [n.name.removesuffix(suffix) for n in model.graph.node if n.name.endswith(suffix)]
