"""Protobuf sizes and packed encodings of answer tensors, computed with numpy before a message is built.

A typed answer (``contents``) is much larger on the wire than its tensor when its integers are
negative: protobuf writes an ``int32`` or ``int64`` below zero as a 10-byte varint, so an INT8 tensor
can grow tenfold. Building such a message element by element (a Python int per element, then the
protobuf container) held the interpreter for seconds before its size could even be asked. Here the
size of every field is computed from the values (vectorised varint lengths), so an answer is refused
before it is built; and a packed field is encoded with numpy, in slices, and handed to the protobuf
runtime as bytes (``MergeFromString``), which parses it in C without a Python object per element.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

SLICE_ELEMENTS = 1 << 20
"""Elements encoded at once: a slice's scratch arrays take at most ~20 MiB, and the interpreter is
released between slices."""


def varint_length(value: int) -> int:
    """Bytes of the varint of a non-negative ``value``."""
    return max(1, (value.bit_length() + 6) // 7)


def field_length(number: int, payload: int) -> int:
    """Bytes of a length-delimited field ``number`` (tag, length, then ``payload`` bytes)."""
    return varint_length(number << 3) + varint_length(payload) + payload


def _words(part: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """The 64-bit words protobuf writes as varints: signed values sign-extended (a negative int32 takes
    10 bytes, as protobuf writes it), booleans 0/1."""
    if part.dtype.kind == "i":
        return part.astype(np.int64).view(np.uint64)
    return part.astype(np.uint64)


def varints_length(array: npt.NDArray[Any]) -> int:
    """Bytes of all values of an integer or boolean ``array`` as varints (one packed field's payload),
    counted in the array's own dtype: one comparison per 7 bits the dtype can hold."""
    flat = array.reshape(-1)
    total = flat.size
    if flat.dtype.kind == "b":
        return total
    top = int(np.iinfo(flat.dtype).max)
    for start in range(0, flat.size, SLICE_ELEMENTS):
        part = flat[start : start + SLICE_ELEMENTS]
        if flat.dtype.kind == "i":
            total += 9 * int(np.count_nonzero(part < 0))
        for k in range(1, 10):
            if 1 << (7 * k) > top:
                break
            total += int(np.count_nonzero(part >= (1 << (7 * k))))
    return total


def packed_varints(number: int, array: npt.NDArray[Any]) -> Iterator[bytes]:
    """Field ``number`` of an integer or boolean ``array`` as packed varints, one complete field per slice
    (protobuf appends the values of every occurrence of a repeated field, so the slices parse into one)."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, SLICE_ELEMENTS):
        words = _words(flat[start : start + SLICE_ELEMENTS])
        widest = varint_length(int(words.max()))
        if widest == 1:
            payload = words.astype(np.uint8).tobytes()
        else:
            lengths = np.ones(words.size, dtype=np.uint8)
            for k in range(1, widest):
                lengths += words >= np.uint64(1 << (7 * k))
            out = np.empty((words.size, widest), dtype=np.uint8)
            for k in range(widest):
                group = ((words >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
                out[:, k] = group | ((lengths > k + 1).astype(np.uint8) << 7)
            if int(lengths.min()) == widest:
                payload = out.tobytes()
            else:
                payload = out[np.arange(widest, dtype=np.uint8)[None, :] < lengths[:, None]].tobytes()
        yield field_header(number, len(payload)) + payload


def packed_fixed(number: int, array: npt.NDArray[Any], dtype: str) -> Iterator[bytes]:
    """Field ``number`` as packed fixed-width values (``dtype``: ``<f4`` or ``<f8``), one field per slice."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, SLICE_ELEMENTS):
        payload = np.ascontiguousarray(flat[start : start + SLICE_ELEMENTS], dtype=dtype).tobytes()
        yield field_header(number, len(payload)) + payload


def field_header(number: int, length: int) -> bytes:
    """The tag and length that start a length-delimited field ``number`` of ``length`` bytes."""
    return _varint((number << 3) | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
