"""Valid example requests generated from a model's signature, to prefill the page's try-it form."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from onnxserve.core.types import TensorSpec

EXAMPLE_TEXT = "ONNX Runtime serves this model."
EXAMPLE_QUESTION = "Who serves this model?"
EXAMPLE_CONTEXT = "onnxserve serves this model over the KServe V2 protocol."


def example_value(spec: TensorSpec, index: int) -> bool | int | float | str:
    """The ``index``-th element of the example tensor: small values every model of that type accepts.

    Integers cycle through 0..3 (valid indices for any axis of size 4 or more), floats through
    -1.0..0.75 in quarters (exact in every float width), booleans alternate.
    """
    kind = spec.datatype
    if kind.is_bytes:
        return "example"
    if kind.v2 == "BOOL":
        return index % 2 == 0
    if kind.v2.startswith("FP"):
        return (index % 8) * 0.25 - 1.0
    return index % 4


MAX_EXAMPLE_VALUES = 65_536
"""The most values an example tensor holds: a model whose fixed input shape asks for more (10 M values
made a 63 MB version page) gets an example cut to these, which the server refuses with the count it needs."""


def example_tensor(spec: TensorSpec) -> dict[str, Any]:
    """One V2 input tensor that fits ``spec``, every dynamic dimension at 1 (at most ``MAX_EXAMPLE_VALUES``)."""
    shape = list(spec.example_shape(1))
    count = min(math.prod(shape), MAX_EXAMPLE_VALUES)
    return {
        "name": spec.name,
        "datatype": spec.datatype.v2,
        "shape": shape,
        "data": [example_value(spec, i) for i in range(count)],
    }


def example_request(inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """A V2 inference request body with one example tensor per model input."""
    return {"inputs": [example_tensor(spec) for spec in inputs]}


def example_text(task: str, mask_token: str | None = None) -> str:
    """A sentence for a text model of ``task`` (with the mask token where the task needs one)."""
    if task == "fill-mask" and mask_token:
        return f"ONNX Runtime serves this {mask_token}."
    return EXAMPLE_TEXT


def request_text(request: dict[str, Any]) -> str:
    """A request body laid out for editing: one tensor per line."""
    tensors = ",\n    ".join(json.dumps(t) for t in request["inputs"])
    return f'{{\n  "inputs": [\n    {tensors}\n  ]\n}}'
