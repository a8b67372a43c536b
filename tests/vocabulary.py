"""The tests' own datatype vocabulary (independent of onnxserve's tables), from the V2 / Triton documentation."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

V2_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
ONNX_V2 = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES",
}


def v2_datatype(array: npt.NDArray[Any]) -> str:
    if array.dtype == np.object_ or array.dtype.kind in "US":
        return "BYTES"
    return next(name for name, dtype in V2_NUMPY.items() if np.dtype(dtype) == array.dtype)
