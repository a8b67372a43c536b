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

from onnxserve.core import wire
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
    """``value`` read as ``datatype``, shaped as its nesting; ``what`` says where it came from, for errors."""
    return wire.from_values(f"input {name!r}{what}", datatype, value, None, _bytes_leaf)


def _bytes_leaf(where: str, item: Any) -> bytes:
    if is_b64(item) and isinstance(item[B64], str):
        try:
            return base64.b64decode(item[B64], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{where}: {item[B64][:40]!r} is not valid base64") from None
    if isinstance(item, str):
        return wire.text_leaf(where, item)
    raise InvalidInputError(
        f'{where}: BYTES data must be strings or {{"b64": "..."}} objects, found {wire.json_type(item)}'
    )


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
