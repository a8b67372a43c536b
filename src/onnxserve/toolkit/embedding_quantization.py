"""int8 embedding tables with one scale per row: a Gather over a large float table reads int8 rows.

A transformer's word-embedding table is often half of its weights (all-MiniLM-L6-v2: 30522 x 384
float32, 47 MB of 91 MB). ONNX Runtime's dynamic quantizer rewrites a Gather with **one** scale for
the whole table; the rows' ranges differ (a rare token's row is a few times smaller than the
largest), so one scale costs several percent of relative error on a row (4.7 % on average, 19 % at
worst on MiniLM), which shows on short inputs. With one scale per row the error is ~0.7 % on average.

The rewrite, for every table chosen (see :func:`embedding_tables` for which qualify)::

    Gather(table, ids)   ->   Mul(Cast<float>(Gather(table_int8, ids)), Gather(table_row_scale, ids))

``table_int8`` is symmetric int8 (``round(w / scale)`` in [-127, 127], no zero point: the rows are
centred on 0 and an asymmetric range gains ~0.05 % of error for a third Gather and an Add), and
``table_row_scale`` is float32 ``[rows, 1]`` (the row's largest magnitude / 127). Only the gathered
rows are dequantized at run time (a few hundred rows per batch, not the whole table), with standard
operators any runtime has. :func:`onnxserve.toolkit.quantize.quantize` applies it after ONNX Runtime's
quantizer, which is told to leave these Gathers alone.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

MIN_TABLE_BYTES = 1 << 20
"""A float table smaller than this (MiniLM's position and token-type embeddings: 0.8 MB, 3 KB) is left
to ONNX Runtime's quantizer: quantizing it per row saves too little to be worth a rewrite."""

QMAX = 127
"""Symmetric int8: -127..127, so that negating a row never saturates."""


@dataclass(frozen=True)
class EmbeddingTable:
    """A float32 2-D initializer read only by Gathers along its rows."""

    name: str
    nodes: tuple[str, ...]  # the Gather nodes reading it
    rows: int
    width: int

    @property
    def float_bytes(self) -> int:
        return 4 * self.rows * self.width

    @property
    def int8_bytes(self) -> int:
        return self.rows * self.width + 4 * self.rows  # int8 rows + one float32 scale per row

    def to_dict(self, quantized: bool) -> dict[str, Any]:
        return {
            "table": self.name,
            "nodes": list(self.nodes),
            "shape": [self.rows, self.width],
            "quantized": quantized,
            "float_bytes": self.float_bytes,
            "bytes": self.int8_bytes if quantized else self.float_bytes,
        }


def embedding_tables(model: onnx.ModelProto, min_bytes: int = MIN_TABLE_BYTES) -> list[EmbeddingTable]:
    """The tables worth quantizing per row: float32 2-D initializers of at least ``min_bytes``, read
    only as the data of Gathers along axis 0 (a table also read by a MatMul -- tied input and output
    embeddings -- or overridable as a graph input, or a graph output, is not one)."""
    graph = model.graph
    overridable = {i.name for i in graph.input} | {o.name for o in graph.output} | _subgraph_names(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for value in set(node.input):
            readers.setdefault(value, []).append(node)
    found = []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2 or tensor.name in overridable:
            continue
        rows, width = int(tensor.dims[0]), int(tensor.dims[1])
        nodes = readers.get(tensor.name, [])
        if 4 * rows * width < min_bytes or not nodes or not all(_gathers_rows(n, tensor.name) for n in nodes):
            continue
        found.append(EmbeddingTable(tensor.name, tuple(n.name for n in nodes), rows, width))
    return found


def _gathers_rows(node: onnx.NodeProto, table: str) -> bool:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or list(node.input).count(table) != 1:
        return False
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    return node.input[0] == table and axis == 0


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every value a subgraph (If / Loop / Scan body) reads: such a table is left alone."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for body in bodies:
                names |= {v for n in body.node for v in n.input} | _subgraph_names(body)
    return names


def quantize_rows(table: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric int8 rows and their float32 scales (``[rows, 1]``): ``table ~ rows * scales``."""
    peak = np.abs(table.astype(np.float32)).max(axis=1, keepdims=True)
    scales = np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)
    rows = np.clip(np.round(table / scales), -QMAX, QMAX).astype(np.int8)
    return rows, scales


def row_error(table: npt.NDArray[Any]) -> float:
    """The table's relative rounding error under per-row int8 (Frobenius norm): its sensitivity."""
    rows, scales = quantize_rows(table)
    restored = rows.astype(np.float64) * scales
    norm = float(np.linalg.norm(table))
    return float(np.linalg.norm(table - restored)) / norm if norm > 0 else 0.0


def quantize_tables(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose tables named in ``names`` (each an :func:`embedding_tables` table) are
    int8 rows with per-row scales, dequantized after the Gather; other tables are left as they are."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    chosen = {t.name: t for t in embedding_tables(result) if t.name in names}
    if not chosen:
        return result
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | {t.name for t in graph.initializer}
    taken |= {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    replaced: dict[str, tuple[str, str]] = {}
    kept = []
    for tensor in graph.initializer:
        if tensor.name not in chosen:
            kept.append(tensor)
            continue
        rows, scales = quantize_rows(numpy_helper.to_array(tensor))
        int8_name, scale_name = fresh(f"{tensor.name}_int8"), fresh(f"{tensor.name}_row_scale")
        kept += [numpy_helper.from_array(rows, int8_name), numpy_helper.from_array(scales, scale_name)]
        replaced[tensor.name] = (int8_name, scale_name)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = []
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in replaced:
            nodes.append(node)
            continue
        int8_name, scale_name = replaced[node.input[0]]
        ids, out = node.input[1], node.output[0]
        base = node.name or out
        rows_out, floats_out, scales_out = fresh(f"{out}_int8"), fresh(f"{out}_rows"), fresh(f"{out}_scale")
        nodes += [
            helper.make_node("Gather", [int8_name, ids], [rows_out], name=fresh(f"{base}_int8"), axis=0),
            helper.make_node("Cast", [rows_out], [floats_out], name=fresh(f"{base}_cast"), to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [scale_name, ids], [scales_out], name=fresh(f"{base}_scale"), axis=0),
            helper.make_node("Mul", [floats_out, scales_out], [out], name=fresh(f"{base}_dequantize")),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return result
