"""ONNX Runtime's output values as numpy arrays, a large one without a copy.

``OrtValue.numpy()`` copies the value's buffer into a new array: a 60 MiB answer was held twice while
it was converted (ONNX Runtime's buffer and the copy), and the copy took its time. A numeric output from
:data:`VIEW_BYTES` on becomes an array that views ONNX Runtime's buffer instead, through numpy's
``__array_interface__``: the array's base is an object that keeps the ``OrtValue``, so the buffer lives
exactly as long as the array (and any view of it) does.

Smaller outputs are copied (setting up the view costs more than copying a few kilobytes), and so are
strings (ONNX Runtime makes them Python objects anyway) and an output whose buffer lies inside a
buffer the run was fed (a value ONNX Runtime would hand back without owning it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxserve.core import datatypes
from onnxserve.errors import ModelLoadError

VIEW_BYTES = 1024 * 1024
"""Numeric outputs from this size on are viewed, not copied."""


class _OrtBuffer:
    """An ONNX Runtime value's buffer as numpy sees it; the array made from it keeps the value alive."""

    __slots__ = ("__array_interface__", "value")

    def __init__(self, value: Any, address: int, dtype: np.dtype[Any]) -> None:
        self.value = value
        self.__array_interface__ = {
            "data": (address, False),
            "shape": tuple(value.shape()),
            "typestr": dtype.str,
            "version": 3,
        }


def output_array(value: Any, feeds: Iterable[Any]) -> npt.NDArray[Any]:
    """ONNX Runtime output ``value`` (an ``OrtValue``) as a numpy array; ``feeds``: the run's input
    ``OrtValue``s."""
    type_string = value.data_type()
    if type_string == "tensor(string)" or value.tensor_size_in_bytes() < VIEW_BYTES:
        return np.asarray(value.numpy())
    try:
        dtype = datatypes.from_ort(type_string, "an output").numpy
    except ModelLoadError:  # a type onnxserve does not serve: left to the usual conversion and its error
        return np.asarray(value.numpy())
    address = value.data_ptr()
    for fed in feeds:
        start = fed.data_ptr()
        if start <= address < start + fed.tensor_size_in_bytes():
            return np.asarray(value.numpy())
    return np.asarray(_OrtBuffer(value, address, dtype))
