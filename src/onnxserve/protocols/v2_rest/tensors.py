"""V2 tensor data <-> numpy in JSON form: nested or flat row-major lists."""

from __future__ import annotations

import math
import reprlib
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.datatypes import DataType
from onnxserve.core.types import Tensor
from onnxserve.core.validation import format_shape, request_shape
from onnxserve.errors import InvalidInputError

_ACCEPTED_KINDS = {
    "b": ("b",),
    "i": ("i", "u"),
    "u": ("i", "u"),
    "f": ("i", "u", "f"),
}
_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}
_JSON_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", type(None): "null"}
_short = reprlib.Repr()  # what an error message may quote of a request
_short.maxlevel, _short.maxlist, _short.maxstring = 2, 8, 40


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def parse_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInputError(f"input {name!r}: 'shape' must be a list of integers, got {_short.repr(shape)}")
    return request_shape(name, shape)


def _flatten_strings(name: str, data: Any) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode("utf-8"))
        else:
            found = _JSON_TYPE_NAMES.get(type(item), "a non-string value")
            raise InvalidInputError(f"input {name!r}: BYTES data must be strings, found {found}")
    return out


def from_json(name: str, dtype: DataType, shape: tuple[int, ...], data: Any) -> Tensor:
    """A tensor from JSON ``data`` (flat or nested, row-major) that must hold exactly ``shape``'s elements."""
    count = element_count(shape)
    if dtype.is_bytes:
        values = _flatten_strings(name, data if isinstance(data, list) else [data])
        if len(values) != count:
            raise _count_error(name, len(values), shape)
        array = np.empty(count, dtype=object)
        array[:] = values
        return Tensor(name, dtype, array.reshape(shape))
    try:
        parsed = np.asarray(data)
    except (ValueError, OverflowError):
        raise InvalidInputError(
            f"input {name!r}: data must be a flat or evenly nested list of {_KIND_WORDS[dtype.numpy.kind]}"
        ) from None
    if parsed.size != count:
        raise _count_error(name, parsed.size, shape)
    if count and dtype.numpy.kind in "iu" and parsed.dtype.kind in "fO":
        # Integers beyond int64 make numpy fall back to float64 or object: check them exactly.
        parsed = _exact_integers(name, dtype, data, parsed)
    if count and parsed.dtype.kind not in _ACCEPTED_KINDS[dtype.numpy.kind]:
        raise InvalidInputError(
            f"input {name!r}: datatype {dtype.v2} needs {_KIND_WORDS[dtype.numpy.kind]}, "
            f"but data holds {_describe_kind(parsed)}"
        )
    if count and dtype.numpy.kind in "iu":
        info = np.iinfo(dtype.numpy)  # type: ignore[type-var]
        low, high = int(parsed.min()), int(parsed.max())
        if low < info.min or high > info.max:
            raise InvalidInputError(
                f"input {name!r}: value {low if low < info.min else high} is out of range for {dtype.v2}"
            )
    with np.errstate(over="ignore"):
        array = parsed.astype(dtype.numpy).reshape(shape)
    return Tensor(name, dtype, array)


def _exact_integers(name: str, dtype: DataType, data: Any, parsed: npt.NDArray[Any]) -> npt.NDArray[Any]:
    values = np.array(data, dtype=object).ravel().tolist()
    if not all(type(v) is int for v in values):
        return parsed  # genuinely non-integer data: the kind check below names it
    info = np.iinfo(dtype.numpy)  # type: ignore[type-var]
    for v in values:
        if not info.min <= v <= info.max:
            raise InvalidInputError(f"input {name!r}: value {v} is out of range for {dtype.v2}")
    return np.array(values, dtype=dtype.numpy).reshape(parsed.shape)


def _describe_kind(array: npt.NDArray[Any]) -> str:
    return {"f": "non-integer numbers", "U": "strings", "b": "booleans", "O": "non-numeric values"}.get(
        array.dtype.kind, "integers"
    )


def _count_error(name: str, given: int, shape: tuple[int, ...]) -> InvalidInputError:
    return InvalidInputError(
        f"input {name!r}: data has {given} elements but shape {format_shape(shape)} needs {element_count(shape)}"
    )


def to_json_data(tensor: Tensor) -> Any:
    """Row-major flat data for a JSON response; BYTES become strings (they must be UTF-8)."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype.is_bytes:
        try:
            return [b.decode("utf-8") for b in flat]
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"output {tensor.name!r} holds bytes that are not UTF-8 text; request it with binary_data"
            ) from None
    return flat
