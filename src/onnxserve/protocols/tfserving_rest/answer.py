"""TF Serving predict answers written as JSON in bounded slices, within ``--max-response-bytes``.

The JSON text of an answer is several times its tensors (a UINT8 ``1`` in the row form of a two-output
model is ``{"x":1,"y":1},``: 16 bytes for 2), and building it as one document made a Python object per
row or element (the row form's dicts; ``tolist()`` for NaN/Infinity, which only the standard library's
encoder writes as TF Serving does). Here the answer is written a slice of rows at a time, each slice
encoded by one call of the encoder: a fixed number of Python objects is alive at once, other threads
run between slices, and writing stops as soon as the text passes the limit.

Before any slice is written, bounds on the text's size are computed from the shapes (brackets, commas,
keys: exact) and the widest and narrowest text of an element of each datatype (``json_size``, shared
with KServe V2 JSON answers): an answer whose
smallest possible text is above the limit is refused at once, and the in-flight budget holds the
largest possible text (at most the limit) while it is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from onnxserve.core.types import Tensor
from onnxserve.protocols import json_size
from onnxserve.protocols.json_size import Body, Bounds
from onnxserve.protocols.tfserving_rest import values

SLICE_ELEMENTS = 1 << 16
"""Elements encoded by one call of the encoder (and Python objects alive at once for the row form)."""

ENCODING = "as TF Serving JSON"

Dump = Callable[[Any], bytes]


def bounds(tensors: Sequence[Tensor], rows: bool) -> Bounds:
    """Bounds on the size of ``{"predictions": ...}`` (``rows``) or ``{"outputs": ...}``."""
    least = most = len('{"predictions":}' if rows else '{"outputs":}')
    if len(tensors) != 1:
        keys = sum(len(json.dumps(t.name)) + 1 for t in tensors) + max(0, len(tensors) - 1)
        if rows and tensors:
            count = tensors[0].shape[0]
            # [ {keys} , ... ]: the keys, braces and commas of every row
            least += 2 + count * (keys + 2) + max(0, count - 1)
            most += 2 + count * (keys + 2) + max(0, count - 1)
        else:
            least, most = least + keys + 2, most + keys + 2
    for tensor in tensors:
        shape = tensor.shape[1:] if rows and len(tensors) != 1 else tensor.shape
        rows_of = tensor.shape[0] if rows and len(tensors) != 1 else 1
        structure = rows_of * json_size.structure(shape)
        elements = json_size.element_bounds(tensor.data)
        least += structure + elements.least
        most += structure + elements.most
    return Bounds(least, most)


def write_value(body: Body, dump: Dump, tensor: Tensor) -> None:
    """One output's value, as ``dump(values.to_json(...))`` of the whole tensor writes it."""
    array = tensor.data
    if array.ndim == 0 or array.size <= SLICE_ELEMENTS:
        body.write(dump(values.to_json(tensor.datatype, array)))
        return
    step = max(1, SLICE_ELEMENTS // max(1, _row_size(tensor)))
    body.write(b"[")
    for start in range(0, array.shape[0], step):
        if start:
            body.write(b",")
        body.write(memoryview(dump(values.to_json(tensor.datatype, array[start : start + step])))[1:-1])
    body.write(b"]")


def write_rows(body: Body, dump: Dump, tensors: Sequence[Tensor]) -> None:
    """``[{name: row of each output}, ...]``, as ``dump`` of the whole list of rows writes it."""
    count = tensors[0].shape[0] if tensors else 0
    per_row = sum(max(1, _row_size(t)) for t in tensors)
    step = max(1, SLICE_ELEMENTS // per_row)
    names = [t.name for t in tensors]
    body.write(b"[")
    for start in range(0, count, step):
        if start:
            body.write(b",")
        columns = [values.to_json(t.datatype, t.data[start : start + step]) for t in tensors]
        rows = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
        text = dump(rows)
        del rows, columns
        body.write(memoryview(text)[1:-1])
    body.write(b"]")


def _row_size(tensor: Tensor) -> int:
    return int(np.prod(tensor.shape[1:], dtype=np.int64))


def has_nonfinite(tensors: Sequence[Tensor]) -> bool:
    return any(t.data.dtype.kind == "f" and not np.isfinite(t.data).all() for t in tensors)
