"""The tests' own datatype vocabulary (independent of onnxserve's tables), from the V2 / Triton documentation."""

from __future__ import annotations

import struct
from collections.abc import Sequence
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


def encode_raw(array: npt.NDArray[Any]) -> bytes:
    """Raw tensor bytes (gRPC raw contents, the HTTP binary extension): little-endian values, or a 4-byte
    length before each BYTES element."""
    if array.dtype == np.object_:
        items = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(v)) + v for v in items)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def decode_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> npt.NDArray[Any]:
    """The array that raw tensor bytes hold; BYTES elements as ``bytes``."""
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        while offset < len(raw):
            (size,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + size])
            offset += 4 + size
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(shape)
    dtype = np.dtype(V2_NUMPY[datatype]).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).astype(V2_NUMPY[datatype]).reshape(shape)
