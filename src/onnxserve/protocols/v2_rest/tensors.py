"""V2 tensor data in JSON form (nested or flat row-major lists) <-> tensors, through the one wire codec."""

from __future__ import annotations

import reprlib
from typing import Any

from onnxserve.core import wire
from onnxserve.core.datatypes import DataType
from onnxserve.core.types import Tensor
from onnxserve.errors import InvalidInputError

_short = reprlib.Repr()  # what an error message may quote of a request
_short.maxlevel, _short.maxlist, _short.maxstring = 2, 8, 40


def parse_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInputError(f"input {name!r}: 'shape' must be a list of integers, got {_short.repr(shape)}")
    return wire.request_shape(name, shape)


def from_json(name: str, dtype: DataType, shape: tuple[int, ...], data: Any) -> Tensor:
    """A tensor from JSON ``data`` (flat or nested, row-major) that must hold exactly ``shape``'s elements."""
    return Tensor(name, dtype, wire.from_values(f"input {name!r}", dtype, data, shape, wire.text_leaf))


def to_json_data(tensor: Tensor) -> Any:
    """Row-major flat data for a JSON response; BYTES become strings (they must be UTF-8)."""
    if tensor.datatype.is_bytes:
        return wire.to_text(f"output {tensor.name!r}", tensor)
    return tensor.data.reshape(-1)
