"""TF Serving JSON values <-> numpy arrays.

A value is a number, boolean, string or ``{"b64": "..."}``, or evenly nested lists of them. There
is no datatype on the wire: the model's input datatype decides how a value is read. Shapes are
whatever the nesting says; the core checks them against the model.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.datatypes import DataType
from onnxserve.errors import InvalidInputError

B64 = "b64"

TF_DTYPES: dict[str, str] = {
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "FP16": "DT_HALF",
    "INT64": "DT_INT64",
    "INT32": "DT_INT32",
    "INT16": "DT_INT16",
    "INT8": "DT_INT8",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "BOOL": "DT_BOOL",
    "BYTES": "DT_STRING",
}
"""V2 datatype name -> TensorFlow DataType name, as TF Serving's metadata spells it."""

# numpy kinds a parsed JSON value may have, per kind of the target dtype
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "booleans (true/false)", "i": "integers", "u": "integers", "f": "numbers"}
_FOUND_WORDS = {"f": "non-integer numbers", "U": "strings", "b": "booleans", "O": "non-numeric values"}


def tf_dtype(datatype: DataType) -> str:
    return TF_DTYPES[datatype.v2]


def is_b64(value: Any) -> bool:
    """Whether ``value`` is a binary value ``{"b64": "..."}`` rather than an object of named inputs."""
    return isinstance(value, dict) and len(value) == 1 and B64 in value


def holds_text(value: Any) -> bool:
    """Whether a value's first leaf is a string or ``{"b64": ...}`` (the wire has no datatype)."""
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, str) or is_b64(value)


def to_array(name: str, datatype: DataType, value: Any, what: str = "") -> npt.NDArray[Any]:
    """``value`` read as ``datatype``; ``what`` says where it came from, for error messages."""
    where = f"input {name!r}{what}"
    if datatype.is_bytes:
        return _bytes_array(where, value)
    return _numeric_array(where, datatype, value)


def _numeric_array(where: str, datatype: DataType, value: Any) -> npt.NDArray[Any]:
    kind = datatype.numpy.kind
    expected = f"{tf_dtype(datatype)} needs {_KIND_WORDS[kind]}"
    try:
        parsed = np.asarray(value)
    except (ValueError, OverflowError):
        raise InvalidInputError(
            f"{where}: values must be evenly nested lists (every row the same length); {expected}"
        ) from None
    if parsed.size == 0:
        return parsed.astype(datatype.numpy)
    if kind in "iu" and parsed.dtype.kind in "fO":
        # integers beyond int64 make numpy fall back to float64 or object: check them exactly
        parsed = _exact_integers(where, datatype, value, parsed)
    if parsed.dtype.kind not in _ACCEPTED_KINDS[kind]:
        found = _FOUND_WORDS.get(parsed.dtype.kind, "integers")
        raise InvalidInputError(f"{where}: {expected}, but the values hold {found}")
    if kind in "iu":
        info = np.iinfo(datatype.numpy)  # type: ignore[type-var]
        low, high = int(parsed.min()), int(parsed.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidInputError(f"{where}: value {bad} is out of range for {tf_dtype(datatype)}")
    with np.errstate(over="ignore", invalid="ignore"):
        return parsed.astype(datatype.numpy, copy=False)


def _exact_integers(where: str, datatype: DataType, value: Any, parsed: npt.NDArray[Any]) -> npt.NDArray[Any]:
    values = np.array(value, dtype=object).ravel().tolist()
    if not all(type(v) is int for v in values):
        return parsed  # genuinely not integers: the kind check names what they are
    info = np.iinfo(datatype.numpy)  # type: ignore[type-var]
    for v in values:
        if not info.min <= v <= info.max:
            raise InvalidInputError(f"{where}: value {v} is out of range for {tf_dtype(datatype)}")
    return np.array(values, dtype=datatype.numpy).reshape(parsed.shape)


def _bytes_array(where: str, value: Any) -> npt.NDArray[Any]:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level: list[Any] = [value]
    for size in shape:
        below: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                raise _ragged(where)
            below.extend(item)
        level = below
    array = np.empty(len(level), dtype=object)
    array[:] = [_bytes_leaf(where, item) for item in level]
    return array.reshape(shape)


def _ragged(where: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: values must be evenly nested lists (every row the same length)")


def _bytes_leaf(where: str, item: Any) -> bytes:
    if isinstance(item, str):
        try:
            return item.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{where}: a string holds a lone surrogate, which is not text") from None
    if is_b64(item) and isinstance(item[B64], str):
        try:
            return base64.b64decode(item[B64], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{where}: {item[B64][:40]!r} is not valid base64") from None
    if isinstance(item, list):
        raise _ragged(where)
    raise InvalidInputError(f'{where}: DT_STRING needs strings or {{"b64": "..."}} objects, found {_json_type(item)}')


def _json_type(item: Any) -> str:
    if isinstance(item, bool):
        return "a boolean"
    if isinstance(item, (int, float)):
        return "a number"
    if item is None:
        return "null"
    return "an object" if isinstance(item, dict) else type(item).__name__


def to_json(datatype: DataType, array: npt.NDArray[Any]) -> Any:
    """A JSON-ready value: numeric arrays as they are (the encoder writes them), BYTES as nested lists.

    BYTES elements are strings when they are UTF-8 text, ``{"b64": "..."}`` otherwise.
    """
    if not datatype.is_bytes:
        # the canonical dtype: ONNX Runtime may hand back e.g. longlong, whose scalars orjson refuses
        return np.ascontiguousarray(array, dtype=datatype.numpy)
    flat = np.empty(array.size, dtype=object)
    flat[:] = [_bytes_json(b) for b in array.reshape(-1)]
    return flat.reshape(array.shape).tolist()


def _bytes_json(value: Any) -> Any:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {B64: base64.b64encode(raw).decode("ascii")}
