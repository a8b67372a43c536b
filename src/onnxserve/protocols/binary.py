"""Raw tensor bytes as KServe V2 carries them: HTTP's binary tensor extension and gRPC's raw contents.

Numbers are little-endian, row-major; BOOL is one byte per element; each BYTES element is a 4-byte
little-endian length followed by its bytes.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from onnxserve.core.datatypes import DataType
from onnxserve.core.types import Tensor
from onnxserve.core.validation import format_shape
from onnxserve.errors import InvalidInputError

_LENGTH = struct.Struct("<I")


def decode(name: str, dtype: DataType, shape: tuple[int, ...], raw: bytes) -> Tensor:
    """A tensor from raw bytes: little-endian values, or length-prefixed elements for BYTES."""
    count = math.prod(shape)
    if dtype.is_bytes:
        values = _split_bytes(name, raw)
        if len(values) != count:
            raise _count_error(name, len(values), shape)
        array = np.empty(count, dtype=object)
        array[:] = values
        return Tensor(name, dtype, array.reshape(shape))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {name!r}: {len(raw)} bytes of binary data, but {dtype.v2} {format_shape(shape)} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype.numpy.newbyteorder("<")).astype(dtype.numpy, copy=False)
    return Tensor(name, dtype, array.reshape(shape))


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    values = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInputError(f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        values.append(bytes(raw[offset : offset + size]))
        offset += size
    return values


def encode(tensor: Tensor) -> bytes:
    """Raw bytes of a tensor in the binary extension's layout."""
    if tensor.datatype.is_bytes:
        return b"".join(_LENGTH.pack(len(b)) + b for b in tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, dtype=tensor.datatype.numpy.newbyteorder("<")).tobytes()


def _count_error(name: str, given: int, shape: tuple[int, ...]) -> InvalidInputError:
    return InvalidInputError(
        f"input {name!r}: data has {given} elements but shape {format_shape(shape)} needs {math.prod(shape)}"
    )
