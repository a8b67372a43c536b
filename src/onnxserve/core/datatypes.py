"""One table for tensor element types: KServe V2 datatype <-> numpy dtype <-> ONNX element type.

BYTES tensors are numpy ``object`` arrays holding ``bytes``. BF16 is a V2 datatype that numpy and
ONNX Runtime's Python binding cannot exchange, so a model that uses it is refused at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from onnxserve.errors import InvalidInputError, ModelLoadError


@dataclass(frozen=True)
class DataType:
    """One element type, named in every vocabulary that onnxserve speaks."""

    v2: str  # KServe V2 / Triton datatype name, e.g. "FP32"
    numpy: np.dtype[np.generic]
    onnx: int  # onnx.TensorProto element type
    ort: str  # ONNX Runtime type string, e.g. "tensor(float)"
    triton_config: str  # Triton model-configuration name, e.g. "TYPE_FP32"

    @property
    def is_bytes(self) -> bool:
        return self.v2 == "BYTES"

    @property
    def itemsize(self) -> int:
        """Bytes per element in raw form (0 for BYTES, whose elements vary in length)."""
        return 0 if self.is_bytes else self.numpy.itemsize


def _dt(v2: str, numpy_type: type[np.generic], onnx_type: int, ort: str) -> DataType:
    return DataType(v2, np.dtype(numpy_type), onnx_type, f"tensor({ort})", f"TYPE_{'STRING' if v2 == 'BYTES' else v2}")


_TABLE: tuple[DataType, ...] = (
    _dt("BOOL", np.bool_, TensorProto.BOOL, "bool"),
    _dt("UINT8", np.uint8, TensorProto.UINT8, "uint8"),
    _dt("UINT16", np.uint16, TensorProto.UINT16, "uint16"),
    _dt("UINT32", np.uint32, TensorProto.UINT32, "uint32"),
    _dt("UINT64", np.uint64, TensorProto.UINT64, "uint64"),
    _dt("INT8", np.int8, TensorProto.INT8, "int8"),
    _dt("INT16", np.int16, TensorProto.INT16, "int16"),
    _dt("INT32", np.int32, TensorProto.INT32, "int32"),
    _dt("INT64", np.int64, TensorProto.INT64, "int64"),
    _dt("FP16", np.float16, TensorProto.FLOAT16, "float16"),
    _dt("FP32", np.float32, TensorProto.FLOAT, "float"),
    _dt("FP64", np.float64, TensorProto.DOUBLE, "double"),
    _dt("BYTES", np.object_, TensorProto.STRING, "string"),
)

_BY_V2 = {d.v2: d for d in _TABLE}
_BY_ORT = {d.ort: d for d in _TABLE}
_BY_NUMPY = {d.numpy: d for d in _TABLE if not d.is_bytes}

V2_DATATYPES: tuple[str, ...] = (*(d.v2 for d in _TABLE), "BF16")
"""Every datatype name the V2 protocol defines (BF16 is named so that it is refused precisely)."""


def from_v2(name: str, where: str = "") -> DataType:
    """The datatype for a V2 name such as ``"FP32"``; unknown names are invalid input.

    ``where`` (e.g. ``"input 'a'"``) starts the error message, so the client knows which tensor it was.
    """
    try:
        return _BY_V2[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        if name == "BF16":
            raise InvalidInputError(f"{prefix}datatype BF16 is not supported by onnxserve") from None
        expected = ", ".join(V2_DATATYPES)
        raise InvalidInputError(f"{prefix}unknown datatype {name!r}; expected one of {expected}") from None


def from_ort(type_string: str, where: str) -> DataType:
    """The datatype for an ONNX Runtime type string such as ``"tensor(float)"``."""
    try:
        return _BY_ORT[type_string]
    except KeyError:
        raise ModelLoadError(f"{where} has type {type_string}, which onnxserve cannot serve") from None


def from_numpy(dtype: np.dtype[np.generic]) -> DataType:
    """The datatype for a numpy dtype; ``object``, ``str`` and ``bytes`` arrays are BYTES."""
    if dtype.kind in ("O", "U", "S"):
        return _BY_V2["BYTES"]
    try:
        return _BY_NUMPY[dtype]
    except KeyError:
        raise InvalidInputError(f"numpy dtype {dtype} has no V2 datatype") from None
